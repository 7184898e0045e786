"""Local training and evaluation. A trainer changes the model in place; the daemon
turns the change into the update it sends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedcollab.data import ArrayDataset
from fedcollab.v1 import coordinator_service_pb2 as pb


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
    def train(self, *, model: nn.Module, plan: pb.TrainPlan, round_number: int) -> TrainResult: ...

    def evaluate(self, *, model: nn.Module) -> EvalResult: ...


def pick_device(preference: str) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = \"cuda\" but no CUDA device is available; use \"auto\" or \"cpu\"")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class TorchTrainer:
    """Plain supervised training with cross-entropy (classification)."""

    def __init__(self, *, train: ArrayDataset, val: ArrayDataset, device: torch.device, seed: int = 0) -> None:
        if len(train) == 0:
            raise ValueError("the institution has no training examples")
        self._device = device
        self._seed = seed
        self._x = torch.from_numpy(train.x).to(device)
        self._y = torch.from_numpy(train.y).to(device)
        self._vx = torch.from_numpy(val.x).to(device)
        self._vy = torch.from_numpy(val.y).to(device)

    @property
    def num_train_examples(self) -> int:
        return len(self._y)

    def train(self, *, model: nn.Module, plan: pb.TrainPlan, round_number: int) -> TrainResult:
        model.to(self._device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        if plan.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
        elif plan.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=plan.learning_rate, momentum=plan.momentum, weight_decay=plan.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {plan.optimizer!r}: use \"sgd\" or \"adam\"")
        gen = torch.Generator().manual_seed(self._seed * 100_003 + round_number)
        n, batch = len(self._y), max(1, plan.batch_size)
        total_loss, seen = 0.0, 0
        for _ in range(max(1, plan.local_epochs)):
            order = torch.randperm(n, generator=gen).to(self._device)
            total_loss, seen = 0.0, 0  # report the last epoch's mean loss
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(self._x[idx]), self._y[idx])
                loss.backward()
                opt.step()
                total_loss += float(loss.detach()) * len(idx)
                seen += len(idx)
        return TrainResult(num_examples=n, metrics={"train_loss": total_loss / max(seen, 1)})

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
    def train(self, *, model: nn.Module, plan: pb.TrainPlan, round_number: int) -> TrainResult:
        gen = torch.Generator().manual_seed(self._seed * 100_003 + round_number)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=self._scale)
        return TrainResult(num_examples=1, metrics={})

    def evaluate(self, *, model: nn.Module) -> EvalResult:
        return EvalResult(0, 0.0, 0.0)
