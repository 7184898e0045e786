"""A secure-aggregation round's running sum: masked uploads added mod 2^bits as their
chunks arrive, in a uint32 vector of the model's size.

Modular sums are exact, so an upload that fails part-way is subtracted back out (its
folded chunks read back from its spool), no rebuild needed. The coordinator never
holds an unmasked update: only this sum, and, once the round's survivors are known,
the masks to remove come from the revealed shares (unmask()), after which the sum is
decoded to floats and applied to the base model chunk by chunk.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from fedcollab.coordinator._upload import UploadReceiver
from fedcollab.secagg import Quantizer, SecAggError, apply_masks
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import TensorPiece, spec_numel

_APPLY_ELEMS = 1 << 20


@dataclass
class _Upload:
    receiver: UploadReceiver
    folded: int = 0  # bytes of the stream already in the sum
    state: str = "active"  # active | complete | excluded


class MaskedSum:
    def __init__(self, *, model_manifest: tensor_pb2.ModelManifest, quantizer: Quantizer, piece_bytes: int,
                 weighted: bool = False, clip: float = float("inf"), max_weight: float = 1.0) -> None:
        """`weighted`: each upload ends with its weight (one more element), and the
        mean divides by their sum; `clip`: the clipping range honest updates keep to."""
        self._model_manifest = model_manifest
        self.model_dim = sum(spec_numel(s) for s in model_manifest.tensors)
        self.weighted = weighted
        self.clip = clip
        self.max_weight = max_weight
        self.dim = self.model_dim + (1 if weighted else 0)
        self.quantizer = quantizer
        self._keep = np.uint32((1 << quantizer.bits) - 1 if quantizer.bits < 32 else 0xFFFFFFFF)
        self._sum = np.zeros(self.dim, dtype=np.uint32)
        self._piece_bytes = piece_bytes
        self._uploads: dict[str, _Upload] = {}
        self._lock = threading.Lock()
        self._closed = False

    def add(self, key: str, *, receiver: UploadReceiver, weight: float) -> None:
        with self._lock:
            self._uploads[key] = _Upload(receiver)

    def _fold_values(self, pieces: Iterable[TensorPiece], sign: int) -> None:
        """Caller holds the lock."""
        for p in pieces:
            values = p.values.numpy()
            view = self._sum[p.start:p.start + len(values)]
            if sign > 0:
                view += values  # wraps mod 2^32
            else:
                view -= values
            view &= self._keep

    def fold(self, key: str, pieces: Iterable[TensorPiece], *, upto: int) -> bool:
        with self._lock:
            u = self._uploads.get(key)
            if u is None or u.state != "active" or self._closed:
                return False
            self._fold_values(pieces, +1)
            u.folded = upto
            return True

    def finish(self, key: str) -> bool:
        with self._lock:
            u = self._uploads.get(key)
            return u is not None and u.state == "active" and not self._closed

    def complete(self, key: str) -> bool:
        with self._lock:
            u = self._uploads.get(key)
            if u is None or u.state != "active" or self._closed:
                return False
            u.state = "complete"
            return True

    def _subtract(self, u: _Upload) -> None:
        """Caller holds the lock: takes an upload's folded chunks back out, exactly."""
        if u.folded:
            self._fold_values(u.receiver.pieces(piece_bytes=self._piece_bytes, limit=u.folded), -1)
            u.folded = 0

    def exclude(self, key: str) -> None:
        with self._lock:
            u = self._uploads.get(key)
            if u is None or u.state == "excluded":
                return
            u.state = "excluded"
            if not self._closed:
                self._subtract(u)

    def close(self) -> list[str]:
        """Takes uploads still in flight back out; returns the keys of complete ones."""
        with self._lock:
            if not self._closed:
                for u in self._uploads.values():
                    if u.state == "active":
                        u.state = "excluded"
                        self._subtract(u)
                self._closed = True
                for u in self._uploads.values():
                    u.receiver.discard()
            return [k for k, u in self._uploads.items() if u.state == "complete"]

    def unmask_mean(self, *, add: list[bytes], subtract: list[bytes], count: int) -> dict[str, torch.Tensor]:
        """The mean of the survivors' updates, flat float32 per tensor: the masks are
        removed chunk by chunk (vectorized keystreams) and the signed integers decoded
        into the sum's own memory (4 bytes per element either way), so unmasking holds
        one model; the caller adds the base from its file.

        Weighted, the divisor is the unmasked sum of weights, which honest uploads keep
        in [count / max_weight, count]; any other is refused (SecAggError), and each
        coordinate of the mean is held to the clipping range, where the mean of
        honest updates lies. What one hostile institution can still do is move each
        coordinate of the mean anywhere inside that range (its masked vector cannot
        be checked)."""
        with self._lock:
            assert self._closed, "close() the round's sum before unmasking it"
            divisor = float(count)
            if self.weighted:
                last = apply_masks(self._sum[self.model_dim:], start=self.model_dim, bits=self.quantizer.bits,
                                   add=add, subtract=subtract)
                divisor = float(self.quantizer.decode(last)[0])
                if not 0.5 * count / self.max_weight <= divisor <= count + 0.5:
                    raise SecAggError("SECAGG_BAD_WEIGHT", f"the unmasked weights sum to {divisor:.6g}, outside what "
                                      f"{count} honest uploads can sum to: an institution masked a forged weight")
            values = self._sum.view(np.float32)
            for a in range(0, self.model_dim, _APPLY_ELEMS):
                plain = apply_masks(self._sum[a:min(a + _APPLY_ELEMS, self.model_dim)], start=a,
                                    bits=self.quantizer.bits, add=add, subtract=subtract)  # a copy
                values[a:a + len(plain)] = np.clip(self.quantizer.decode(plain) / divisor, -self.clip, self.clip)
            out: dict[str, torch.Tensor] = {}
            start = 0
            for spec in self._model_manifest.tensors:
                n = spec_numel(spec)
                out[spec.name] = torch.from_numpy(values[start:start + n])
                start += n
            self._sum = np.zeros(0, dtype=np.uint32)  # the returned tensors keep the buffer alive
            return out
