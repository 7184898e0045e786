"""Tensors <-> manifests and byte streams: dtype/shape/raw bytes, never pickle."""

from __future__ import annotations

import hashlib
import math
import sys
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedcollab.v1 import tensor_pb2

if sys.byteorder != "little":  # the wire format is little-endian and we send memory as is
    raise ImportError("fedcollab's wire format needs a little-endian machine")

_TO_TORCH: dict[int, torch.dtype] = {
    tensor_pb2.TENSOR_DTYPE_FLOAT32: torch.float32,
    tensor_pb2.TENSOR_DTYPE_FLOAT64: torch.float64,
    tensor_pb2.TENSOR_DTYPE_FLOAT16: torch.float16,
    tensor_pb2.TENSOR_DTYPE_BFLOAT16: torch.bfloat16,
}
# Models hold only floating-point tensors; uint32 travels only as masked updates.
_TO_WIRE: dict[torch.dtype, int] = {v: k for k, v in _TO_TORCH.items()}
_TO_TORCH[tensor_pb2.TENSOR_DTYPE_UINT32] = torch.uint32


def torch_dtype(wire: int) -> torch.dtype:
    try:
        return _TO_TORCH[wire]
    except KeyError:
        raise ValueError(f"unsupported tensor dtype {wire} on the wire") from None


def wire_dtype(dtype: torch.dtype) -> tensor_pb2.TensorDtype:
    try:
        return typing.cast(tensor_pb2.TensorDtype, _TO_WIRE[dtype])
    except KeyError:
        known = ", ".join(str(d) for d in _TO_WIRE)
        raise ValueError(
            f"tensors of dtype {dtype} cannot be averaged or sent; models may hold only "
            f"floating-point tensors ({known})"
        ) from None


def all_finite(values: torch.Tensor) -> bool:
    """True when no element is NaN or Inf, without a boolean mask of the tensor's size.

    A sum is non-finite whenever an element is, so a finite sum settles it (a float32 sum
    runs about 9x faster than float64's, which must convert every element first). Only a
    non-finite sum, which finite values can also give by overflowing, needs the exact
    check. Integer tensors (masked updates) hold neither NaN nor Inf."""
    if not values.is_floating_point():
        return True
    accumulate = torch.float32 if values.element_size() < 4 else values.dtype  # half sums overflow at 65504
    if math.isfinite(values.sum(dtype=accumulate)):
        return True
    return bool(torch.isfinite(values).all())


def manifest_of(tensors: Mapping[str, torch.Tensor]) -> tensor_pb2.ModelManifest:
    return tensor_pb2.ModelManifest(
        tensors=[
            tensor_pb2.TensorSpec(name=name, dtype=wire_dtype(t.dtype), shape=list(t.shape))
            for name, t in tensors.items()
        ]
    )


def spec_numel(spec: tensor_pb2.TensorSpec) -> int:
    n = 1
    for d in spec.shape:
        n *= int(d)
    return n


def spec_nbytes(spec: tensor_pb2.TensorSpec) -> int:
    return spec_numel(spec) * torch_dtype(spec.dtype).itemsize


def manifest_nbytes(manifest: tensor_pb2.ModelManifest) -> int:
    return sum(spec_nbytes(s) for s in manifest.tensors)


def _raw(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]  # ndarray is a buffer


def iter_stream(tensors: Iterable[torch.Tensor], *, piece_bytes: int) -> Iterator[memoryview | bytes]:
    """The concatenated raw bytes of `tensors`, in pieces of exactly `piece_bytes`
    (the last may be shorter), without materialising the whole stream."""
    pending = bytearray()
    for t in tensors:
        raw = _raw(t)
        pos = 0
        if pending:
            take = min(piece_bytes - len(pending), len(raw))
            pending += raw[:take]
            pos = take
            if len(pending) == piece_bytes:
                yield bytes(pending)
                pending.clear()
        while len(raw) - pos >= piece_bytes:
            yield raw[pos : pos + piece_bytes]
            pos += piece_bytes
        pending += raw[pos:]
    if pending:
        yield bytes(pending)


def iter_chunks(
    tensors: Sequence[torch.Tensor], *, chunk_bytes: int
) -> Iterator[tensor_pb2.Chunk]:
    offset = 0
    for piece in iter_stream(tensors, piece_bytes=chunk_bytes):
        data = bytes(piece)
        yield tensor_pb2.Chunk(offset=offset, data=data, sha256=hashlib.sha256(data).digest())
        offset += len(data)


def stream_sha256(tensors: Iterable[torch.Tensor]) -> bytes:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(_raw(t))
    return digest.digest()


@dataclass(frozen=True)
class TensorPiece:
    """A run of whole elements of tensor `index`, starting at element `start`."""

    index: int
    start: int
    values: torch.Tensor  # 1-D view, dtype of the tensor


class TensorStreamDecoder:
    """Turns a tensor stream, fed in arbitrary byte pieces, into whole-element pieces.

    Memory stays at one piece plus under one element of carry-over, so a stream of any
    size can be checked and folded as it arrives.
    """

    def __init__(self, manifest: tensor_pb2.ModelManifest) -> None:
        self._dtypes = [torch_dtype(s.dtype) for s in manifest.tensors]
        self._sizes = [spec_nbytes(s) for s in manifest.tensors]
        self._index = 0
        self._done_in_tensor = 0
        self._carry = b""
        self.total = sum(self._sizes)
        self.received = 0

    @property
    def complete(self) -> bool:
        return self.received == self.total

    def feed(self, data: bytes | memoryview) -> list[TensorPiece]:
        if self.received + len(data) > self.total:
            raise ValueError(
                f"stream longer than its manifest: {self.received + len(data)} > {self.total} bytes"
            )
        self.received += len(data)
        buf = bytearray(self._carry)
        buf += data
        pieces: list[TensorPiece] = []
        pos = 0
        while pos < len(buf) and self._index < len(self._sizes):
            size, dtype = self._sizes[self._index], self._dtypes[self._index]
            if size == 0:  # an empty tensor holds no bytes: move on
                self._index += 1
                continue
            item = dtype.itemsize
            take = min(size - self._done_in_tensor, len(buf) - pos)
            take -= take % item
            if take == 0:
                break
            values = torch.frombuffer(buf, dtype=dtype, count=take // item, offset=pos)
            pieces.append(TensorPiece(self._index, self._done_in_tensor // item, values))
            pos += take
            self._done_in_tensor += take
            if self._done_in_tensor == size:
                self._index += 1
                self._done_in_tensor = 0
        self._carry = bytes(buf[pos:])
        return pieces


def tensors_from_stream(
    manifest: tensor_pb2.ModelManifest, pieces: Iterable[bytes]
) -> dict[str, torch.Tensor]:
    """Rebuilds named tensors from a whole stream (tests, small models)."""
    out = {
        s.name: torch.empty(spec_numel(s), dtype=torch_dtype(s.dtype)) for s in manifest.tensors
    }
    names = [s.name for s in manifest.tensors]
    decoder = TensorStreamDecoder(manifest)
    for data in pieces:
        for p in decoder.feed(data):
            out[names[p.index]][p.start : p.start + len(p.values)] = p.values
    if not decoder.complete:
        raise ValueError(f"stream ended after {decoder.received} of {decoder.total} bytes")
    return {s.name: out[s.name].reshape(tuple(s.shape)) for s in manifest.tensors}
