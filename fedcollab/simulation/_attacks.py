"""Poisoned institutions for rehearsing robust rules: the institution trains honestly,
then sends a corrupted update. Simulation only: a daemon's own config has no such
setting, and these trainers exist only inside `fedcollab simulate`.

- sign_flip: base - scale * delta (the honest update, reversed and amplified);
- scale: base + scale * delta (a boosted update, as in model-replacement attacks);
- random: base + Gaussian noise whose norm is scale x the honest update's, per tensor.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedcollab.institution._trainer import EvalResult, Trainer, TrainResult
from fedcollab.v1 import coordinator_service_pb2 as pb

if TYPE_CHECKING:
    from fedcollab.privacy import RoundPrivacy

ATTACKS: tuple[str, ...] = ("sign_flip", "scale", "random")


class PoisoningTrainer:
    """Wraps an institution's real trainer and corrupts what it trained."""

    def __init__(self, *, inner: Trainer, kind: str, scale: float, seed: int) -> None:
        if kind not in ATTACKS:
            raise ValueError(f"unknown attack {kind!r}; use one of {', '.join(ATTACKS)}")
        self._inner = inner
        self.kind = kind
        self.scale = scale
        self._generator = torch.Generator().manual_seed(seed)

    def __getattr__(self, name: str) -> object:  # num_train_examples, last_mode, ...
        return getattr(self._inner, name)

    def train(self, *, model: nn.Module, plan: pb.TrainPlan, round_number: int,
              privacy: RoundPrivacy | None = None) -> TrainResult:
        state = model.state_dict()
        base = {n: t.detach().clone() for n, t in state.items()}
        result = self._inner.train(model=model, plan=plan, round_number=round_number, privacy=privacy)
        with torch.no_grad():
            for name, value in model.state_dict().items():
                delta = value - base[name]
                if self.kind == "sign_flip":
                    value.copy_(base[name] - self.scale * delta)
                elif self.kind == "scale":
                    value.copy_(base[name] + self.scale * delta)
                else:
                    noise = torch.randn(delta.shape, generator=self._generator, dtype=delta.dtype)
                    norm = float(delta.norm()) * self.scale / max(math.sqrt(delta.numel()), 1.0)
                    value.copy_(base[name] + noise * norm)
        return result

    def evaluate(self, *, model: nn.Module) -> EvalResult:
        return self._inner.evaluate(model=model)
