"""Server optimizers on the round's mean delta: FedAvgM (Hsu et al. 2019) and FedAdam,
FedYogi, FedAdagrad (Reddi et al. 2021), with the semantics of Flower 1.41's
`flwr.serverapp.strategy` classes of the same names, quirks included.

Every rule is elementwise, so a step works on any slice of the flat parameter vector
(a tensor, or a chunk of one) with the optimizer state sliced alike: the coordinator
never holds a model twice. Flower's pseudo-gradient delta_t = FedAvg(client params) -
current params is, up to rounding, the weighted mean of the institutions' deltas,
which is what the coordinator streams.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

OPTIMIZERS: tuple[str, ...] = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")

# Flower 1.41's defaults per strategy; a setting absent here does not apply to it (FedAdagrad
# pins beta_1 = beta_2 = 0 and takes neither; eta_l, the clients' learning rate, is only stored).
_DEFAULTS: dict[str, dict[str, float]] = {
    "fedavg": {},
    "fedavgm": {"server_learning_rate": 1.0, "server_momentum": 0.0},
    "fedadam": {"eta": 1e-1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedadagrad": {"eta": 1e-1, "tau": 1e-3},
}
_SETTINGS = ("eta", "beta_1", "beta_2", "tau", "server_learning_rate", "server_momentum")
# Decay rates live in [0, 1): at 1 a moment never moves and FedAdam's bias correction divides by 0.
_UNIT_INTERVAL = ("beta_1", "beta_2", "server_momentum")


@dataclass(frozen=True, kw_only=True)
class ServerOptimizerSettings:
    """Which server optimizer, with its hyperparameters; a setting the optimizer does not
    use is None. Build one with `defaults(name, **overrides)` to get Flower's defaults."""

    name: str
    eta: float | None = None  # server learning rate of FedAdam/FedYogi/FedAdagrad
    beta_1: float | None = None  # first-moment decay (FedAdam, FedYogi)
    beta_2: float | None = None  # second-moment decay (FedAdam, FedYogi)
    tau: float | None = None  # adaptivity: added to sqrt(v_t) in the denominator
    server_learning_rate: float | None = None  # FedAvgM
    server_momentum: float | None = None  # FedAvgM; 0 disables the momentum buffer

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError(f"invalid server optimizer settings for {self.name!r}: " + "; ".join(problems))

    @classmethod
    def defaults(cls, name: str, **overrides: float) -> ServerOptimizerSettings:
        """Flower 1.41's defaults for `name`, with `overrides` applied."""
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
        stray = sorted(set(overrides) - set(_DEFAULTS[name]))
        if stray:
            uses = ", ".join(_DEFAULTS[name]) or "no settings"
            raise ValueError(f"{', '.join(stray)} do not apply to server optimizer {name!r} (it uses {uses}): "
                             "remove them or choose another optimizer")
        return cls(name=name, **{**_DEFAULTS[name], **overrides})

    def as_dict(self) -> dict[str, Any]:
        """The settings that apply, for the record."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def _problems(s: ServerOptimizerSettings) -> list[str]:
    """Every problem with the settings, not just the first."""
    if s.name not in OPTIMIZERS:
        return [f"unknown server optimizer: choose one of {', '.join(OPTIMIZERS)}"]
    uses = _DEFAULTS[s.name]
    problems = []
    for key in _SETTINGS:
        value = getattr(s, key)
        if key not in uses:
            if value is not None:
                problems.append(f"{key} does not apply to it (it uses {', '.join(uses) or 'no settings'}): remove it")
            continue
        if value is None:
            problems.append(f"{key} is required (Flower's default is {uses[key]}; "
                            "ServerOptimizerSettings.defaults() fills it in)")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.append(f"{key} must be a finite number, got {value!r}")
            continue
        if key in _UNIT_INTERVAL:
            if not 0.0 <= value < 1.0:
                problems.append(f"{key} must be in [0, 1), got {value}")
        elif value <= 0.0:  # eta, tau, server_learning_rate; tau = 0 would divide 0 by 0 where v_t is 0
            problems.append(f"{key} must be positive, got {value}")
    return problems


class ServerOptimizer:
    """One server optimizer step per round on a slice of the model, in place.

    The state (`state_names`) is elementwise too: hold it per slice, or slice one flat
    buffer per name the same way as the parameters; `step_` updates the tensors it is
    given in place, so views into a larger buffer work.

    Precision: the step runs in the dtype of `params` (float32 or float64). Flower
    computes in numpy float32 for float32 models too, except FedAdam, whose bias-corrected
    rate is a numpy float64 scalar: numpy 2 promotes its update, and so the model it
    returns, to float64. Stepping a float32 model in float32 differs from that by
    float32 rounding only.
    """

    def __init__(self, *, settings: ServerOptimizerSettings) -> None:
        self.settings = settings

    @property
    def state_names(self) -> tuple[str, ...]:
        """The state tensors a step reads and returns, each shaped like the slice.

        FedAdagrad has no m_t: Flower pins its beta_1 to 0, so its m_t is delta_t
        exactly, and storing it would cost a model's worth of memory for nothing."""
        s = self.settings
        if s.name in ("fedadam", "fedyogi"):
            return ("m_t", "v_t")
        if s.name == "fedadagrad":
            return ("v_t",)
        if s.name == "fedavgm" and s.server_momentum:
            return ("momentum",)
        return ()

    def new_state(self, *, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state before the first step: zeros, as Flower starts m_t and v_t.

        FedAvgM's momentum buffer in Flower starts as the first pseudo-gradient itself;
        momentum * 0 + pg is that exactly, so zeros are the same start."""
        return {n: torch.zeros_like(like) for n in self.state_names}

    def step_(self, *, params: torch.Tensor, mean_delta: torch.Tensor, state: dict[str, torch.Tensor] | None,
              server_round: int) -> dict[str, torch.Tensor]:
        """One round's step on a slice: `params` (the base model's values) becomes the new
        model's, in place.

        mean_delta: the weighted mean of the institutions' deltas (aggregated - current)
            for the same slice; cast to params' dtype.
        state: the tensors named by `state_names` for the same slice, updated in place,
            or None before the first step (zeros, as in Flower).
        server_round: the 1-based round number (FedAdam's bias correction uses it, with
            Flower's exponent server_round + 1).
        Returns the state, the same tensors when one was given.
        """
        _check_step(params=params, mean_delta=mean_delta, server_round=server_round)
        delta = mean_delta.to(params.dtype)
        if state is None:
            state = self.new_state(like=params)
        else:
            _check_state(state, names=self.state_names, params=params)
        s = self.settings
        if s.name == "fedavg":
            params.add_(delta)
        elif s.name == "fedavgm":
            _fedavgm_(params, delta, state, lr=_f(s.server_learning_rate), momentum=_f(s.server_momentum))
        else:
            _adaptive_(s, params, delta, state, server_round=server_round)
        return state


def _f(value: float | None) -> float:
    assert value is not None  # the settings' validation guarantees it for the optimizer that reads it
    return float(value)


def _fedavgm_(params: torch.Tensor, delta: torch.Tensor, state: dict[str, torch.Tensor], *, lr: float,
              momentum: float) -> None:
    # Flower: pseudo-gradient pg = old - new = -delta_t (torch.optim.SGD's convention), no Nesterov.
    if momentum == 0.0 and lr == 1.0:
        params.add_(delta)  # Flower skips server optimization then: the new model is FedAvg's
        return
    if momentum > 0.0:
        buf = state["momentum"]
        buf.mul_(momentum).sub_(delta)  # momentum * mv + pg
        params.sub_(buf, alpha=lr)  # old - lr * mv
    else:
        params.add_(delta, alpha=lr)  # old - lr * pg


def _adaptive_(s: ServerOptimizerSettings, params: torch.Tensor, delta: torch.Tensor,
               state: dict[str, torch.Tensor], *, server_round: int) -> None:
    eta, tau = _f(s.eta), _f(s.tau)
    v = state["v_t"]
    if s.name == "fedadagrad":
        m = delta  # beta_1 = 0: m_t = 0 * m_t + 1 * delta_t
        v.addcmul_(delta, delta)  # v_t + delta_t^2
    else:
        beta_1, beta_2 = _f(s.beta_1), _f(s.beta_2)
        m = state["m_t"]
        m.mul_(beta_1).add_(delta, alpha=1.0 - beta_1)
        if s.name == "fedadam":
            v.mul_(beta_2).addcmul_(delta, delta, value=1.0 - beta_2)
            # Flower's bias-corrected rate (Kingma & Ba's alpha_t) with t = server_round + 1.
            eta = eta * math.sqrt(1.0 - beta_2 ** (server_round + 1.0)) / (1.0 - beta_1 ** (server_round + 1.0))
        else:  # fedyogi: v_t - (1 - beta_2) * delta_t^2 * sign(v_t - delta_t^2)
            sq = delta * delta
            sign = torch.sign(v - sq)
            v.addcmul_(sq, sign, value=-(1.0 - beta_2))
            del sq, sign
    denom = v.sqrt().add_(tau)
    params.addcdiv_(m, denom, value=eta)  # x + eta * m_t / (sqrt(v_t) + tau)


def _check_step(*, params: torch.Tensor, mean_delta: torch.Tensor, server_round: int) -> None:
    if params.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"params must be float32 or float64, got {params.dtype}: step a float32 copy of the slice "
                        "and cast the result back, so the optimizer's math keeps its precision")
    if mean_delta.shape != params.shape:
        raise ValueError(f"mean_delta has shape {tuple(mean_delta.shape)} but params {tuple(params.shape)}: pass the "
                         "same slice of both")
    if not mean_delta.is_floating_point():
        raise TypeError(f"mean_delta must be floating point, got {mean_delta.dtype}")
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
        raise ValueError(f"server_round must be an int >= 1 (rounds count from 1, as in Flower), got {server_round!r}")


def _check_state(state: dict[str, torch.Tensor], *, names: tuple[str, ...], params: torch.Tensor) -> None:
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"optimizer state lacks {', '.join(missing)} (has {', '.join(state) or 'nothing'}): pass "
                         "the state the previous step returned, or None before the first step")
    for n in names:
        t = state[n]
        if t.shape != params.shape or t.dtype != params.dtype:
            raise ValueError(f"optimizer state {n!r} is {t.dtype} {tuple(t.shape)} but params are {params.dtype} "
                             f"{tuple(params.shape)}: slice the state the same way as the parameters")
