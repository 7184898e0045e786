"""The update a round paid for, kept on disk beside the privacy ledger's row.

Under DP-SGD the row is written (and the update kept here) before the update leaves.
Whenever the coordinator asks again for that round on that base model (a retried
attempt, a coordinator restart, or this daemon's own restart mid-upload), this file is
the answer: re-sending it reveals nothing new, training again would spend again. One
file per (round, base model), the newest only: it is replaced when the next round is
trained, and removed when the study finishes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedcollab.v1 import coordinator_service_pb2 as pb

FOLDER = "pending-updates"


@dataclass(frozen=True)
class Kept:
    deltas: list[torch.Tensor]
    num_examples: int
    metrics: dict[str, float]


class KeptUnavailable(Exception):
    """No usable kept update for this task (missing or unreadable); the message says which."""


class OtherShape(Exception):
    """An update is kept for this round and base, but the task asks for other tensors."""


def manifest_key(task: pb.Task) -> str:
    """The tensors an update for this task must hold, in order (names, dtypes, shapes)."""
    return json.dumps([[t.name, int(t.dtype), list(t.shape)] for t in task.manifest.tensors], separators=(",", ":"))


class KeptUpdates:
    def __init__(self, *, state_dir: Path) -> None:
        self.folder = Path(state_dir) / FOLDER

    def path(self, task: pb.Task) -> Path:
        """One file per (round, base model): every attempt of that assignment finds it."""
        base = "".join(c for c in task.model.sha256 if c in "0123456789abcdef")[:64]
        return self.folder / f"round-{int(task.round)}-{base}.safetensors"

    def keep(self, task: pb.Task, deltas: list[torch.Tensor], *, num_examples: int,
             metrics: dict[str, float]) -> None:
        """Durably, replacing the one kept before."""
        self.drop()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(task)
        tmp = path.with_suffix(".tmp")
        names = [s.name for s in task.manifest.tensors]
        save_file(dict(zip(names, deltas, strict=True)), str(tmp),
                  metadata={"round": str(task.round), "nonce": task.nonce, "base_sha256": task.model.sha256,
                            "num_examples": str(num_examples), "metrics": json.dumps(metrics),
                            "manifest": manifest_key(task)})
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, task: pb.Task) -> Kept:
        """The update kept for this task's round and base; KeptUnavailable, or OtherShape."""
        try:
            with safe_open(str(self.path(task)), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("manifest", manifest_key(task)) != manifest_key(task):
                    raise OtherShape(f"round {task.round} is kept with other tensors than this task names")
                deltas = [f.get_tensor(s.name) for s in task.manifest.tensors]
            return Kept(deltas=deltas, num_examples=int(meta.get("num_examples", "1")),
                        metrics=json.loads(meta.get("metrics", "{}")))
        except (OSError, safetensors.SafetensorError, KeyError, ValueError) as e:
            raise KeptUnavailable(str(e) or type(e).__name__) from None

    def drop(self) -> None:
        if self.folder.is_dir():
            for f in self.folder.iterdir():
                f.unlink(missing_ok=True)
