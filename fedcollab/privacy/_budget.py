"""The institution's side of privacy: calibrate the noise for the study it joined,
refuse what would exceed its budget, and record the spend before anything leaves.

The coordinator's task only says how to train (epochs, batch size); what that costs
is worked out here from the institution's own ledger, config and data size. A
coordinator asking for more rounds or steps than planned cannot raise the budget: the
projected spend is checked against it before every round.

The budget is the site's, per dataset (DESIGN principle 3): one accountant history,
composed over every study's rows on this dataset, is checked against
`privacy.budget_epsilon`, so a study offered again under a new name spends from the
same budget. `policy.budgets` gives a study a sub-limit inside it: that study's own
composed spend must stay within it too. Noise is still calibrated per study (at its
first round, for its planned rounds); what is checked and recorded is both totals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedcollab.config import PrivacyConfig
from fedcollab.privacy._accounting import History, calibrate_noise, compose, epsilon_of
from fedcollab.privacy._ledger import LedgerConflict, LedgerEntry, OverLimit, PrivacyLedger
from fedcollab.privacy._opacus import PrivacyError, batches_per_epoch, sample_rate_for

# Rows added by other studies between a round's plan and its record: recompute this often, then give up.
_RETRIES = 20


class BudgetExhausted(PrivacyError):
    """This round would take the institution past its privacy budget (the site's, or the study's sub-limit)."""

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
    """The study's own cumulative spend on this dataset (what its model discloses)."""
    delta: float
    budget: float
    """The study's limit: min(its sub-limit, the site's budget)."""
    accountant: str
    history_after: tuple[tuple[float, float, int], ...]
    dataset: str = ""
    site_epsilon_before: float = 0.0
    site_epsilon_after: float = 0.0
    site_budget: float = 0.0
    based_on: int = 0
    """Rows in the ledger when this was computed: `record` recomputes if any was added since."""
    base_sha256: str = ""
    """The model version the round trains from: with the study and round, what makes it this release."""


class InstitutionPrivacy:
    """`dataset`: the site's key for its data (fedcollab.privacy._dataset.dataset_key).
    `study_budgets`: policy.budgets, the sub-limits per study name."""

    def __init__(self, *, config: PrivacyConfig, ledger: PrivacyLedger, num_examples: int, dataset: str = "data",
                 study_budgets: Mapping[str, float] | None = None) -> None:
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
        self.dataset = dataset
        self._study_budgets = dict(study_budgets or {})
        self._n = num_examples

    def study_limit(self, study: str) -> float:
        """What this study may spend: its sub-limit, never more than the site's budget."""
        return min(self._study_budgets.get(study, self.config.budget), self.config.budget)

    def spent(self, *, study: str) -> float:
        return self.ledger.spent(study=study, dataset=self.dataset)

    def site_spent(self) -> float:
        return self.ledger.site_spent(dataset=self.dataset)

    def recorded(self, *, study: str, round_number: int, nonce: str, base_sha256: str = "") -> LedgerEntry | None:
        """The spend already recorded for this assignment: this round of this study on
        the same base model (a retried attempt, or a restart after the row was written,
        before or during the upload). Sending that update again reveals nothing new."""
        return self.ledger.find(study=study, round=round_number, nonce=nonce, base_sha256=base_sha256,
                                dataset=self.dataset)

    def plan(self, *, study: str, total_rounds: int, round_number: int, nonce: str, epochs: int,
             batch_size: int, base_sha256: str = "") -> RoundPrivacy:
        """The noise and cost of this round, or BudgetExhausted. Spends nothing."""
        c = self.config
        rate = sample_rate_for(num_examples=self._n, batch_size=batch_size)
        steps = max(1, epochs) * batches_per_epoch(num_examples=self._n, batch_size=batch_size)
        seq, rows = self.ledger.snapshot(dataset=self.dataset)
        mine = [e for e in rows if e.study == study]
        if mine:
            noise = mine[0].noise_multiplier  # calibrated once per study, at its first round
        else:
            # For the study's planned rounds, within its limit; the site's budget is
            # checked round by round below (other studies may have spent part of it).
            noise = calibrate_noise(target_epsilon=min(c.target_epsilon, self.study_limit(study)),
                                    delta=c.target_delta, sample_rate=rate, steps=steps * max(1, total_rounds),
                                    accountant=c.accountant)
        return self._price(study=study, round_number=round_number, nonce=nonce, noise=noise, rate=rate, steps=steps,
                           seq=seq, rows=rows, base_sha256=base_sha256)

    def _price(self, *, study: str, round_number: int, nonce: str, noise: float, rate: float, steps: int,
               seq: int, rows: Sequence[LedgerEntry], base_sha256: str) -> RoundPrivacy:
        """This round's cost on top of the rows: the study's total and the site's total, both checked."""
        c = self.config
        mine = [e for e in rows if e.study == study]
        study_history = _history(mine, noise=noise, rate=rate, steps=steps)
        after = composed_epsilon(history=study_history, delta=c.target_delta, accountant=c.accountant)
        if len(mine) == len(rows):  # no other study touched this dataset: the same history
            site_after = after
        else:
            site_after = composed_epsilon(history=_history(rows, noise=noise, rate=rate, steps=steps),
                                          delta=c.target_delta, accountant=c.accountant)
        before = mine[-1].epsilon if mine else 0.0
        site_before = rows[-1].site_epsilon if rows else 0.0
        limit = self.study_limit(study)
        if site_after > c.budget * (1 + 1e-9):
            others = len({e.study for e in rows} - {study})
            raise BudgetExhausted(
                f"round {round_number} of study {study!r} would take the spend on this institution's data "
                f"({self.dataset}) from epsilon {site_before:.3f} to {site_after:.3f}, past this institution's "
                f"budget of {c.budget:g} (every study on this data counts: {others} other(s) so far; delta "
                f"{c.target_delta:g}, {c.accountant} accountant)",
                spent=before, would_be=after, budget=limit,
            )
        if after > limit * (1 + 1e-9):
            raise BudgetExhausted(
                f"round {round_number} of study {study!r} would spend epsilon {after - before:.3f} more "
                f"({before:.3f} -> {after:.3f}), past this study's limit of {limit:g} "
                f"({'policy.budgets' if study in self._study_budgets else 'the site budget'}; delta "
                f"{c.target_delta:g}, {c.accountant} accountant)",
                spent=before, would_be=after, budget=limit,
            )
        return RoundPrivacy(
            study=study, round=round_number, nonce=nonce, noise_multiplier=noise, max_grad_norm=c.max_grad_norm,
            sample_rate=rate, steps=steps, epsilon_before=before, epsilon_after=after, delta=c.target_delta,
            budget=limit, accountant=c.accountant, history_after=tuple(study_history), dataset=self.dataset,
            site_epsilon_before=site_before, site_epsilon_after=site_after, site_budget=c.budget, based_on=seq,
            base_sha256=base_sha256,
        )

    def record(self, rp: RoundPrivacy, *, update_sha256: str) -> LedgerEntry:
        """Durably records the spend; call before the update leaves the institution.

        If another study's round was recorded since `plan` (daemons of several studies
        share the site's ledger), the totals are computed again for the same training
        (same noise, rate, steps) and checked again: BudgetExhausted when the budget
        ran out meanwhile, and then nothing is recorded and nothing may be sent."""
        for _ in range(_RETRIES):
            try:
                return self.ledger.append(
                    study=rp.study, dataset=rp.dataset, round=rp.round, nonce=rp.nonce, epsilon=rp.epsilon_after,
                    site_epsilon=rp.site_epsilon_after, delta=rp.delta, noise_multiplier=rp.noise_multiplier,
                    sample_rate=rp.sample_rate, steps=rp.steps, accountant=rp.accountant,
                    history=[list(h) for h in rp.history_after], budget_epsilon=rp.budget,
                    site_budget_epsilon=rp.site_budget, update_sha256=update_sha256, base_sha256=rp.base_sha256,
                    based_on=rp.based_on,
                )
            except LedgerConflict:
                seq, rows = self.ledger.snapshot(dataset=self.dataset)
                rp = self._price(study=rp.study, round_number=rp.round, nonce=rp.nonce, noise=rp.noise_multiplier,
                                 rate=rp.sample_rate, steps=rp.steps, seq=seq, rows=rows, base_sha256=rp.base_sha256)
            except OverLimit as e:  # the ledger's own guard; _price should have refused first
                raise BudgetExhausted(str(e), spent=rp.epsilon_before, would_be=rp.epsilon_after,
                                      budget=rp.budget) from None
        raise PrivacyError(f"the site's ledger kept changing while round {rp.round} of study {rp.study!r} was being "
                           f"recorded ({_RETRIES} tries); nothing was recorded or sent")


def composed_epsilon(*, history: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """epsilon_of, for a history that may mix mechanisms (several studies' noise and
    rates). Opacus' GDP accountant reads only the last (noise, rate) of its history (it
    is meant for one constant mechanism), so it would count a mixed history as its last
    study alone: such a history is accounted with RDP instead, a valid bound for any
    composition (and the more conservative of the two)."""
    if accountant == "gdp" and len({(z, q) for z, q, s in history if s > 0}) > 1:
        accountant = "rdp"
    return epsilon_of(history=history, delta=delta, accountant=accountant)


def _history(rows: Sequence[LedgerEntry], *, noise: float, rate: float, steps: int) -> History:
    """One accountant history over `rows` (each row's own noise, rate and steps), then this round."""
    history: History = []
    for e in rows:
        history = compose(history, noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps)
    return compose(history, noise_multiplier=noise, sample_rate=rate, steps=steps)
