"""DP-SGD with Opacus: model validation, Poisson-sampled private epochs, and the
per-sample-gradient modes Opacus offers.

Each round trains a private copy of the model: Opacus wraps modules with hooks and
optimizers with clipping and noise, and that wrapping must not outlive the round (the
daemon reuses the plain model for evaluation and the next download).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcollab.errors import FedcollabError

# Opacus' per-sample hooks fire on inputs that need no gradient (the data); harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

# Opacus' ways to compute per-sample gradient norms. "ghost" (fast gradient clipping)
# never materialises per-sample gradients; which is fastest depends on the model.
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "ghost", "functorch")


class PrivacyError(FedcollabError):
    """A privacy setting or model that DP-SGD cannot work with."""


def validate_model(model: nn.Module) -> None:
    """Opacus needs layers whose per-sample gradients it can compute; BatchNorm mixes
    examples within a batch and is refused. Offers the fix instead of a stack trace."""
    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return
    listed = "; ".join(str(e) for e in errors[:5])
    fixable = ModuleValidator.is_valid(ModuleValidator.fix(copy.deepcopy(model)))
    fix = (
        "Opacus' ModuleValidator.fix can repair it (BatchNorm -> GroupNorm): build the model with "
        "GroupNorm/LayerNorm instead, so every institution trains the same architecture"
        if fixable else
        "replace those layers with ones Opacus supports (Linear, Conv, LayerNorm, GroupNorm, Embedding, ...)"
    )
    raise PrivacyError(f"the model cannot be trained with DP-SGD: {listed}. Fix: {fix}")


def batches_per_epoch(*, num_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(num_examples / batch_size))


def sample_rate_for(*, num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate of one step, as Opacus derives it from the data loader."""
    return 1.0 / batches_per_epoch(num_examples=num_examples, batch_size=batch_size)


@dataclass(frozen=True)
class PrivateEpochs:
    steps: int
    mean_loss: float


def make_optimizer(params: list[nn.Parameter], *, name: str, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use \"sgd\" or \"adam\"")


def train_private(
    *,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    optimizer: str,
    learning_rate: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    noise_multiplier: float,
    max_grad_norm: float,
    mode: str,
    generator: torch.Generator | None = None,
    proximal_mu: float = 0.0,
) -> PrivateEpochs:
    """Trains `model` in place with DP-SGD for `epochs` Poisson-sampled epochs.

    The number of optimizer steps is epochs x ceil(n / batch_size) with sampling rate
    1 / ceil(n / batch_size), exactly what the accountant is told.

    FedProx's proximal term (proximal_mu) is not part of the clipped loss: its gradient
    mu * (w - w_round) depends on no example, so it is applied after each private step,
    scaled by the learning rate (post-processing, free of privacy cost). Per-sample
    clipping would otherwise clip it along with the data's gradient.
    """
    if mode not in GRAD_SAMPLE_MODES:
        raise PrivacyError(f"unknown grad_sample_mode {mode!r}; use one of {', '.join(GRAD_SAMPLE_MODES)} or \"auto\"")
    work = copy.deepcopy(model).train()
    opt = make_optimizer([p for p in work.parameters() if p.requires_grad], name=optimizer, lr=learning_rate,
                         momentum=momentum, weight_decay=weight_decay)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, generator=generator)
    # Noise is drawn on the parameters' device; a CPU generator only serves CPU models.
    on_cpu = next(work.parameters()).device.type == "cpu"
    with warnings.catch_warnings():
        # Opacus warns that secure_mode (torchcsprng) is off; the caveat is in our docs.
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")  # its accountant is unused: the ledger accounts
        wrapped = engine.make_private(
            module=work, optimizer=opt, data_loader=loader, criterion=nn.CrossEntropyLoss(),
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=True,
            grad_sample_mode=mode, noise_generator=generator if on_cpu else None,
        )
    if mode == "ghost":
        private_model, private_opt, criterion, private_loader = wrapped
    else:
        private_model, private_opt, private_loader = wrapped
        criterion = None
    trained = [p for p in work.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in trained] if proximal_mu > 0 else []

    def proximal_step() -> None:
        if anchor:
            with torch.no_grad():
                for p, a in zip(trained, anchor, strict=True):
                    p.add_(p - a, alpha=-learning_rate * proximal_mu)

    steps, total_loss, seen = 0, 0.0, 0
    for _ in range(epochs):
        total_loss, seen = 0.0, 0  # report the last epoch's loss, like the plain trainer
        for xb, yb in private_loader:
            private_opt.zero_grad(set_to_none=True)
            if len(yb) == 0:  # Poisson sampling can draw an empty batch: still a step (noise only)
                private_opt.step()
                proximal_step()
                steps += 1
                continue
            out = private_model(xb)
            loss = criterion(out, yb) if criterion is not None else F.cross_entropy(out, yb)
            loss.backward()
            private_opt.step()
            proximal_step()
            steps += 1
            total_loss += float(loss.detach()) * len(yb)
            seen += len(yb)
    private_model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for dst, src in zip(model.parameters(), work.parameters(), strict=True):
            dst.copy_(src)
    return PrivateEpochs(steps=steps, mean_loss=total_loss / max(seen, 1))
