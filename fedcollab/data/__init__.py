"""Datasets as numpy arrays and seeded federated partitioners."""

from fedcollab.data._datasets import ArrayDataset, load_dataset, train_val_split
from fedcollab.data._partition import (
    partition,
    partition_dirichlet,
    partition_iid,
    partition_quantity_skew,
)

__all__ = [
    "ArrayDataset",
    "load_dataset",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_quantity_skew",
    "train_val_split",
]
