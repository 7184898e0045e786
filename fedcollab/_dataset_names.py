"""The names of fedcollab's dataset sources, apart from their loaders: config validation
needs the names at load time without importing scikit-learn (fedcollab/data)."""

from __future__ import annotations

# Built-in datasets, each loaded by fedcollab/data/_datasets.py (load_dataset).
KNOWN_DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "fashion_mnist")
# A site's own arrays: x and y in an .npz file ([data] path).
NPZ = "npz"
DATA_SOURCES: tuple[str, ...] = (*KNOWN_DATASETS, NPZ)
