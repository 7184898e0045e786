"""Privacy accounting with Opacus' accountants, from a plain history that can be
stored as JSON: a list of (noise_multiplier, sample_rate, steps) triples.

Keeping the history (not an accountant object) as the state means the ledger can
rebuild the exact figure after a restart, and any party can recompute it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedcollab.config import ACCOUNTANTS
from fedcollab.privacy._opacus import PrivacyError

History = list[tuple[float, float, int]]


def compose(history: Sequence[tuple[float, float, int]], *, noise_multiplier: float, sample_rate: float,
            steps: int) -> History:
    """history + (noise, rate, steps), merged into the last entry when its noise and
    rate are the same (as Opacus' own accountants do), so the state stays small."""
    out: History = [(float(z), float(q), int(s)) for z, q, s in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        z, q, s = out[-1]
        out[-1] = (z, q, s + int(steps))
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out


def epsilon_of(*, history: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """The (epsilon, delta)-DP guarantee of the whole history; 0 for an empty one."""
    _check_accountant(accountant)
    if not history or all(s == 0 for _, _, s in history):
        return 0.0
    if any(z <= 0 for z, _, s in history if s > 0):
        return math.inf  # a noiseless step releases the data: no finite epsilon
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(z), float(q), int(s)) for z, q, s in history if s > 0]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier (to 1% in epsilon) for which `steps` steps at
    `sample_rate` stay within (target_epsilon, delta)."""
    _check_accountant(accountant)
    if steps <= 0:
        raise PrivacyError("cannot calibrate noise for zero planned steps")
    try:
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
            accountant=accountant, epsilon_tolerance=0.01,
        ))
    except ValueError as e:  # Opacus: "The privacy budget is too low."
        raise PrivacyError(
            f"no noise level reaches epsilon {target_epsilon} at delta {delta} over {steps} steps at sampling rate "
            f"{sample_rate:.4g} ({e}); raise target_epsilon, or train fewer rounds, epochs or steps"
        ) from None


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {name!r}; use one of {', '.join(ACCOUNTANTS)}")
