"""Will each institution's budget last to the study's end? The coordinator's view,
from what institutions declared with their updates (their ledgers are authoritative).

An institution calibrates its noise once, at its first round, for the study's planned
rounds, so that taking part in all of them lands exactly on its target epsilon. From
its declared noise multiplier, sample rate and steps per round, the spend after the
remaining rounds is composed by the same accountant. If that passes the limit it
declared, it will decline rounds before the end (BUDGET_EXHAUSTED): the operator is
warned while there is time to act (fewer rounds, another site). What the coordinator
cannot see is spend of other studies on the same data; the site's own check still
holds it to its budget, round by round."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedcollab.errors import FedcollabError
from fedcollab.privacy._accounting import epsilon_of

# Floating noise of the accountants: a projection this close to the limit is at it.
_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Projection:
    """One institution's spend in a study: now, and after every remaining round."""

    institution: str
    last_round: int
    rounds_spent: int
    epsilon: float
    budget_epsilon: float
    remaining_rounds: int
    projected_epsilon: float
    """Its spend if it takes part in every remaining round (NaN when it cannot be worked out)."""

    @property
    def short(self) -> bool:
        """Its limit cannot cover the rest of the study."""
        return not math.isnan(self.projected_epsilon) and \
            self.projected_epsilon > self.budget_epsilon * (1 + _TOLERANCE)

    def warning(self) -> str:
        return (f"{self.institution}: epsilon {self.epsilon:.3f} of its {self.budget_epsilon:g} spent after "
                f"{self.rounds_spent} round(s); the {self.remaining_rounds} remaining round(s) would take it to "
                f"{self.projected_epsilon:.3f}, so it will decline rounds (BUDGET_EXHAUSTED) before the study ends. "
                "Ask the site for a larger privacy.budget_epsilon, or plan fewer rounds")


def project_budgets(*, spend: Iterable[Mapping[str, Any]], total_rounds: int) -> list[Projection]:
    """`spend`: Store.privacy_spend() rows (one per participation that declared a spend,
    retried attempts included). Only uploads that arrived (status "done") count."""
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for row in spend:
        if row.get("status") == "done":
            by_name.setdefault(str(row["institution"]), []).append(row)
    out = []
    for name, rows in sorted(by_name.items()):
        last = max(rows, key=lambda r: (int(r["round"]), float(r["epsilon"])))
        # Each spend raises the declared cumulative epsilon; an update re-sent to a
        # retried attempt declares the same figure again. So the distinct figures count
        # the rounds paid for, including any a daemon once trained twice.
        spent = len({float(r["epsilon"]) for r in rows})
        remaining = max(0, total_rounds - int(last["round"]))
        out.append(Projection(
            institution=name, last_round=int(last["round"]), rounds_spent=spent, epsilon=float(last["epsilon"]),
            budget_epsilon=float(last["budget_epsilon"]), remaining_rounds=remaining,
            projected_epsilon=_projected(last, rounds=spent + remaining),
        ))
    return out


def _projected(row: Mapping[str, Any], *, rounds: int) -> float:
    try:
        noise, rate, steps = float(row["noise_multiplier"]), float(row["sample_rate"]), int(row["steps"])
        if noise <= 0 or not 0 < rate <= 1 or steps <= 0:
            return math.nan
        return epsilon_of(history=[(noise, rate, steps * rounds)], delta=float(row["delta"]),
                          accountant=str(row["accountant"]))
    except (KeyError, TypeError, ValueError, ArithmeticError, FedcollabError):
        return math.nan  # an institution's odd declaration: no projection, never a crash
