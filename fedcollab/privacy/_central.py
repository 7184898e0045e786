"""Institution-level DP at the coordinator (DP-FedAvg), round to round: the clip norm,
fixed or adaptive, and the federation's (epsilon, delta) from the real accountant.

Accounting: each committed round is one step of the Gaussian mechanism with noise
multiplier z and sample rate q = 1. No amplification by subsampling is claimed: a
round's institutions are a fixed-size selection among those online, not a Poisson
sample, which is what the accountants' subsampled-Gaussian analysis assumes. With
adaptive clipping, z covers both the updates' noise (z_delta) and the noised count's
(sigma_b) by construction (Andrew et al. 2021, Thm. 1), so the step is still (z, 1).

Nothing moves until a round commits: release() computes what a round would release,
commit() takes it on. A failed round releases nothing and costs nothing. The state
survives a restart in the committed rounds' metrics (the noise multiplier each used,
and the clip norm for the next round), so a restarted coordinator rebuilds it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedcollab.aggregation import next_clip_norm, noise_generator, noise_std, update_noise_multiplier
from fedcollab.config import CentralDPConfig
from fedcollab.privacy._accounting import History, compose, epsilon_of

log = logging.getLogger("fedcollab.privacy")

SAMPLE_RATE = 1.0  # see the module's docstring: no amplification by subsampling


@dataclass(frozen=True)
class CentralRelease:
    """What one round releases under central DP; taken on by CentralDP.commit()."""

    clip_norm: float  # S used this round
    clip_norm_next: float  # S for the next round (= S without adaptive clipping)
    noise_std: float  # z_delta * S / n, per coordinate of the average
    history: History  # the accountant's history including this round
    metrics: dict[str, float]  # to record with the committed round


class CentralDP:
    """Round-to-round state of DP-FedAvg.

    `rounds` are the store's rounds (dicts with status and metrics), in order: the
    committed ones that used central DP give the history and the current clip norm.
    """

    def __init__(self, *, config: CentralDPConfig, rounds: Sequence[Mapping[str, Any]] = ()) -> None:
        self.config = config
        a = config.adaptive
        self.update_noise_multiplier = update_noise_multiplier(
            noise_multiplier=config.noise_multiplier, count_noise_multiplier=a.count_noise_multiplier if a else None
        )
        self._history: History = []
        self._clip_norm = config.clip_norm
        without = 0
        for r in rounds:
            if r["status"] != "committed":
                continue
            m = r["metrics"]
            if "central_dp_noise_multiplier" not in m:
                without += 1
                continue
            self._history = compose(self._history, noise_multiplier=float(m["central_dp_noise_multiplier"]),
                                    sample_rate=SAMPLE_RATE, steps=1)
            if a is not None and "clip_norm_next" in m:
                self._clip_norm = float(m["clip_norm_next"])
        if without and self._history:
            log.warning("%d rounds were committed without central DP: the federation's epsilon covers only "
                        "the %d rounds that used it", without, sum(s for _, _, s in self._history))
        if config.noise_multiplier == 0:
            log.warning("central_dp.noise_multiplier is 0: updates are clipped and averaged uniformly, but no "
                        "noise is added, so no privacy is given (epsilon is infinite)")

    @property
    def clip_norm(self) -> float:
        """S for the next round to open."""
        return self._clip_norm

    @property
    def history(self) -> History:
        return list(self._history)

    def release(self, *, update_norms: Sequence[float], generator: torch.Generator | None = None) -> CentralRelease:
        """The figures of a round whose accepted updates had these norms (before
        clipping), clipped to the current S. Draws the adaptive count's noise."""
        n = len(update_norms)
        if n == 0:
            raise ValueError("no update was aggregated")
        c, s = self.config, self._clip_norm
        unclipped = sum(1 for v in update_norms if v <= s)
        s_next = s
        if c.adaptive is not None:
            s_next = next_clip_norm(
                clip_norm=s, num_unclipped=unclipped, num_updates=n, target_quantile=c.adaptive.target_quantile,
                learning_rate=c.adaptive.learning_rate, count_noise_multiplier=c.adaptive.count_noise_multiplier,
                generator=generator if generator is not None else noise_generator(),
            )
        std = noise_std(update_noise_multiplier=self.update_noise_multiplier, clip_norm=s, num_updates=n)
        history = compose(self._history, noise_multiplier=c.noise_multiplier, sample_rate=SAMPLE_RATE, steps=1)
        with np.errstate(divide="ignore"):  # PRV takes log(1 - q), -inf at q = 1, and handles it
            epsilon = epsilon_of(history=history, delta=c.delta, accountant=c.accountant)
        metrics = {
            "central_dp_epsilon": epsilon,
            "central_dp_delta": c.delta,
            "central_dp_noise_multiplier": c.noise_multiplier,
            "central_dp_update_noise_multiplier": self.update_noise_multiplier,
            "clip_norm": s,
            "clip_norm_next": s_next,
            "noise_std": std,
            # The coordinator's own diagnostic, not a DP release: keep it with the operator.
            "clipped_fraction": (n - unclipped) / n,
        }
        if not math.isfinite(s_next) or s_next <= 0:
            raise ArithmeticError(f"adaptive clipping produced clip norm {s_next} from {s}")
        return CentralRelease(clip_norm=s, clip_norm_next=s_next, noise_std=std, history=history, metrics=metrics)

    def commit(self, release: CentralRelease) -> None:
        """The round committed: its release is spent and the clip norm moves on."""
        self._history = list(release.history)
        self._clip_norm = release.clip_norm_next

    def epsilon(self) -> float:
        """The federation's epsilon over the committed rounds (0 before any)."""
        with np.errstate(divide="ignore"):
            return epsilon_of(history=self._history, delta=self.config.delta, accountant=self.config.accountant)
