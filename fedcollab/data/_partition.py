"""Seeded partitioners that split example indices across federated clients.

Every partitioner returns one sorted int64 index array per partition; the
arrays are disjoint and together cover 0..n-1 exactly once.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

# Dirichlet draws can starve a partition; retry this many times before giving up.
_MAX_ATTEMPTS = 1000


def partition_iid(*, num_examples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Shuffles the indices and deals them into near-equal partitions."""
    _check_counts(num_examples=num_examples, num_partitions=num_partitions)
    perm = np.random.default_rng(seed).permutation(num_examples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, num_partitions)]


def partition_dirichlet(
    *,
    labels: np.ndarray,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Label skew: each class is split over partitions with proportions ~ Dir(alpha)."""
    labels = _check_labels(labels)
    _check_counts(num_examples=len(labels), num_partitions=num_partitions)
    _check_alpha(alpha)
    _check_min_size(
        min_partition_size=min_partition_size,
        num_examples=len(labels),
        num_partitions=num_partitions,
    )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(_MAX_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for class_idx in by_class:
            shuffled = rng.permutation(class_idx)
            proportions = rng.dirichlet(np.full(num_partitions, alpha))  # (P,)
            # Cumulative proportions -> cut points into this class's examples.
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            for p, chunk in enumerate(np.split(shuffled, cuts)):
                parts[p].append(chunk)
        merged = [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]
        if min(len(m) for m in merged) >= min_partition_size:
            return merged
    raise ValueError(
        f"could not give every one of {num_partitions} partitions >= {min_partition_size} "
        f"examples in {_MAX_ATTEMPTS} Dirichlet draws with alpha={alpha} over "
        f"{len(labels)} examples; raise alpha, lower min_partition_size or use fewer partitions"
    )


def partition_quantity_skew(
    *,
    num_examples: int,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Quantity skew: partition sizes ~ Dir(alpha), examples assigned iid."""
    _check_counts(num_examples=num_examples, num_partitions=num_partitions)
    _check_alpha(alpha)
    _check_min_size(
        min_partition_size=min_partition_size,
        num_examples=num_examples,
        num_partitions=num_partitions,
    )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_examples).astype(np.int64)
    for _ in range(_MAX_ATTEMPTS):
        proportions = rng.dirichlet(np.full(num_partitions, alpha))  # (P,)
        cuts = (np.cumsum(proportions)[:-1] * num_examples).astype(np.int64)
        sizes = np.diff(np.concatenate([[0], cuts, [num_examples]]))
        if sizes.min() >= min_partition_size:
            return [np.sort(part) for part in np.split(perm, cuts)]
    raise ValueError(
        f"could not give every one of {num_partitions} partitions >= {min_partition_size} "
        f"examples in {_MAX_ATTEMPTS} Dirichlet draws with alpha={alpha} over "
        f"{num_examples} examples; raise alpha, lower min_partition_size or use fewer partitions"
    )


def partition(
    *,
    scheme: Literal["iid", "dirichlet", "quantity"],
    labels: np.ndarray,
    num_partitions: int,
    seed: int,
    alpha: float = 0.5,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Dispatches to one partitioner by name; alpha and min size are ignored for iid."""
    labels = _check_labels(labels)
    if scheme == "iid":
        return partition_iid(num_examples=len(labels), num_partitions=num_partitions, seed=seed)
    if scheme == "dirichlet":
        return partition_dirichlet(
            labels=labels, num_partitions=num_partitions, alpha=alpha, seed=seed,
            min_partition_size=min_partition_size,
        )
    if scheme == "quantity":
        return partition_quantity_skew(
            num_examples=len(labels), num_partitions=num_partitions, alpha=alpha, seed=seed,
            min_partition_size=min_partition_size,
        )
    raise ValueError(f"unknown partition scheme {scheme!r}; known schemes: iid, dirichlet, quantity")


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D with shape (n,), got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    return labels


def _check_counts(*, num_examples: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions > num_examples:
        raise ValueError(
            f"num_partitions ({num_partitions}) exceeds num_examples ({num_examples}); "
            "every partition needs at least one example, so use fewer partitions"
        )


def _check_alpha(alpha: float) -> None:
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")


def _check_min_size(*, min_partition_size: int, num_examples: int, num_partitions: int) -> None:
    # An empty client cannot train or be weighted, so 1 is the floor.
    if min_partition_size < 1:
        raise ValueError(f"min_partition_size must be >= 1, got {min_partition_size}")
    if min_partition_size * num_partitions > num_examples:
        raise ValueError(
            f"min_partition_size={min_partition_size} x num_partitions={num_partitions} "
            f"needs {min_partition_size * num_partitions} examples but only {num_examples} "
            "exist; lower min_partition_size or use fewer partitions"
        )
