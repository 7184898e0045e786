"""In-memory datasets and their loaders.

Everything is returned as plain numpy arrays (float32 features, int64 labels)
so that clients, the server and the benchmarks can share data without any
framework-specific dataset objects.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split

from fedcollab._dataset_names import KNOWN_DATASETS

_FASHION_HINT = (
    "Get the raw IDX files without network access at run time, e.g. "
    "`apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb DIR`, "
    "then pass as data_dir the folder that holds them "
    "(`find DIR -name 'train-images-idx3-ubyte*'` shows where they landed)."
)


# eq=False: the generated __eq__ would compare arrays element-wise and raise.
@dataclass(frozen=True, eq=False)
class ArrayDataset:
    x: np.ndarray  # float32 features, shape (n, ...)
    y: np.ndarray  # int64 labels, shape (n,)
    num_classes: int

    def __post_init__(self) -> None:
        if self.y.ndim != 1:
            raise ValueError(f"y must be 1-D with shape (n,), got shape {self.y.shape}")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"x and y disagree on the number of examples: x has {self.x.shape[0]}, "
                f"y has {self.y.shape[0]}"
            )
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayDataset(x=self.x[idx], y=self.y[idx], num_classes=self.num_classes)


def load_dataset(
    name: str,
    *,
    seed: int,
    test_fraction: float = 0.2,
    data_dir: str | Path | None = None,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Returns (train, test): a seeded, stratified split.

    fashion_mnist uses its official train/test files, so seed and
    test_fraction do not affect it.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if name == "digits":
        bunch = load_digits()
        x = (bunch.data / 16.0).astype(np.float32)  # (1797, 64) in [0, 1]
        return _split(x, bunch.target, num_classes=10, seed=seed, test_fraction=test_fraction)
    if name == "breast_cancer":
        bunch = load_breast_cancer()
        train, test = _split(
            bunch.data.astype(np.float32), bunch.target, num_classes=2,
            seed=seed, test_fraction=test_fraction,
        )
        # Statistics from the train split only, so nothing leaks from test.
        mean = train.x.mean(axis=0)
        std = train.x.std(axis=0)
        std = np.where(std > 0, std, 1.0).astype(np.float32)
        return (
            ArrayDataset(x=(train.x - mean) / std, y=train.y, num_classes=2),
            ArrayDataset(x=(test.x - mean) / std, y=test.y, num_classes=2),
        )
    if name == "fashion_mnist":
        return _load_fashion_mnist(data_dir)
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")


def train_val_split(
    dataset: ArrayDataset, *, val_fraction: float, seed: int
) -> tuple[ArrayDataset, ArrayDataset]:
    """Seeded split into (train, val); stratified when every class has >= 2 examples."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(dataset)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1) if n >= 1 else 0
    if n_val == 0:
        empty = np.empty(0, dtype=np.int64)
        return dataset.subset(np.arange(n, dtype=np.int64)), dataset.subset(empty)
    all_idx = np.arange(n, dtype=np.int64)
    _, counts = np.unique(dataset.y, return_counts=True)
    # Stratification needs >= 2 per class and room for one of each class per side.
    stratify = (
        dataset.y
        if counts.min() >= 2 and len(counts) <= n_val and len(counts) <= n - n_val
        else None
    )
    train_idx, val_idx = train_test_split(
        all_idx, test_size=n_val, random_state=seed, stratify=stratify
    )
    return dataset.subset(np.sort(train_idx)), dataset.subset(np.sort(val_idx))


def _split(
    x: np.ndarray, y: np.ndarray, *, num_classes: int, seed: int, test_fraction: float
) -> tuple[ArrayDataset, ArrayDataset]:
    y = y.astype(np.int64)
    idx = np.arange(len(y), dtype=np.int64)
    train_idx, test_idx = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=y
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return (
        ArrayDataset(x=x[train_idx], y=y[train_idx], num_classes=num_classes),
        ArrayDataset(x=x[test_idx], y=y[test_idx], num_classes=num_classes),
    )


def _load_fashion_mnist(data_dir: str | Path | None) -> tuple[ArrayDataset, ArrayDataset]:
    if data_dir is None:
        raise ValueError(f"fashion_mnist needs data_dir (the folder with its IDX files). {_FASHION_HINT}")
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"fashion_mnist data_dir {str(root)!r} is not a directory. {_FASHION_HINT}")

    def split(prefix: str) -> ArrayDataset:
        images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))  # (n, 28, 28) uint8
        labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))  # (n,) uint8
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"fashion_mnist {prefix} files in {str(root)!r} do not match: images "
                f"{images.shape}, labels {labels.shape}; expected (n, H, W) and (n,)"
            )
        x = (images.astype(np.float32) / 255.0)[:, None, :, :]  # (n, 1, H, W) in [0, 1]
        return ArrayDataset(x=x, y=labels.astype(np.int64), num_classes=10)

    return split("train"), split("t10k")


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"missing fashion_mnist file {str(root / stem)!r} (or its .gz). {_FASHION_HINT}"
    )


# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """Parses an IDX file: 2 zero bytes, type code, ndim, ndim big-endian uint32 dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{str(path)!r} is truncated or corrupt: header says shape {shape} "
            f"({expected} data bytes) but {len(raw) - header} bytes follow"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
