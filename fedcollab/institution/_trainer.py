"""Local training and evaluation. A trainer changes the model in place; the daemon
turns the change into the update it sends."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedcollab.data import ArrayDataset
from fedcollab.v1 import coordinator_service_pb2 as pb

if TYPE_CHECKING:
    from fedcollab.privacy import RoundPrivacy

log = logging.getLogger("fedcollab.institution")


@dataclass(frozen=True)
class TrainResult:
    num_examples: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    accuracy: float


class Trainer(Protocol):
    def train(self, *, model: nn.Module, plan: pb.TrainPlan, round_number: int,
              privacy: RoundPrivacy | None = None) -> TrainResult: ...

    def evaluate(self, *, model: nn.Module) -> EvalResult: ...


def pick_device(preference: str) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = \"cuda\" but no CUDA device is available; use \"auto\" or \"cpu\"")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class TorchTrainer:
    """Supervised training with cross-entropy (classification); with a RoundPrivacy,
    DP-SGD through Opacus (Poisson sampling, per-sample clipping, Gaussian noise).

    `grad_sample_mode` "auto" measures Opacus' modes once per model on synthetic
    inputs and keeps the fastest (cached in `cache_dir`)."""

    def __init__(self, *, train: ArrayDataset, val: ArrayDataset, device: torch.device, seed: int = 0,
                 grad_sample_mode: str = "auto", cache_dir: Path | None = None) -> None:
        if len(train) == 0:
            raise ValueError("the institution has no training examples")
        self._device = device
        self._seed = seed
        self._mode = grad_sample_mode
        self._cache_dir = cache_dir
        self.last_mode: str | None = None
        self._x = torch.from_numpy(train.x).to(device)
        self._y = torch.from_numpy(train.y).to(device)
        self._num_classes = train.num_classes
        self._vx = torch.from_numpy(val.x).to(device)
        self._vy = torch.from_numpy(val.y).to(device)

    @property
    def num_train_examples(self) -> int:
        return len(self._y)

    def train(self, *, model: nn.Module, plan: pb.TrainPlan, round_number: int,
              privacy: RoundPrivacy | None = None) -> TrainResult:
        model.to(self._device).train()
        if privacy is not None:
            return self._train_private(model=model, plan=plan, privacy=privacy)
        params = [p for p in model.parameters() if p.requires_grad]
        if plan.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
        elif plan.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=plan.learning_rate, momentum=plan.momentum, weight_decay=plan.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {plan.optimizer!r}: use \"sgd\" or \"adam\"")
        gen = torch.Generator().manual_seed(self._seed * 100_003 + round_number)
        n, batch = len(self._y), max(1, plan.batch_size)
        mu = plan.proximal_mu
        anchor = [p.detach().clone() for p in params] if mu > 0 else []  # the round's base: FedProx's w_t
        total_loss, seen = 0.0, 0
        for _ in range(max(1, plan.local_epochs)):
            order = torch.randperm(n, generator=gen).to(self._device)
            total_loss, seen = 0.0, 0  # report the last epoch's mean loss
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(self._x[idx]), self._y[idx])
                if mu > 0:
                    loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss.backward()
                opt.step()
                total_loss += float(loss.detach()) * len(idx)
                seen += len(idx)
        return TrainResult(num_examples=n, metrics={"train_loss": total_loss / max(seen, 1)})

    def _train_private(self, *, model: nn.Module, plan: pb.TrainPlan, privacy: RoundPrivacy) -> TrainResult:
        from fedcollab.privacy import train_private

        mode = self._grad_sample_mode(model=model, batch_size=max(1, plan.batch_size))
        done = train_private(
            model=model, x=self._x, y=self._y, epochs=max(1, plan.local_epochs), batch_size=max(1, plan.batch_size),
            optimizer=plan.optimizer, learning_rate=plan.learning_rate, momentum=plan.momentum,
            weight_decay=plan.weight_decay, noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm, mode=mode, proximal_mu=plan.proximal_mu,
        )
        if done.steps != privacy.steps:  # the ledger must hold what really ran
            raise RuntimeError(f"DP-SGD ran {done.steps} steps where {privacy.steps} were accounted")
        return TrainResult(num_examples=len(self._y), metrics={"train_loss": done.mean_loss})

    def _grad_sample_mode(self, *, model: nn.Module, batch_size: int) -> str:
        if self._mode != "auto":
            self.last_mode = self._mode
            return self._mode
        from fedcollab.privacy._modes import choose_grad_sample_mode

        choice = choose_grad_sample_mode(model=model, example_x=self._x[:1], num_classes=self._num_classes,
                                         batch_size=batch_size, cache_dir=self._cache_dir, device=self._device)
        if not choice.cached:
            log.info("DP-SGD per-sample gradients: %s is fastest for this model (%s)", choice.mode,
                     ", ".join(f"{m} {t * 1e3:.1f} ms/step" for m, t in sorted(choice.seconds_per_step.items())))
        self.last_mode = choice.mode
        return choice.mode

    @torch.no_grad()
    def evaluate(self, *, model: nn.Module) -> EvalResult:
        if len(self._vy) == 0:
            return EvalResult(0, 0.0, 0.0)
        model.to(self._device).eval()
        logits = torch.cat([model(self._vx[i : i + 1024]) for i in range(0, len(self._vy), 1024)])
        loss = F.cross_entropy(logits, self._vy).item()
        acc = (logits.argmax(dim=1) == self._vy).float().mean().item()
        return EvalResult(len(self._vy), loss, acc)


class SyntheticTrainer:
    """Adds small seeded noise instead of training, and evaluates nothing. For
    benchmarks and load tests, where the transport and aggregation are measured."""

    def __init__(self, *, seed: int = 0, scale: float = 1e-3) -> None:
        self._seed, self._scale = seed, scale

    @property
    def num_train_examples(self) -> int:
        return 1

    @torch.no_grad()
    def train(self, *, model: nn.Module, plan: pb.TrainPlan, round_number: int,
              privacy: RoundPrivacy | None = None) -> TrainResult:
        gen = torch.Generator().manual_seed(self._seed * 100_003 + round_number)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=self._scale)
        return TrainResult(num_examples=1, metrics={})

    def evaluate(self, *, model: nn.Module) -> EvalResult:
        return EvalResult(0, 0.0, 0.0)
