"""Which data a round trained on, as the site's privacy ledger keys it.

The budget is the site's, per dataset: every study that touches the same data spends
from one budget. The key comes only from the site's own [data] config, which the site
trusts; nothing the coordinator sends (study names, model, plan) enters it, so a
coordinator cannot make old data look new.

`data.id`, when set, is the key: a site that moves its file, or holds two truly
disjoint datasets, names them. Otherwise the key is the data's source: a built-in
dataset's name, or an npz file's resolved path. Deliberately left out:

* the file's hash: a file updated in place (more records of the same people) is still
  the same data, and a hash would give it a fresh budget;
* seeds, held-out fractions and the partition: they pick overlapping subsets of the
  same records, and a config edit (another seed, alpha or scheme) would otherwise
  reset the budget on data already disclosed. Parallel composition over disjoint
  partitions is real, but only while they stay disjoint; a site that relies on it
  says so with `data.id`.
"""

from __future__ import annotations

from pathlib import Path

from fedcollab.config import DataConfig


def dataset_key(data: DataConfig) -> str:
    """The ledger's key for this site's data: `id:<data.id>`, `npz:<resolved path>` or `builtin:<name>`."""
    if data.id is not None:
        return f"id:{data.id}"
    if data.path is not None:
        return f"{data.dataset}:{Path(data.path).expanduser().resolve()}"
    return f"builtin:{data.dataset}"
