"""int8 with one float32 scale per block of B elements.

Blocks are laid per tensor (a block never spans two tensors, the last block of a tensor
may be shorter), so a bias is never scaled by a weight matrix's largest entry. Each
block travels as one record: its float32 scale (little-endian), then its int8 values.
Interleaving the scale with its values lets a chunk be decoded as soon as it arrives.

scale = max|x| / 127 over the block; q = round-to-nearest(x / scale) in [-127, 127];
decoded x' = q * scale, so |x - x'| <= scale / 2 for every element (up to float32
rounding). Round-to-nearest rather than stochastic rounding: deterministic (the same
update always encodes to the same bytes), and half the worst-case error. Stochastic
rounding's unbiasedness matters at a few bits (QSGD); at 8 bits with per-block scales
the error is 1/254 of the block's largest entry, far below SGD's own noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedcollab.compression._base import RecordDecoder
from fedcollab.compression._errors import EncodingError
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import TensorPiece, spec_numel

_SCALE_BYTES = 4
# Largest scale whose decoded values stay finite in float32: 127 * scale <= float32 max.
_MAX_SCALE = torch.finfo(torch.float32).max / 127


def int8_nbytes(numel: int, *, block: int) -> int:
    """One tensor's encoded size: its elements plus one scale per (possibly short) block."""
    return numel + _SCALE_BYTES * -(-numel // block)


def _records(x: torch.Tensor, block: int) -> torch.Tensor:
    """x: [m, n] float32 rows of one block each -> [m, 4 + n] uint8 records."""
    scale = x.abs().amax(dim=1) / 127  # [m]; NaN/Inf in a block make its scale NaN/Inf: refused
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (x / safe[:, None]).round_().clamp_(-127, 127).to(torch.int8)  # [m, n]
    return torch.cat([scale[:, None].contiguous().view(torch.uint8), q.view(torch.uint8)], dim=1)


def encode_int8(tensors: Sequence[torch.Tensor], *, block: int) -> list[torch.Tensor]:
    """Each tensor's records, as one flat uint8 tensor per tensor."""
    out = []
    for t in tensors:
        flat = t.detach().to("cpu", torch.float32).reshape(-1)
        full = flat.numel() // block * block
        parts = [_records(flat[:full].reshape(-1, block), block).reshape(-1)]
        if full < flat.numel():
            parts.append(_records(flat[full:].reshape(1, -1), block).reshape(-1))
        out.append(torch.cat(parts))
    return out


class Int8Decoder(RecordDecoder):
    def __init__(self, *, manifest: tensor_pb2.ModelManifest, block: int) -> None:
        self._numel = [spec_numel(s) for s in manifest.tensors]
        self._names = [s.name for s in manifest.tensors]
        self._block = block
        self._index = 0  # tensor being decoded
        self._done = 0  # its elements decoded so far (a multiple of block until its last)
        super().__init__(total=sum(int8_nbytes(n, block=block) for n in self._numel))

    def _decode(self, buf: bytearray) -> tuple[list[TensorPiece], int]:
        pieces: list[TensorPiece] = []
        pos = 0
        while self._index < len(self._numel):
            numel = self._numel[self._index]
            left = numel - self._done
            if left == 0:  # an empty tensor, or one just finished
                self._index, self._done = self._index + 1, 0
                continue
            n = min(self._block, left)  # elements per record here (short only for the last block)
            size = _SCALE_BYTES + n
            m = min((len(buf) - pos) // size, left // n)  # whole records available, all of n elements
            if m == 0:
                break
            rec = np.frombuffer(buf, dtype=np.dtype([("scale", "<f4"), ("q", "i1", (n,))]), count=m, offset=pos)
            scale = torch.from_numpy(rec["scale"].copy())[:, None]  # [m, 1]
            q = torch.from_numpy(rec["q"])  # [m, n], a view of buf: used at once
            self._check(scale, q)
            pieces.append(TensorPiece(self._index, self._done, (q.to(torch.float32) * scale).reshape(-1)))
            pos += m * size
            self._done += m * n
        return pieces, pos

    def _check(self, scale: torch.Tensor, q: torch.Tensor) -> None:
        name = self._names[self._index]
        if not bool(torch.isfinite(scale).all()):
            raise EncodingError("NON_FINITE_VALUES", f"tensor {name!r} has a NaN or Inf int8 scale", tensor=name)
        if bool(((scale < 0) | (scale > _MAX_SCALE)).any()):
            raise EncodingError("INVALID_SCALE", f"tensor {name!r} has an int8 scale outside [0, {_MAX_SCALE:.3g}]",
                                tensor=name)
        if bool((q == -128).any()):
            raise EncodingError("VALUE_OUT_OF_RANGE", f"tensor {name!r} has an int8 value of -128; the encoding "
                                "uses [-127, 127]", tensor=name)
