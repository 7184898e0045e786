"""Top-k sparsification: the k = ceil(fraction * d) largest-magnitude entries of the
whole update (d elements, all tensors together), sent as (index, float32 value) records
in increasing index order; every other entry counts as 0.

Over the whole update rather than per tensor: for a given k this is the best L2
approximation, which is what error feedback's contraction ||x - top_k(x)||^2 <=
(1 - k/d) ||x||^2 rests on (Stich et al. 2018). A tensor whose entries are small is not
lost: its residual grows at the institution until it is sent.

Indices point into the flattened concatenation of the manifest's tensors: a uint32
while d <= 2^32 (8-byte records), an int64 beyond (12 bytes). Increasing order makes
duplicates detectable, lets the coordinator map records to tensors as they stream in,
and bounds decoding: consecutive chunks cover disjoint index ranges.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fedcollab.compression._base import RecordDecoder
from fedcollab.compression._errors import EncodingError
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import TensorPiece, spec_numel

# Decoded records are scattered into dense float32 pieces of at most this many
# elements (4 MiB): over a whole upload the pieces add up to at most d elements, the
# cost of folding an uncompressed update, and never more than one lives at a time.
SPAN = 1 << 20


def topk_count(numel: int, *, fraction: float) -> int:
    """k for an update of `numel` elements; both ends compute it the same way."""
    return min(numel, max(1, math.ceil(fraction * numel))) if numel else 0


def record_dtype(numel: int) -> np.dtype:
    index = "<u4" if numel <= 2**32 else "<i8"
    return np.dtype([("index", index), ("value", "<f4")])


def select_topk(flat: torch.Tensor, *, k: int) -> torch.Tensor:
    """Positions of the k largest |flat| entries, increasing. NaN counts as largest,
    so a diverged update is sent as such and refused."""
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.topk(flat.abs(), k, sorted=False).indices.sort().values


def encode_topk(tensors: Sequence[torch.Tensor], *, fraction: float) -> list[torch.Tensor]:
    flat = torch.cat([t.detach().to("cpu", torch.float32).reshape(-1) for t in tensors])  # [d]
    index = select_topk(flat, k=topk_count(flat.numel(), fraction=fraction))  # [k]
    records = np.empty(index.numel(), dtype=record_dtype(flat.numel()))
    records["index"] = index.numpy()
    records["value"] = flat[index].numpy()
    return [torch.from_numpy(records.view(np.uint8))]


def topk_nbytes(manifest: tensor_pb2.ModelManifest, *, fraction: float) -> int:
    numel = sum(spec_numel(s) for s in manifest.tensors)
    return topk_count(numel, fraction=fraction) * record_dtype(numel).itemsize


class TopkDecoder(RecordDecoder):
    def __init__(self, *, manifest: tensor_pb2.ModelManifest, fraction: float) -> None:
        sizes = [spec_numel(s) for s in manifest.tensors]
        self._numel = sum(sizes)
        self._ends = torch.tensor(sizes, dtype=torch.int64).cumsum(0)  # [tensors]: end of each in the flat update
        self._starts = self._ends - torch.tensor(sizes, dtype=torch.int64)
        self._record = record_dtype(self._numel)
        self._last = -1  # last index received: the next must exceed it
        super().__init__(total=topk_nbytes(manifest, fraction=fraction))

    def _decode(self, buf: bytearray) -> tuple[Iterator[TensorPiece], int]:
        n = len(buf) // self._record.itemsize
        records = np.frombuffer(buf, dtype=self._record, count=n)
        index = torch.from_numpy(records["index"].astype(np.int64))  # [n], a copy
        value = torch.from_numpy(records["value"].copy())  # [n] float32
        if n:
            self._check(index, value)
            self._last = int(index[-1])
        return self._pieces(index, value), n * self._record.itemsize

    def _check(self, index: torch.Tensor, value: torch.Tensor) -> None:
        bad = (index < 0) | (index >= self._numel)
        if bool(bad.any()):
            first = int(index[bad][0])
            raise EncodingError("INDEX_OUT_OF_RANGE", f"top-k index {first} outside the update's {self._numel} "
                                "elements", index=first, elements=self._numel)
        previous = torch.cat([torch.tensor([self._last]), index[:-1]])
        if bool((index <= previous).any()):
            at = int(index[index <= previous][0])
            raise EncodingError("INDEX_NOT_INCREASING", f"top-k index {at} repeats or comes after a larger one; "
                                "indices must be strictly increasing", index=at)
        if not bool(torch.isfinite(value).all()):
            raise EncodingError("NON_FINITE_VALUES", "a top-k value is NaN or Inf")

    def _pieces(self, index: torch.Tensor, value: torch.Tensor) -> Iterator[TensorPiece]:
        """Dense pieces, each within one tensor and one SPAN-aligned window of it, that
        hold the records' values and zeros between them. Lazy: the caller folds each
        piece before the next one is allocated."""
        if index.numel() == 0:
            return
        tensor = torch.searchsorted(self._ends, index, right=True)  # [n] the tensor each record falls in
        local = index - self._starts[tensor]  # [n] element within that tensor
        window = local // SPAN
        cut = ((tensor[1:] != tensor[:-1]) | (window[1:] != window[:-1])).nonzero().reshape(-1) + 1
        bounds = [0, *cut.tolist(), index.numel()]
        for a, b in zip(bounds[:-1], bounds[1:], strict=False):
            lo, hi = int(local[a]), int(local[b - 1]) + 1
            dense = torch.zeros(hi - lo, dtype=torch.float32)
            dense[local[a:b] - lo] = value[a:b]
            yield TensorPiece(int(tensor[a]), lo, dense)
