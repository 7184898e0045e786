"""Properties of the seeded partitioners in fedcollab.data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcollab.data import (
    partition,
    partition_dirichlet,
    partition_iid,
    partition_quantity_skew,
)

FAST = settings(max_examples=40, deadline=None)


def assert_valid_partition(parts: list[np.ndarray], *, num_examples: int, num_partitions: int) -> None:
    assert len(parts) == num_partitions
    for part in parts:
        assert part.dtype == np.int64
        assert part.ndim == 1
        assert np.all(np.diff(part) > 0), "each partition is sorted without duplicates"
    merged = np.concatenate(parts)
    # Disjoint and complete: the union is exactly 0..n-1 with no repeats.
    assert merged.size == num_examples
    np.testing.assert_array_equal(np.sort(merged), np.arange(num_examples))


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def labels_for(n: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=n).astype(np.int64)


@FAST
@given(
    num_examples=st.integers(1, 500),
    num_partitions=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_iid_is_valid_balanced_and_deterministic(num_examples: int, num_partitions: int, seed: int) -> None:
    num_partitions = min(num_partitions, num_examples)
    parts = partition_iid(num_examples=num_examples, num_partitions=num_partitions, seed=seed)
    assert_valid_partition(parts, num_examples=num_examples, num_partitions=num_partitions)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert same(parts, partition_iid(num_examples=num_examples, num_partitions=num_partitions, seed=seed))


@FAST
@given(
    # Ranges keep min sizes feasible: at alpha >= 0.5 with minimums taking at most
    # 20% of the data, a draw succeeds long before the retry bound. Small alpha is
    # covered by the fixed-seed skew test below.
    num_examples=st.integers(400, 800),
    num_classes=st.integers(1, 10),
    num_partitions=st.integers(1, 8),
    alpha=st.floats(0.5, 100.0),
    min_size=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_is_valid_and_honours_min_size(
    num_examples: int, num_classes: int, num_partitions: int, alpha: float, min_size: int, seed: int
) -> None:
    labels = labels_for(num_examples, num_classes, seed)
    kwargs = dict(labels=labels, num_partitions=num_partitions, alpha=alpha, seed=seed, min_partition_size=min_size)
    parts = partition_dirichlet(**kwargs)
    assert_valid_partition(parts, num_examples=num_examples, num_partitions=num_partitions)
    assert min(len(p) for p in parts) >= min_size
    assert same(parts, partition_dirichlet(**kwargs))


@FAST
@given(
    num_examples=st.integers(400, 800),
    num_partitions=st.integers(1, 8),
    alpha=st.floats(0.5, 100.0),
    min_size=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantity_skew_is_valid_and_honours_min_size(
    num_examples: int, num_partitions: int, alpha: float, min_size: int, seed: int
) -> None:
    kwargs = dict(
        num_examples=num_examples, num_partitions=num_partitions, alpha=alpha, seed=seed, min_partition_size=min_size
    )
    parts = partition_quantity_skew(**kwargs)
    assert_valid_partition(parts, num_examples=num_examples, num_partitions=num_partitions)
    assert min(len(p) for p in parts) >= min_size
    assert same(parts, partition_quantity_skew(**kwargs))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_different_seeds_give_different_partitions(scheme: str) -> None:
    labels = labels_for(1000, 10, seed=0)
    a = partition(scheme=scheme, labels=labels, num_partitions=5, seed=1)
    b = partition(scheme=scheme, labels=labels, num_partitions=5, seed=2)
    assert not same(a, b)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_dispatcher_matches_direct_call(scheme: str) -> None:
    labels = labels_for(600, 4, seed=3)
    got = partition(scheme=scheme, labels=labels, num_partitions=4, seed=7, alpha=0.3, min_partition_size=5)
    direct = {
        "iid": lambda: partition_iid(num_examples=600, num_partitions=4, seed=7),
        "dirichlet": lambda: partition_dirichlet(
            labels=labels, num_partitions=4, alpha=0.3, seed=7, min_partition_size=5
        ),
        "quantity": lambda: partition_quantity_skew(
            num_examples=600, num_partitions=4, alpha=0.3, seed=7, min_partition_size=5
        ),
    }[scheme]()
    assert same(got, direct)


def mean_label_tv(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> float:
    """Mean total-variation distance of each partition's label histogram from the global one."""
    global_dist = np.bincount(labels, minlength=num_classes) / len(labels)
    tvs = [0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - global_dist).sum() for p in parts]
    return float(np.mean(tvs))


def test_small_alpha_dirichlet_skews_labels_more_than_iid() -> None:
    labels = labels_for(5000, 10, seed=0)
    iid = partition(scheme="iid", labels=labels, num_partitions=10, seed=0)
    skewed = partition(scheme="dirichlet", labels=labels, num_partitions=10, seed=0, alpha=0.1)
    tv_iid = mean_label_tv(iid, labels, 10)
    tv_skewed = mean_label_tv(skewed, labels, 10)
    assert tv_iid < 0.1  # 500 examples per partition track the global mix closely
    assert tv_skewed > 0.4  # alpha=0.1 concentrates most partitions on few classes
    # Large alpha approaches iid.
    mild = partition(scheme="dirichlet", labels=labels, num_partitions=10, seed=0, alpha=1000.0)
    assert mean_label_tv(mild, labels, 10) < 0.1


def test_quantity_skew_keeps_labels_but_skews_sizes() -> None:
    labels = labels_for(5000, 10, seed=0)
    parts = partition(scheme="quantity", labels=labels, num_partitions=10, seed=0, alpha=0.5, min_partition_size=50)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 3 * sizes.min()
    assert mean_label_tv(parts, labels, 10) < 0.15


LABELS = np.arange(20, dtype=np.int64) % 4

BAD_ARGS = [
    pytest.param(
        lambda: partition_iid(num_examples=10, num_partitions=0, seed=0),
        "num_partitions must be >= 1",
        id="iid-zero-partitions",
    ),
    pytest.param(
        lambda: partition_iid(num_examples=3, num_partitions=4, seed=0),
        "exceeds num_examples",
        id="iid-more-partitions-than-examples",
    ),
    pytest.param(
        lambda: partition_dirichlet(labels=LABELS, num_partitions=2, alpha=0.0, seed=0),
        "alpha must be",
        id="dirichlet-zero-alpha",
    ),
    pytest.param(
        lambda: partition_dirichlet(labels=LABELS, num_partitions=2, alpha=float("nan"), seed=0),
        "alpha must be",
        id="dirichlet-nan-alpha",
    ),
    pytest.param(
        lambda: partition_dirichlet(labels=LABELS, num_partitions=3, alpha=1.0, seed=0, min_partition_size=10),
        "needs 30 examples but only 20",
        id="dirichlet-min-size-impossible",
    ),
    pytest.param(
        lambda: partition_dirichlet(labels=LABELS, num_partitions=2, alpha=1.0, seed=0, min_partition_size=0),
        "min_partition_size must be >= 1",
        id="dirichlet-zero-min-size",
    ),
    pytest.param(
        lambda: partition_dirichlet(labels=LABELS.reshape(4, 5), num_partitions=2, alpha=1.0, seed=0),
        "1-D",
        id="dirichlet-2d-labels",
    ),
    pytest.param(
        lambda: partition_dirichlet(labels=LABELS.astype(float), num_partitions=2, alpha=1.0, seed=0),
        "integers",
        id="dirichlet-float-labels",
    ),
    pytest.param(
        lambda: partition_dirichlet(
            labels=np.zeros(1000, np.int64), num_partitions=10, alpha=0.01, seed=0, min_partition_size=90
        ),
        "raise alpha",
        id="dirichlet-gives-up",
    ),
    pytest.param(
        lambda: partition_quantity_skew(num_examples=100, num_partitions=2, alpha=-1.0, seed=0),
        "alpha must be",
        id="quantity-negative-alpha",
    ),
    pytest.param(
        lambda: partition_quantity_skew(num_examples=10, num_partitions=11, alpha=1.0, seed=0),
        "exceeds num_examples",
        id="quantity-too-many-partitions",
    ),
    pytest.param(
        lambda: partition(scheme="shards", labels=LABELS, num_partitions=2, seed=0),
        "known schemes: iid, dirichlet, quantity",
        id="unknown-scheme",
    ),
]


@pytest.mark.parametrize(("call", "message"), BAD_ARGS)
def test_bad_arguments_raise_clear_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
