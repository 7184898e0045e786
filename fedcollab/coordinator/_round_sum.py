"""A round's running sum, with each upload folded in as its chunks arrive.

Two promises meet here: an update is folded as its chunks arrive (memory stays at one
model whatever the number of institutions), and a half-received update is never part
of the aggregate. Floating-point sums cannot be undone exactly, so an upload that
fails after some of its chunks were folded is not subtracted: the sum is rebuilt from
the spooled chunks of the other uploads. Every chunk is spooled to local disk as it
arrives for that reason; rebuilding happens only when an upload fails part-way.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedcollab.aggregation import StreamingFedAvg
from fedcollab.coordinator._upload import UploadReceiver
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import TensorPiece


@dataclass
class _Upload:
    receiver: UploadReceiver
    weight: float
    folded: int = 0  # bytes of the stream already in the sum
    state: str = "active"  # active | complete | excluded


class RoundSum:
    def __init__(self, *, manifest: tensor_pb2.ModelManifest, piece_bytes: int) -> None:
        self._manifest = manifest
        self._piece_bytes = piece_bytes
        self._sum = StreamingFedAvg(manifest=manifest)
        self._uploads: dict[str, _Upload] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.rebuilds = 0

    def add(self, key: str, *, receiver: UploadReceiver, weight: float) -> None:
        with self._lock:
            self._uploads[key] = _Upload(receiver, weight)

    def fold(self, key: str, pieces: Iterable[TensorPiece], *, upto: int) -> bool:
        """Adds the pieces (the stream up to byte `upto`); False if the upload was
        excluded meanwhile (round closed), and then nothing was added."""
        with self._lock:
            u = self._uploads.get(key)
            if u is None or u.state != "active" or self._closed:
                return False
            self._sum.fold(pieces=pieces, weight=u.weight)
            u.folded = upto
            return True

    def complete(self, key: str) -> bool:
        with self._lock:
            u = self._uploads.get(key)
            if u is None or u.state != "active" or self._closed:
                return False
            u.state = "complete"
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
        """Excludes uploads still in flight and returns the keys of complete ones; the
        sum then holds exactly those. Spools are removed."""
        with self._lock:
            if not self._closed:
                partial = [u for u in self._uploads.values() if u.state == "active"]
                for u in partial:
                    u.state = "excluded"
                if any(u.folded for u in partial):
                    self._rebuild()
                self._closed = True
                for u in self._uploads.values():
                    u.receiver.discard()
            return [k for k, u in self._uploads.items() if u.state == "complete"]

    @property
    def num_updates(self) -> int:
        return self._sum.num_updates

    def apply(self, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._lock:
            assert self._closed, "close() the round's sum before applying it"
            return self._sum.apply(base)

    def _rebuild(self) -> None:
        """Caller holds the lock. The sum of every non-excluded upload's folded bytes,
        read back from the spools."""
        self.rebuilds += 1
        fresh = StreamingFedAvg(manifest=self._manifest)
        for u in self._uploads.values():
            if u.state == "excluded" or not u.folded:
                continue
            fresh.fold(pieces=u.receiver.pieces(piece_bytes=self._piece_bytes, limit=u.folded), weight=u.weight)
            if u.state == "complete":
                fresh.count(weight=u.weight)
        self._sum = fresh
