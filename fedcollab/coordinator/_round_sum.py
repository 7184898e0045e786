"""A round's running sum, with each upload folded in as its chunks arrive.

Two promises meet here: an update is folded as its chunks arrive (memory stays at one
model whatever the number of institutions), and a half-received update is never part
of the aggregate. Floating-point sums cannot be undone exactly, so an upload that
fails after some of its chunks were folded is not subtracted: the sum is rebuilt from
the spooled chunks of the other uploads. Every chunk is spooled to local disk as it
arrives for that reason; rebuilding happens only when an upload fails part-way.

Under institution-level DP (a clip norm S) an update cannot be folded as it arrives: its
scale min(1, S / ||delta||) is known only once all of it arrived. Its chunks are then
checked and spooled as before, and only their squared norm is summed (float64); when
the upload completes, finish() folds it whole from its spool, scaled, and counts it
once (uniform weights). No update is held in memory; the price is one more sequential
read of each update from local disk. Measured with benchmarks/central_dp_clip.py on a
50M-parameter float32 update (191 MiB, 4 MiB chunks, 2-core VM, best of 3-5, 3 runs):
handling the chunks as they arrive takes 0.43-0.46 s instead of 0.41-0.42 s (summing
squares costs about what folding did), and 0.05 s more runs after the last chunk
(0.11-0.12 s when the spool must come back from disk): about 0.49-0.51 s per update
instead of 0.41 s (1.2x). An upload that fails before it finished was never folded,
so under DP a failure costs no rebuild.

With `max_norm` (or `measure_norms`), each update's L2 norm is summed as it arrives (a
float32 dot per piece) and an update above the bound is refused at finish(); with `keep_updates`
(robust rules, which need every update, not their sum) nothing is folded: the spools
are kept past close() and read back, coordinate block by block, at the commit.

One upload cannot spoil the sum for the others: after each piece is folded, the slice
of the sum it touched is checked to be finite (finite float32 values with a large weight
overflow). The upload that made it non-finite is refused (AggregateOverflow; the
engine answers UPDATE_OVERFLOWS_AGGREGATE) and the sum is rebuilt without it.

At close(), the round's bounds on influence apply (coordinator/_bounds.py): uploads
above the round's own norm bound (`screen_factor`, round 1) are taken out, and weights
above `max_weight_share` of the total are capped. Both change what the sum should hold,
and both use the rebuild from the spools: once, and only in a round where one binds.
Uploads the sum refused itself are listed in `refused`, with the reason.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from fedcollab.aggregation import StreamingFedAvg, clip_scale
from fedcollab.aggregation._fedavg import AggregateOverflow
from fedcollab.coordinator._bounds import screen_bound, water_fill
from fedcollab.coordinator._upload import UploadReceiver
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import TensorPiece


@dataclass
class _Upload:
    receiver: UploadReceiver
    weight: float  # what the update counts for in the mean's denominator
    scale: float  # what its values are multiplied by when folded
    folded: int = 0  # bytes of the stream already in the sum
    state: str = "active"  # active | complete | excluded
    squares: float = 0.0  # with a clip norm: sum of squares of what arrived so far
    norm: float | None = None  # with a clip norm or a norm bound: the whole update's L2 norm, once finished
    claimed: float = 0.0  # the example count it claimed


class NormOutOfBounds(Exception):
    def __init__(self, norm: float, bound: float) -> None:
        super().__init__(f"update L2 norm {norm:.6g} exceeds the study's max_update_norm {bound:.6g}")
        self.norm, self.bound = norm, bound


@dataclass(frozen=True)
class KeptUpdate:
    key: str
    weight: float  # the example count the institution reported
    pieces: Callable[[], Iterator[TensorPiece]]  # a fresh read of the whole update from its spool


class RoundSum:
    """The round's sum. With `clip_norm` (institution-level DP, DP-FedAvg), each update
    is clipped to that L2 norm as a whole and counts once, whatever its example count."""

    def __init__(
        self, *, manifest: tensor_pb2.ModelManifest, piece_bytes: int, clip_norm: float | None = None,
        max_norm: float | None = None, keep_updates: bool = False, max_weight_share: float = 1.0,
        screen_factor: float | None = None, measure_norms: bool = False,
    ) -> None:
        """`max_weight_share` caps each weight at the close (water-filling); `screen_factor`
        refuses, at the close, updates above that factor times the round's median norm;
        `measure_norms` measures every update's norm (accepted_norms()) without a bound."""
        for name, v in (("clip_norm", clip_norm), ("max_norm", max_norm)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be positive and finite, got {v}")
        if keep_updates and clip_norm is not None:
            raise ValueError("keep_updates (robust rules) cannot clip: the config refuses central_dp with them")
        self.max_norm = max_norm
        self.keep_updates = keep_updates
        self.max_weight_share = max_weight_share
        self.screen_factor = screen_factor
        self._norms = max_norm is not None or screen_factor is not None or measure_norms
        # Uploads this sum refused itself (overflow, the close's norm bound): key -> (reason, message).
        self.refused: dict[str, tuple[str, str]] = {}
        self.capped: dict[str, float] = {}  # after close(): key -> the count it claimed, where it counts for less
        self._manifest = manifest
        self._piece_bytes = piece_bytes
        self.clip_norm = clip_norm
        self._sum = StreamingFedAvg(manifest=manifest)
        self._uploads: dict[str, _Upload] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.rebuilds = 0

    def add(self, key: str, *, receiver: UploadReceiver, weight: float, claimed: float | None = None) -> None:
        """`weight` is the update's example count (bounded: coordinator/_bounds.py), `claimed`
        what it said where that was more; with a clip norm it is ignored: an
        institution's own claim must not scale its influence under DP."""
        with self._lock:
            if self.clip_norm is None:
                self._uploads[key] = _Upload(receiver, weight=weight, scale=weight, claimed=claimed or weight)
            else:
                self._uploads[key] = _Upload(receiver, weight=1.0, scale=0.0)  # scale known at finish()

    def fold(self, key: str, pieces: Iterable[TensorPiece], *, upto: int) -> bool:
        """Adds the pieces (the stream up to byte `upto`); False if the upload was
        excluded meanwhile (round closed), and then nothing was added. With a clip norm
        only their squares are summed, and the update is folded by finish()."""
        if self.clip_norm is not None or self.keep_updates:
            return self._measure(key, pieces)
        if self._norms:
            pieces = list(pieces)
            squares = sum(float(torch.dot(p.values, p.values)) for p in pieces)  # outside the lock
        with self._lock:
            u = self._uploads.get(key)
            if u is None or u.state != "active" or self._closed:
                return False
            u.folded = upto  # first: an overflow part-way leaves some of these pieces in the sum
            try:
                self._sum.fold(pieces=pieces, weight=u.weight)
            except AggregateOverflow as e:
                self._refuse(key, u, "UPDATE_OVERFLOWS_AGGREGATE", str(e))
                raise
            if self._norms:
                u.squares += squares
            return True

    def _refuse(self, key: str, u: _Upload, reason: str, message: str) -> None:
        """Caller holds the lock: takes the upload out and the sum back to the others."""
        u.state = "excluded"
        self.refused[key] = (reason, message)
        if u.folded and not self._closed:
            self._rebuild()

    def _measure(self, key: str, pieces: Iterable[TensorPiece]) -> bool:
        squares = 0.0
        for p in pieces:  # outside the lock: uploads measure in parallel
            if self.clip_norm is None and self.max_norm is None:
                continue  # kept for a robust rule, without a bound: the decoding checked every value
            v = p.values.to(torch.float64)  # no float32 rounding of the norm, one piece at a time
            squares += float(torch.dot(v, v))
        with self._lock:
            u = self._uploads.get(key)
            if u is None or u.state != "active" or self._closed:
                return False
            u.squares += squares
            return True

    def finish(self, key: str) -> bool:
        """The upload arrived whole and matched its hash (its receiver is finished).
        Without a clip norm its chunks are already in the sum. With one, its norm is
        now known: the update is folded from its spool, scaled by min(1, S / norm).
        That reads the whole update back, so call it without holding other locks.
        False if the upload was excluded meanwhile, and then nothing was added.
        NormOutOfBounds if its norm exceeds max_norm (then nothing more is folded:
        exclude it)."""
        with self._lock:
            u = self._uploads.get(key)
            if u is None or u.state != "active" or self._closed:
                return False
            if u.norm is None and (self._norms or self.clip_norm is not None):
                u.norm = math.sqrt(u.squares)
                if self.max_norm is not None and u.norm > self.max_norm:
                    raise NormOutOfBounds(u.norm, self.max_norm)
            if self.clip_norm is None or u.folded:
                return True
            assert u.norm is not None  # computed just above whenever there is a clip norm
            u.scale = clip_scale(norm=u.norm, clip_norm=self.clip_norm)
            # Marked folded first: if reading the spool fails part-way, excluding the
            # upload then rebuilds the sum without it.
            u.folded = u.receiver.received
            try:
                self._sum.fold(pieces=u.receiver.pieces(piece_bytes=self._piece_bytes, limit=u.folded),
                               weight=u.scale)
            except AggregateOverflow as e:
                self._refuse(key, u, "UPDATE_OVERFLOWS_AGGREGATE", str(e))
                raise
            return True

    def complete(self, key: str) -> bool:
        """Counts the update (after finish()); False if it was excluded meanwhile."""
        with self._lock:
            u = self._uploads.get(key)
            if u is None or u.state != "active" or self._closed:
                return False
            if self.clip_norm is not None and not u.folded:
                raise RuntimeError(f"finish({key!r}) before complete(): the clipped update is not folded yet")
            u.state = "complete"
            if not self.keep_updates:
                self._sum.count(weight=u.weight)
            return True

    def exclude(self, key: str) -> None:
        with self._lock:
            u = self._uploads.get(key)
            if u is None or u.state == "excluded":
                return
            u.state = "excluded"
            if u.folded and not self._closed:
                self._rebuild()

    def close(self) -> list[str]:
        """Excludes uploads still in flight, applies the round's bounds (the close's norm
        bound, the share cap) and returns the keys of complete ones; the sum then holds
        exactly those, with their capped weights. Spools are removed, but for kept
        updates, which discard() removes once they are aggregated."""
        with self._lock:
            if not self._closed:
                partial = [u for u in self._uploads.values() if u.state == "active"]
                for u in partial:
                    u.state = "excluded"
                stale = any(u.folded for u in partial)
                stale = self._screen() or stale
                stale = self._cap_weights() or stale
                if stale:
                    self._rebuild()
                self.capped = {k: u.claimed for k, u in self._uploads.items()
                               if u.state == "complete" and self.clip_norm is None and u.weight < u.claimed}
                self._closed = True
                for u in self._uploads.values():
                    if not (self.keep_updates and u.state == "complete"):
                        u.receiver.discard()
            return [k for k, u in self._uploads.items() if u.state == "complete"]

    def kept_updates(self) -> list[KeptUpdate]:
        """With keep_updates, after close(): the complete updates, each readable again
        from its spool as often as a rule needs."""
        with self._lock:
            assert self._closed and self.keep_updates, "kept_updates() is for a closed round that keeps its updates"
            return [KeptUpdate(key=k, weight=u.weight, pieces=self._reader(u)) for k, u in self._uploads.items()
                    if u.state == "complete"]

    def _reader(self, u: _Upload) -> Callable[[], Iterator[TensorPiece]]:
        return lambda: u.receiver.pieces(piece_bytes=self._piece_bytes, limit=u.receiver.received)

    def discard(self) -> None:
        """Removes every spool left (kept updates, once aggregated or abandoned)."""
        with self._lock:
            for u in self._uploads.values():
                u.receiver.discard()

    def _screen(self) -> bool:
        """Caller holds the lock. Round 1's norm bound: True if an upload was taken out."""
        if self.screen_factor is None:
            return False
        done = {k: u for k, u in self._uploads.items() if u.state == "complete" and u.norm is not None}
        bound = screen_bound((u.norm for u in done.values()), factor=self.screen_factor)  # type: ignore[misc]
        if bound is None:
            return False
        out = False
        for k, u in done.items():
            assert u.norm is not None
            if u.norm > bound:
                u.state = "excluded"
                self.refused[k] = ("UPDATE_NORM_OUT_OF_BOUNDS", f"update L2 norm {u.norm:.6g} exceeds {bound:.6g} "
                                   f"({self.screen_factor:g} x the median norm of the round's updates)")
                out = out or bool(u.folded)
        return out

    def _cap_weights(self) -> bool:
        """Caller holds the lock. Water-fills the complete uploads' weights; True if a
        folded one changed (the sum must be rebuilt)."""
        if self.clip_norm is not None or self.max_weight_share >= 1:
            return False  # clipped updates count once each: uniform already
        done = {k: u for k, u in self._uploads.items() if u.state == "complete"}
        if not done:
            return False
        capped = water_fill({k: int(u.weight) for k, u in done.items()}, max_share=self.max_weight_share)
        out = False
        for k, u in done.items():
            if capped[k] != u.weight:
                u.weight = u.scale = float(capped[k])
                out = out or bool(u.folded)
        return out

    def weights(self) -> dict[str, float]:
        """What each complete update counts for (after close(): with the share cap)."""
        with self._lock:
            return {k: u.weight for k, u in self._uploads.items() if u.state == "complete"}

    def accepted_norms(self) -> list[float]:
        """The L2 norms of the complete updates, where they were measured."""
        with self._lock:
            return [u.norm for u in self._uploads.values() if u.state == "complete" and u.norm is not None]

    def norm_of(self, key: str) -> float | None:
        with self._lock:
            u = self._uploads.get(key)
            return None if u is None else u.norm

    @property
    def num_updates(self) -> int:
        return self._sum.num_updates

    def update_norms(self) -> list[float]:
        """With a clip norm: the L2 norm of each complete update, before clipping."""
        with self._lock:
            if self.clip_norm is None:
                raise RuntimeError("update norms are measured only with a clip norm")
            return [u.norm for u in self._uploads.values() if u.state == "complete" and u.norm is not None]

    def apply(
        self, base: Mapping[str, torch.Tensor], *, noise_std: float = 0.0, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """base + the mean of the complete updates, plus N(0, noise_std^2) per coordinate."""
        with self._lock:
            assert self._closed, "close() the round's sum before applying it"
            return self._sum.apply(base, noise_std=noise_std, generator=generator)

    def mean_deltas(self, *, noise_std: float = 0.0, generator: torch.Generator | None = None
                    ) -> dict[str, torch.Tensor]:
        """The mean of the complete updates (+ noise), flat per tensor, without the base."""
        with self._lock:
            assert self._closed, "close() the round's sum before applying it"
            return self._sum.mean_deltas(noise_std=noise_std, generator=generator)

    def _rebuild(self) -> None:
        """Caller holds the lock. The sum of every non-excluded upload's folded bytes,
        read back from the spools. Summed in another order than they arrived, uploads
        that cancelled each other's overflow may overflow now: the one that does is
        refused too, and the sum started again (at most once per upload)."""
        while True:
            self.rebuilds += 1
            fresh = StreamingFedAvg(manifest=self._manifest)
            try:
                for key, u in self._uploads.items():
                    if u.state == "excluded" or not u.folded:
                        continue
                    culprit = key
                    fresh.fold(pieces=u.receiver.pieces(piece_bytes=self._piece_bytes, limit=u.folded),
                               weight=u.scale)
                    if u.state == "complete":
                        fresh.count(weight=u.weight)
            except AggregateOverflow as e:
                self._uploads[culprit].state = "excluded"
                self.refused[culprit] = ("UPDATE_OVERFLOWS_AGGREGATE", str(e))
                continue
            self._sum = fresh
            return
