"""Dataset loaders and splits in fedcollab.data."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fedcollab.data import ArrayDataset, load_dataset, train_val_split


def test_digits_shapes_dtypes_and_ranges() -> None:
    train, test = load_dataset("digits", seed=0)
    assert (len(train), len(test)) == (1437, 360)  # 1797 examples, 20% test
    assert train.x.shape == (1437, 64) and test.x.shape == (360, 64)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.num_classes == 10
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    assert set(np.unique(train.y)) == set(range(10))


def test_split_is_stratified_seeded_and_disjoint() -> None:
    train, test = load_dataset("digits", seed=0, test_fraction=0.25)
    again_train, _ = load_dataset("digits", seed=0, test_fraction=0.25)
    other_train, _ = load_dataset("digits", seed=1, test_fraction=0.25)
    np.testing.assert_array_equal(train.x, again_train.x)
    np.testing.assert_array_equal(train.y, again_train.y)
    assert not np.array_equal(train.x, other_train.x)
    # Stratified: each class's share of test matches its share of the whole to within one example.
    all_y = np.concatenate([train.y, test.y])
    expected = np.bincount(all_y) * 0.25
    assert np.all(np.abs(np.bincount(test.y, minlength=10) - expected) <= 1.0)
    # Disjoint: no test row also appears in train.
    train_rows = {row.tobytes() for row in train.x}
    overlap = sum(row.tobytes() in train_rows for row in test.x)
    assert overlap <= 2  # digits has a couple of exact duplicate images, nothing more


def test_breast_cancer_is_standardised_on_train_only() -> None:
    train, test = load_dataset("breast_cancer", seed=0)
    assert train.x.shape == (455, 30) and test.x.shape == (114, 30)
    assert train.num_classes == 2 and train.x.dtype == np.float32
    np.testing.assert_allclose(train.x.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(train.x.std(axis=0), 1.0, atol=1e-4)
    # Test used train statistics, so it is close to, but not exactly, standardised.
    assert np.abs(test.x.mean(axis=0)).max() > 1e-3


def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="known datasets: digits, breast_cancer, fashion_mnist"):
        load_dataset("cifar10", seed=0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_test_fraction_is_rejected(fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_dataset("digits", seed=0, test_fraction=fraction)


def test_fashion_mnist_missing_dir_says_how_to_get_files(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="apt-get download dataset-fashion-mnist") as info:
        load_dataset("fashion_mnist", seed=0, data_dir=missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("fashion_mnist", seed=0)


def test_fashion_mnist_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train-images-idx3-ubyte") as info:
        load_dataset("fashion_mnist", seed=0, data_dir=tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "dpkg-deb -x" in str(info.value)


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_fashion_mnist_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, size=(5, 28, 28)), "t10k": rng.integers(0, 256, size=(3, 28, 28))}
    labels = {"train": np.array([0, 9, 3, 3, 1]), "t10k": np.array([7, 2, 5])}
    images["train"][0, 0, 0], images["train"][0, 0, 1] = 0, 255  # pin both ends of the scale
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images[prefix], compress=compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels[prefix], compress=compress)

    train, test = load_dataset("fashion_mnist", seed=0, data_dir=tmp_path)

    assert train.x.shape == (5, 1, 28, 28) and test.x.shape == (3, 1, 28, 28)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.num_classes == 10
    np.testing.assert_allclose(train.x[:, 0], images["train"] / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(test.x[:, 0], images["t10k"] / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(train.y, labels["train"])
    np.testing.assert_array_equal(test.y, labels["t10k"])
    assert train.x[0, 0, 0, 0] == 0.0 and train.x[0, 0, 0, 1] == 1.0


def test_corrupt_idx_file_is_reported(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")  # says 5, has 1
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_dataset("fashion_mnist", seed=0, data_dir=tmp_path)


def toy(n: int, num_classes: int) -> ArrayDataset:
    y = np.arange(n, dtype=np.int64) % num_classes
    return ArrayDataset(x=np.arange(n, dtype=np.float32)[:, None], y=y, num_classes=num_classes)


def test_train_val_split_is_stratified_seeded_and_complete() -> None:
    data = toy(100, 4)
    train, val = train_val_split(data, val_fraction=0.2, seed=0)
    assert (len(train), len(val)) == (80, 20)
    np.testing.assert_array_equal(np.bincount(val.y), [5, 5, 5, 5])
    ids = np.concatenate([train.x[:, 0], val.x[:, 0]])
    np.testing.assert_array_equal(np.sort(ids), np.arange(100))
    again_train, again_val = train_val_split(data, val_fraction=0.2, seed=0)
    np.testing.assert_array_equal(val.x, again_val.x)
    _, other_val = train_val_split(data, val_fraction=0.2, seed=1)
    assert not np.array_equal(val.x, other_val.x)


def test_train_val_split_falls_back_and_keeps_one_val_example() -> None:
    # Class 2 has a single example, so stratification is impossible: plain random split.
    data = ArrayDataset(x=np.zeros((7, 2), np.float32), y=np.array([0, 0, 0, 1, 1, 1, 2]), num_classes=3)
    train, val = train_val_split(data, val_fraction=0.3, seed=0)
    assert (len(train), len(val)) == (5, 2)
    # A tiny fraction still yields one validation example.
    train, val = train_val_split(toy(2, 1), val_fraction=0.01, seed=0)
    assert (len(train), len(val)) == (1, 1)
    train, val = train_val_split(toy(10, 2), val_fraction=0.0, seed=0)
    assert (len(train), len(val)) == (10, 0)


def test_array_dataset_validates_and_subsets() -> None:
    data = toy(6, 3)
    sub = data.subset(np.array([5, 0]))
    np.testing.assert_array_equal(sub.y, [2, 0])
    assert sub.num_classes == 3 and len(sub) == 2
    with pytest.raises(ValueError, match="disagree on the number of examples"):
        ArrayDataset(x=np.zeros((3, 2), np.float32), y=np.zeros(4, np.int64), num_classes=2)
