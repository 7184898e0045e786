"""The institution's local data: train split and held-out split for evaluation."""

from __future__ import annotations

import numpy as np

from fedcollab.config import DataConfig
from fedcollab.data import ArrayDataset, load_dataset, partition, train_val_split
from fedcollab.errors import ConfigError


def load_local_data(config: DataConfig) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, held-out) for this institution."""
    try:
        if config.dataset == "npz":
            data = _load_npz(config)
        else:
            data, _global_test = load_dataset(
                config.dataset, seed=config.seed, test_fraction=config.test_fraction, data_dir=config.data_dir
            )
            if config.partition is not None:
                p = config.partition
                parts = partition(scheme=p.scheme, labels=data.y, num_partitions=p.num_partitions,
                                  seed=p.seed, alpha=p.alpha)
                data = data.subset(parts[p.index])
        return train_val_split(data, val_fraction=config.val_fraction, seed=config.seed)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None


def _load_npz(config: DataConfig) -> ArrayDataset:
    try:
        assert config.path is not None  # DataConfig requires it for npz
        with np.load(config.path, allow_pickle=False) as f:  # NEVER allow pickle: it runs code
            x, y = f["x"], f["y"]
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{config.path}: cannot read arrays x and y from the .npz file: {e}") from None
    # Checked before the casts: a cast would turn "3" into 3.0 and label 1.7 into 1 silently.
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{config.path}: x holds {x.dtype} values; features must be numbers (float or int)")
    if y.dtype.kind not in "biuf" or (y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y)))):
        raise ValueError(f"{config.path}: y must hold integer class labels 0, 1, ...; it holds {y.dtype} values"
                         + (" that are not all whole numbers" if y.dtype.kind == "f" else ""))
    x, y = x.astype(np.float32), y.astype(np.int64)
    return ArrayDataset(x=x, y=y, num_classes=max(int(y.max()) + 1, 1) if len(y) else 1)
