"""What one institution can do to a round: bounds on its weight, its update's norm and
its evaluation report, and which refusals name it as the cause of a failed round.

An institution's example count is its own claim, so it is bounded three ways:
- an update may not claim more examples than its institution declared at Join
  (EXAMPLE_COUNT_ABOVE_DECLARED; 0 declared means not declared, and only the next
  bound applies), and counts for at most the study's `max_examples_per_update`;
- at the round's close no institution keeps more than `max_weight_share` of the round's
  total weight: the largest weights are lowered to a common cap c with
  c = share * (the sum of the weights after capping), the others keep theirs
  (water-filling). Their shares then grow in proportion, as if the excess had been
  redistributed. The cap is rounded down to whole examples, so the share is at most
  `max_weight_share`, and what is recorded is exactly what was folded;
- an evaluation report counts the same way, with `max_examples_per_evaluation`.

Norms (studies where the coordinator sees each update, without central DP, which clips
instead, and without a robust rule): an update is refused above `adaptive_norm_factor`
times the median L2 norm of the accepted updates of the last committed round (stored
in its metrics as `update_norm_median`, so a restart keeps it), and above
`max_update_norm`. Round 1 has no history: the round's own median is used once at
least MIN_UPDATES_FOR_MEDIAN updates arrived, applied at the close (the updates above
it are taken out of the sum by the rebuild from their spools); with fewer, a median
says nothing an outlier did not choose, and only `max_update_norm` applies. For the
same reason a round with fewer accepted updates hands on the median it was bounded by
instead of its own; a federation of two never gets an adaptive bound. A factor of
10 leaves honest updates, whose norms vary by a few times between institutions and
shrink as training converges, far from the bound.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

import grpc

from fedcollab.config import StudyConfig
from fedcollab.errors import Rejected

MIN_UPDATES_FOR_MEDIAN = 3
NORM_MEDIAN_METRIC = "update_norm_median"
# In a participation's metrics, where its update counted for less than it claimed: the
# claim. Institutions cannot send metrics under this prefix (_upload.check_header_values).
RESERVED_METRIC_PREFIX = "fedcollab."
CLAIMED_METRIC = RESERVED_METRIC_PREFIX + "num_examples_claimed"

# Refusals that say the institution sent something wrong (not that it was late, went
# away, or the coordinator stopped). A failed round with such a refusal among its
# participants is not counted as an attempt, and the refused institutions are not
# selected again for that round: each uncounted attempt leaves out at least one more
# institution, so they cannot repeat without end.
MISBEHAVIOUR = frozenset({
    "UPDATE_OVERFLOWS_AGGREGATE", "UPDATE_NORM_OUT_OF_BOUNDS", "EXAMPLE_COUNT_ABOVE_DECLARED",
    "INVALID_EXAMPLE_COUNT", "NON_FINITE_VALUES", "SHAPE_MISMATCH", "DTYPE_MISMATCH", "TENSOR_MISSING",
    "TENSOR_UNEXPECTED", "TENSOR_DUPLICATED", "TENSOR_ORDER", "SIZE_MISMATCH", "CHUNK_HASH_MISMATCH",
    "UPDATE_HASH_MISMATCH", "CHUNK_OUT_OF_ORDER", "CHUNK_TOO_LARGE", "CHUNK_EMPTY", "ENCODING_MISMATCH",
    "METADATA_TOO_LARGE", "INVALID_HEADER", "INVALID_PRIVACY_SPEND",
})


def bounded_weights_record(study: StudyConfig, claimed: Mapping[str, float]) -> dict[str, object]:
    """The lineage aggregator's entry for a round where weights were lowered: the bounds
    and each lowered institution's claim (its contribution says what counted)."""
    return {"max_weight_share": study.max_weight_share, "max_examples_per_update": study.max_examples_per_update,
            "claimed": {name: int(n) for name, n in sorted(claimed.items())}}


def update_weight(*, claimed: int, declared: int, cap: int) -> int:
    """What an update's example count counts for, before the round's share cap."""
    if declared > 0 and claimed > declared:
        raise Rejected(
            code=grpc.StatusCode.INVALID_ARGUMENT, reason="EXAMPLE_COUNT_ABOVE_DECLARED",
            message=f"the update claims {claimed} examples, and this institution declared {declared} at Join; "
                    "join again with the number of examples it trains on",
            metadata={"claimed": claimed, "declared": declared},
        )
    return min(claimed, cap)


def water_fill(weights: Mapping[str, int], *, max_share: float) -> dict[str, int]:
    """The weights with none above `max_share` of their total: the largest are lowered
    to one whole-number cap, the rest are kept. When fewer than 1 / max_share weights
    are given no cap can reach the share, and all become the smallest (equal shares).
    Weights are positive integers (example counts)."""
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    if any(w < 1 for w in weights.values()):
        raise ValueError(f"weights must be positive, got {dict(weights)}")
    if max_share >= 1 or len(weights) < 2:
        return dict(weights)
    # Exact arithmetic: in floats, 1 - k * share loses digits (share 0.99999 put the cap
    # 2 examples below the largest one the share allows, at 7e10 examples).
    share = Fraction(max_share)
    total = sum(weights.values())
    if max(weights.values()) <= share * total:
        return dict(weights)  # nothing binds: the usual case, and no rebuild
    ordered = sorted(weights.values(), reverse=True)
    rest = total
    cap: Fraction | None = None
    for k in range(1, len(ordered)):  # k weights capped at c = share * rest / (1 - k * share)
        rest -= ordered[k - 1]
        if 1 - k * share <= 0:
            break
        c = share * rest / (1 - k * share)
        if ordered[k] <= c <= ordered[k - 1]:
            cap = c
            break
    if cap is None:
        return dict.fromkeys(weights, min(weights.values()))
    # The largest whole cap within the share: whole <= c  <=>  whole <= share * (rest + k * whole).
    whole = max(1, math.floor(cap))
    out = {name: min(w, whole) for name, w in weights.items()}
    return out


@dataclass(frozen=True)
class NormPolicy:
    """A round's norm bounds: `max_norm` refuses at each upload's finish; `screen_factor`
    (no history) applies factor * the round's own median at the close; `measure` says
    whether norms are measured at all (the adaptive bound needs the round's median)."""

    max_norm: float | None
    screen_factor: float | None
    measure: bool


def norm_policy(study: StudyConfig, *, last_metrics: Mapping[str, float] | None) -> NormPolicy:
    """The bounds for the next round, from the study and the last committed round's metrics."""
    adaptive = study.adaptive_norm_factor
    if study.central_dp is not None or study.strategy.robust or study.secure_aggregation is not None:
        adaptive = None  # clipped, robust or unseen updates: see the module's docstring
    if adaptive is None:
        return NormPolicy(max_norm=study.max_update_norm, screen_factor=None, measure=False)
    median = (last_metrics or {}).get(NORM_MEDIAN_METRIC)
    if median is None or not (math.isfinite(median) and median > 0):
        return NormPolicy(max_norm=study.max_update_norm, screen_factor=adaptive, measure=True)
    bound = adaptive * median
    if study.max_update_norm is not None:
        bound = min(bound, study.max_update_norm)
    return NormPolicy(max_norm=bound, screen_factor=None, measure=True)


def screen_bound(norms: Iterable[float], *, factor: float) -> float | None:
    """Round 1's bound: factor * the median of the round's update norms, or None with
    too few updates (or a median of zero, which would refuse every update that moves)."""
    values = list(norms)
    if len(values) < MIN_UPDATES_FOR_MEDIAN:
        return None
    median = statistics.median(values)
    return factor * median if math.isfinite(median) and median > 0 else None


def next_norm_median(norms: Iterable[float], *, previous: float | None) -> float | None:
    """The median norm a committed round hands to the next one's bound: of its accepted
    updates when there are at least MIN_UPDATES_FOR_MEDIAN (the median of two is their
    mean, which one of them sets: it could raise the bound round after round), else the
    one it was bounded by."""
    values = [v for v in norms if math.isfinite(v)]
    if len(values) >= MIN_UPDATES_FOR_MEDIAN:
        return statistics.median(values)
    return previous


def evaluation_metrics(reports: Mapping[str, tuple[int, float, float]]) -> dict[str, float]:
    """The round's eval_* metrics from bounded reports: example-weighted means, and the
    medians over the reporting institutions (an evaluator that lies about its accuracy
    moves a mean by up to its share, the median not while most report truly)."""
    n = sum(v[0] for v in reports.values())
    if n == 0:
        return {}
    counted = [v for v in reports.values() if v[0] > 0]
    return {
        "eval_loss": sum(v[0] * v[1] for v in counted) / n,
        "eval_accuracy": sum(v[0] * v[2] for v in counted) / n,
        "eval_loss_median": statistics.median(v[1] for v in counted),
        "eval_accuracy_median": statistics.median(v[2] for v in counted),
        "eval_examples": float(n),
        "eval_institutions": float(len(reports)),
    }


def bounded_reports(reports: Mapping[str, tuple[int, float, float]], *, study: StudyConfig
                    ) -> dict[str, tuple[int, float, float]]:
    """Evaluation reports (examples, loss, accuracy) with each count bounded by the study's
    cap and the share of the evaluation's total; reports of 0 examples count for nothing."""
    counted = {n: min(v[0], study.max_examples_per_evaluation) for n, v in reports.items() if v[0] > 0}
    capped = water_fill(counted, max_share=study.max_weight_share) if counted else {}
    return {n: (capped.get(n, 0), v[1], v[2]) for n, v in reports.items()}
