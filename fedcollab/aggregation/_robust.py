"""Byzantine-robust aggregation over updates spilled on disk, block by block: coordinate
median and trimmed mean (Yin et al. 2018), Krum and Multi-Krum (Blanchard et al. 2017),
Bulyan (El Mhamdi et al. 2018), with the semantics of Flower 1.41's FedMedian,
FedTrimmedAvg, Krum, MultiKrum and Bulyan strategies.

Each update is re-read as a stream of dense float32 blocks of the flat update vector,
the same boundaries for every update, so memory is n updates x one block (plus an
n x n distance matrix), never n whole updates. Median and trimmed mean read every
update once; the Krum family reads every update once for the distances, then the
selected ones once more to aggregate them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

RULES: tuple[str, ...] = ("median", "trimmed_mean", "krum", "multi_krum", "bulyan")
_KRUM_FAMILY = ("krum", "multi_krum", "bulyan")
# Per-coordinate math (sorts, the Gram product) runs on this many columns of the n blocks
# at a time, so its temporaries stay at n x 64Ki values whatever the block size.
_COLUMNS = 1 << 16

Opener = Callable[[], Iterator[torch.Tensor]]


@dataclass(frozen=True, kw_only=True)
class RobustSettings:
    """A robust rule and its parameters; a parameter the rule does not use is None.

    num_malicious: f, the number of Byzantine updates the rule must withstand.
    trim_fraction: trimmed mean's beta, the fraction cut at each end per coordinate
        (Flower's default 0.2).
    to_keep: Multi-Krum's m, the number of best-scored updates averaged (Flower's
        default 1, which is Krum).
    """

    rule: str
    num_malicious: int = 0
    trim_fraction: float | None = None
    to_keep: int | None = None

    def __post_init__(self) -> None:
        # Flower's defaults, for the rule that uses them.
        if self.rule == "trimmed_mean" and self.trim_fraction is None:
            object.__setattr__(self, "trim_fraction", 0.2)
        if self.rule == "multi_krum" and self.to_keep is None:
            object.__setattr__(self, "to_keep", 1)
        problems = self._own_problems()
        if problems:
            raise ValueError(f"invalid robust settings for rule {self.rule!r}: " + "; ".join(problems))

    def _own_problems(self) -> list[str]:
        if self.rule not in RULES:
            return [f"unknown rule: choose one of {', '.join(RULES)}"]
        problems = []
        if not _is_int(self.num_malicious) or self.num_malicious < 0:
            problems.append(f"num_malicious must be an int >= 0, got {self.num_malicious!r}")
        if self.rule != "trimmed_mean" and self.trim_fraction is not None:
            problems.append("trim_fraction applies to rule 'trimmed_mean' only: remove it")
        if self.trim_fraction is not None and (
                isinstance(self.trim_fraction, bool) or not isinstance(self.trim_fraction, int | float)
                or not 0.0 <= self.trim_fraction < 0.5):
            problems.append(f"trim_fraction must be in [0, 0.5) (it is cut at both ends), got {self.trim_fraction!r}")
        if self.rule != "multi_krum" and self.to_keep is not None:
            problems.append("to_keep applies to rule 'multi_krum' only (Krum keeps 1, Bulyan n - 2f): remove it")
        if self.to_keep is not None and (not _is_int(self.to_keep) or self.to_keep < 1):
            problems.append(f"to_keep must be an int >= 1, got {self.to_keep!r}")
        return problems

    def problems(self, *, num_updates: int) -> list[str]:
        """Every reason the rule cannot aggregate `num_updates` updates."""
        n, f = num_updates, self.num_malicious
        if n < 1:
            return ["there is no update to aggregate"]
        problems = []
        if self.rule == "median" and n < 2 * f + 1:
            problems.append(f"the median withstands f malicious updates only with n >= 2f + 1 = {2 * f + 1}, "
                            f"got n = {n}")
        if self.rule == "trimmed_mean":
            assert self.trim_fraction is not None
            cut = int(self.trim_fraction * n)
            if cut < f:
                problems.append(f"trim_fraction {self.trim_fraction} of n = {n} cuts {cut} value(s) at each end, fewer "
                                f"than num_malicious = {f}: raise trim_fraction to at least {f / n:.3g}")
        if self.rule in ("krum", "multi_krum") and n < 2 * f + 3:
            problems.append(f"Krum needs n >= 2f + 3 = {2 * f + 3} updates for f = {f}, got n = {n}: wait for more "
                            "updates or lower num_malicious")
        if self.rule == "multi_krum" and self.to_keep is not None and self.to_keep > n:
            problems.append(f"to_keep = {self.to_keep} exceeds the {n} updates")
        if self.rule == "bulyan" and n < 4 * f + 3:
            problems.append(f"Bulyan needs n >= 4f + 3 = {4 * f + 3} updates for f = {f}, got n = {n}: wait for more "
                            "updates or lower num_malicious")
        return problems

    def check(self, *, num_updates: int) -> None:
        """Raises ValueError naming every reason the rule cannot aggregate `num_updates` updates."""
        problems = self.problems(num_updates=num_updates)
        if problems:
            raise ValueError(f"rule {self.rule!r} cannot aggregate {num_updates} update(s): " + "; ".join(problems))


@dataclass(frozen=True)
class RobustResult:
    """blocks: the aggregate's float32 blocks, in order, with the updates' boundaries;
    computed (and the updates re-read) as it is consumed, once.
    selected: for the Krum family, the indices of the updates aggregated, best score
    first; None for median and trimmed mean, which use every update.
    scores: for the Krum family, each update's Krum score (the sum of its squared L2
    distances to its n - f - 2 nearest neighbours; lower is more central); else None.
    """

    blocks: Iterator[torch.Tensor]
    selected: tuple[int, ...] | None
    scores: tuple[float, ...] | None


def robust_aggregate(*, updates: Sequence[Opener], weights: Sequence[float], settings: RobustSettings
                     ) -> RobustResult:
    """Aggregates the updates with the robust rule of `settings`.

    updates[i]() opens a fresh iterator over update i's dense float32 blocks (1-D, the
    same lengths for every update); it is called once per pass over update i.
    weights: each update's example count. Only Multi-Krum uses them (Flower averages the
    selected updates weighted by num-examples); Krum returns the selected update as is,
    and median, trimmed mean and Bulyan are unweighted, as in Flower.

    The Krum family's distance pass runs now, so `selected` and `scores` are known on
    return; the aggregation pass runs as `blocks` is consumed.
    """
    n = len(updates)
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} updates: pass one weight (example count) per update")
    bad = [i for i, w in enumerate(weights) if not (math.isfinite(w) and w > 0)]
    if bad:
        raise ValueError(f"weights must be finite and positive; update(s) {bad} have {[weights[i] for i in bad]}")
    settings.check(num_updates=n)
    f = settings.num_malicious

    if settings.rule == "median":
        return RobustResult(blocks=_per_column(updates, range(n), _median), selected=None, scores=None)
    if settings.rule == "trimmed_mean":
        assert settings.trim_fraction is not None
        cut = int(settings.trim_fraction * n)  # Flower's trim_mean: int(beta * n) at each end
        return RobustResult(blocks=_per_column(updates, range(n), lambda x: _trimmed_mean(x, cut=cut)),
                            selected=None, scores=None)

    scores = _krum_scores(_distances(updates), num_malicious=f)
    keep = {"krum": 1, "multi_krum": settings.to_keep, "bulyan": n - 2 * f}[settings.rule]
    assert keep is not None
    # Flower: np.argsort(scores)[:keep]; a stable sort breaks exact ties by index.
    selected = tuple(torch.argsort(scores, stable=True)[:keep].tolist())
    if settings.rule == "bulyan":
        # Flower's Bulyan: theta = n - 2f updates chosen by one Multi-Krum pass (not Krum
        # re-run after each pick, as in the paper), then per coordinate the mean of the
        # beta = theta - 2f values closest to their median.
        beta = len(selected) - 2 * f
        blocks = _per_column(updates, selected, lambda x: _mean_closest_to_median(x, beta=beta))
    else:
        total = sum(weights[i] for i in selected)
        blocks = _weighted_mean(updates, selected, [weights[i] / total for i in selected])
    return RobustResult(blocks=blocks, selected=selected, scores=tuple(scores.tolist()))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _lockstep(updates: Sequence[Opener], indices: Sequence[int]) -> Iterator[list[torch.Tensor]]:
    """The i-th block of every update in `indices`, together, checked for alignment."""
    iterators: list[Iterator[torch.Tensor]] = []
    try:
        iterators.extend(iter(updates[i]()) for i in indices)
        number = 0
        while True:
            got = [next(it, None) for it in iterators]
            ended = [indices[j] for j, b in enumerate(got) if b is None]
            if len(ended) == len(got):
                return
            if ended:
                raise ValueError(f"update(s) {ended} ended after {number} blocks while others go on: every update "
                                 "must be read as the same blocks of the same flat vector")
            blocks: list[torch.Tensor] = [b for b in got if b is not None]
            for i, b in zip(indices, blocks, strict=True):
                if not isinstance(b, torch.Tensor) or b.dtype != torch.float32 or b.dim() != 1:
                    what = f"{b.dtype} of shape {tuple(b.shape)}" if isinstance(b, torch.Tensor) else type(b).__name__
                    raise ValueError(f"update {i} block {number} is {what}: blocks must be 1-D float32 tensors")
            length = len(blocks[0])
            for i, b in zip(indices, blocks, strict=True):
                if len(b) != length:
                    raise ValueError(f"update {i} block {number} has {len(b)} elements, update {indices[0]}'s "
                                     f"{length}: every update must use the same block boundaries")
                if not bool(torch.isfinite(b).all()):
                    raise ValueError(f"update {i} has non-finite values in block {number}: reject it before "
                                     "aggregating (no robust rule is defined on NaN or inf)")
            yield blocks
            number += 1
    finally:
        for it in iterators:
            close = getattr(it, "close", None)
            if close is not None:
                close()


def _column_ranges(length: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, length, _COLUMNS):
        yield lo, min(length, lo + _COLUMNS)


def _per_column(updates: Sequence[Opener], indices: Sequence[int],
                rule: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[torch.Tensor]:
    """rule(x) per column range, x: (len(indices), columns) float32 -> (columns,)."""
    for blocks in _lockstep(updates, indices):
        out = torch.empty(len(blocks[0]), dtype=torch.float32)
        for lo, hi in _column_ranges(len(out)):
            out[lo:hi] = rule(torch.stack([b[lo:hi] for b in blocks]))
        yield out


def _median(x: torch.Tensor) -> torch.Tensor:
    """np.median(x, axis=0): the middle value, or the mean of the two middle ones
    (torch.median would give the lower one)."""
    k = x.shape[0]
    s = x.sort(dim=0).values
    if k % 2:
        return s[k // 2]
    return (s[k // 2 - 1] + s[k // 2]) / 2


def _trimmed_mean(x: torch.Tensor, *, cut: int) -> torch.Tensor:
    """Flower's trim_mean(x, beta) with cut = int(beta * n): the mean of the sorted values
    [cut, n - cut) per column."""
    s = x.sort(dim=0).values
    return _mean_rows(s[cut:x.shape[0] - cut])


def _mean_closest_to_median(x: torch.Tensor, *, beta: int) -> torch.Tensor:
    """Flower's aggregate_n_closest_weights(median, x, beta): per column, the mean of the
    beta values nearest (in absolute difference) to the column's median."""
    diffs = (x - _median(x)).abs()
    idx = torch.argsort(diffs, dim=0, stable=True)[:beta]
    return _mean_rows(x.gather(0, idx))


def _mean_rows(x: torch.Tensor) -> torch.Tensor:
    """x.mean(dim=0) summed row after row, as numpy's mean over axis 0 does: torch's own
    reduction order depends on the number of columns, and the result must not depend
    on how the vector is cut into blocks."""
    out = x[0].clone()
    for row in x[1:]:
        out += row
    return out.div_(x.shape[0])


def _weighted_mean(updates: Sequence[Opener], indices: Sequence[int], factors: Sequence[float]
                   ) -> Iterator[torch.Tensor]:
    """Flower's aggregate_arrayrecords: sum_i x_i * (w_i / sum w), in float32, in order."""
    for blocks in _lockstep(updates, indices):
        out = blocks[0] * factors[0]
        for b, fac in zip(blocks[1:], factors[1:], strict=True):
            out += b * fac
        yield out


def _distances(updates: Sequence[Opener]) -> torch.Tensor:
    """Squared L2 distances between the whole updates, (n, n) float64, one pass.

    Per column range: center the columns (distances do not change, cancellation in
    |a|^2 + |b|^2 - 2ab shrinks) and add the Gram form in float64. Flower computes
    the same form on whole updates in their own dtype (float32)."""
    n = len(updates)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for blocks in _lockstep(updates, range(n)):
        for lo, hi in _column_ranges(len(blocks[0])):
            x = torch.stack([b[lo:hi] for b in blocks]).to(torch.float64)  # (n, columns)
            x -= x.mean(dim=0)
            gram = x @ x.T
            sq = gram.diagonal()
            dist += sq[:, None] + sq[None, :] - 2 * gram
    dist.clamp_(min=0).fill_diagonal_(0)
    return dist


def _krum_scores(dist: torch.Tensor, *, num_malicious: int) -> torch.Tensor:
    """Flower's select_multikrum scores: per row, drop the nearest (itself, at distance
    0) and sum the next max(1, n - f - 2)."""
    n = dist.shape[0]
    closest = max(1, n - num_malicious - 2)
    return dist.sort(dim=1).values[:, 1:closest + 1].sum(dim=1)
