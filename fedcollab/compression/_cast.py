"""none / fp16 / bf16: the tensor stream of fedcollab.wire, each tensor cast to one
wire dtype or left as it is; decoding casts back to float32.

Values beyond the half format's range saturate to its largest finite value instead of
becoming Inf (which the coordinator would refuse): an update element above 65504 is
already a diverged round, and saturating keeps its sign. NaN stays NaN, so a diverged
update is still refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedcollab.compression._errors import EncodingError
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import TensorPiece, TensorStreamDecoder, all_finite, manifest_nbytes, wire_dtype


def encode_cast(tensors: Sequence[torch.Tensor], *, dtype: torch.dtype) -> list[torch.Tensor]:
    top = torch.finfo(dtype).max
    return [t.detach().to("cpu").reshape(-1).clamp(-top, top).to(dtype) for t in tensors]


def cast_manifest(manifest: tensor_pb2.ModelManifest, *, dtype: torch.dtype | None) -> tensor_pb2.ModelManifest:
    """The manifest of the stream that travels: every tensor in `dtype` (None: as is)."""
    if dtype is None:
        return manifest
    cast = tensor_pb2.ModelManifest()
    cast.CopyFrom(manifest)
    for s in cast.tensors:
        s.dtype = wire_dtype(dtype)
    return cast


def cast_nbytes(manifest: tensor_pb2.ModelManifest, *, dtype: torch.dtype | None) -> int:
    return manifest_nbytes(cast_manifest(manifest, dtype=dtype))


def check_finite(values: torch.Tensor, name: str) -> None:
    if not all_finite(values):
        raise EncodingError("NON_FINITE_VALUES", f"tensor {name!r} holds NaN or Inf", tensor=name)


class CastDecoder:
    """Raw tensors (`dtype` None) or every tensor sent as `dtype`; checked for NaN/Inf."""

    def __init__(self, *, manifest: tensor_pb2.ModelManifest, dtype: torch.dtype | None = None) -> None:
        self._inner = TensorStreamDecoder(cast_manifest(manifest, dtype=dtype))
        self._names = [s.name for s in manifest.tensors]
        self._cast = dtype is not None
        self.total = self._inner.total

    @property
    def received(self) -> int:
        return self._inner.received

    @property
    def complete(self) -> bool:
        return self._inner.complete

    def feed(self, data: bytes | memoryview) -> list[TensorPiece]:
        try:
            pieces = self._inner.feed(data)
        except ValueError as e:
            raise EncodingError("SIZE_MISMATCH", str(e), expected=self.total) from None
        for p in pieces:
            check_finite(p.values, self._names[p.index])
        if self._cast:
            pieces = [TensorPiece(p.index, p.start, p.values.to(torch.float32)) for p in pieces]
        return pieces
