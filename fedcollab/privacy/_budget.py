"""The institution's side of privacy: calibrate the noise for the study it joined,
refuse what would exceed its budget, and record the spend before anything leaves.

The coordinator's task only says how to train (epochs, batch size); what that costs
is worked out here from the institution's own ledger, config and data size. A
coordinator asking for more rounds or steps than planned cannot raise the budget: the
projected spend is checked against it before every round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedcollab.config import PrivacyConfig
from fedcollab.privacy._accounting import History, calibrate_noise, compose, epsilon_of
from fedcollab.privacy._ledger import LedgerEntry, PrivacyLedger
from fedcollab.privacy._opacus import PrivacyError, batches_per_epoch, sample_rate_for


class BudgetExhausted(PrivacyError):
    """This round would take the institution past its privacy budget."""

    def __init__(self, message: str, *, spent: float, would_be: float, budget: float) -> None:
        super().__init__(message)
        self.spent, self.would_be, self.budget = spent, would_be, budget


@dataclass(frozen=True)
class RoundPrivacy:
    """What one round of private training will use and cost."""

    study: str
    round: int
    nonce: str
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    epsilon_before: float
    epsilon_after: float
    delta: float
    budget: float
    accountant: str
    history_after: tuple[tuple[float, float, int], ...]


class InstitutionPrivacy:
    def __init__(self, *, config: PrivacyConfig, ledger: PrivacyLedger, num_examples: int) -> None:
        if num_examples <= 0:
            raise PrivacyError("DP-SGD needs training examples; this institution has none")
        if config.target_delta >= 1.0 / num_examples:
            raise PrivacyError(
                f"privacy.target_delta = {config.target_delta} is not below 1/n = {1.0 / num_examples:.3g} for "
                f"{num_examples} examples: a delta that large allows releasing whole records. Use a delta well "
                f"below 1/n, e.g. {10 ** math.floor(math.log10(0.1 / num_examples)):.0e}"
            )
        self.config = config
        self.ledger = ledger
        self._n = num_examples

    def spent(self, *, study: str) -> float:
        return self.ledger.spent(study=study)

    def recorded(self, *, study: str, round_number: int, nonce: str) -> LedgerEntry | None:
        """The spend already recorded for exactly this assignment (a restart after the
        ledger row was written, before or during the upload)."""
        return self.ledger.find(study=study, round=round_number, nonce=nonce)

    def plan(self, *, study: str, total_rounds: int, round_number: int, nonce: str, epochs: int,
             batch_size: int) -> RoundPrivacy:
        """The noise and cost of this round, or BudgetExhausted. Spends nothing."""
        c = self.config
        rate = sample_rate_for(num_examples=self._n, batch_size=batch_size)
        steps = max(1, epochs) * batches_per_epoch(num_examples=self._n, batch_size=batch_size)
        history: History = list(self.ledger.history(study=study))
        if history:
            noise = history[0][0]  # calibrated once per study, at its first round
        else:
            noise = calibrate_noise(target_epsilon=c.target_epsilon, delta=c.target_delta, sample_rate=rate,
                                    steps=steps * max(1, total_rounds), accountant=c.accountant)
        before = self.ledger.spent(study=study)
        after_history = compose(history, noise_multiplier=noise, sample_rate=rate, steps=steps)
        after = epsilon_of(history=after_history, delta=c.target_delta, accountant=c.accountant)
        if after > c.budget * (1 + 1e-9):
            raise BudgetExhausted(
                f"round {round_number} of study {study!r} would spend epsilon {after - before:.3f} more "
                f"({before:.3f} -> {after:.3f}), past this institution's budget of {c.budget:g} "
                f"(delta {c.target_delta:g}, {c.accountant} accountant)",
                spent=before, would_be=after, budget=c.budget,
            )
        return RoundPrivacy(
            study=study, round=round_number, nonce=nonce, noise_multiplier=noise, max_grad_norm=c.max_grad_norm,
            sample_rate=rate, steps=steps, epsilon_before=before, epsilon_after=after, delta=c.target_delta,
            budget=c.budget, accountant=c.accountant, history_after=tuple(after_history),
        )

    def record(self, rp: RoundPrivacy, *, update_sha256: str) -> LedgerEntry:
        """Durably records the spend; call before the update leaves the institution."""
        return self.ledger.append(
            study=rp.study, round=rp.round, nonce=rp.nonce, epsilon=rp.epsilon_after, delta=rp.delta,
            noise_multiplier=rp.noise_multiplier, sample_rate=rp.sample_rate, steps=rp.steps,
            accountant=rp.accountant, history=[list(h) for h in rp.history_after], budget_epsilon=rp.budget,
            update_sha256=update_sha256,
        )
