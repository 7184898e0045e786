"""Distributed differential privacy under secure aggregation: the Skellam mechanism.

Each institution clips its update to L2 norm `clip_norm`, scales it by `scale` (integer
levels per unit of value), rounds it to integers with conditional randomized rounding
(unbiased stochastic rounding, redrawn until the rounded vector's norm is within
`l2_bound`), adds its share of symmetric Skellam noise and masks it. The coordinator sees
only the sum, whose noise is Skellam with the sum of the shares' variances (Skellam is
closed under summation), so a round that sums `survivors` updates is one Skellam release
with variance `survivors * institution_variance` and sensitivities `l1_bound`, `l2_bound`
(integer units; add/remove one institution's rounded vector).

Sources:
- Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated
  Learning with Secure Aggregation" (ICML 2021, arXiv:2102.06387), Section 4: conditional
  randomized rounding and the bound on the norm of a randomly rounded vector.
- Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for Differentially Private Federated
  Learning" (NeurIPS 2021, arXiv:2110.04995): RDP of the multi-dimensional Skellam mechanism.
- Balle et al. 2020, "Hypothesis testing interpretations and Renyi differential privacy"
  (AISTATS 2020, arXiv:1905.09982), Theorem 21: RDP -> (epsilon, delta), as in Opacus.

Everything here is in integer units (after scaling) unless a name says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcollab.secagg._quantize import Quantizer

# Opacus' RDPAccountant.DEFAULT_ALPHAS, copied so that this module stays free of torch (which
# importing opacus pulls in); tests/unit/test_secagg_ddp.py checks that the two stay equal.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

# numpy's Poisson sampler refuses lam >= ~9.2e18; a Skellam std of 1e9 is far beyond any
# 32-bit secure-aggregation range anyway.
_MAX_POISSON_MEAN = 1e18
_CHUNK = 1 << 22  # samples per Poisson draw, bounds the temporary memory of large draws

# Refuse plans whose rounding inflates the sensitivity by more than this factor.
_MAX_ROUNDING_INFLATION = 1.5


_MAX_SAMPLED_POISSON_MEAN = 1e9


def skellam_noise(*, variance: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` int64 samples of the symmetric Skellam distribution with `variance`:
    Poisson(variance/2) - Poisson(variance/2). Variance 0 gives zeros."""
    if not (math.isfinite(variance) and variance >= 0):
        raise ValueError(f"variance must be finite and >= 0, got {variance}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    mean = variance / 2.0
    if mean > _MAX_POISSON_MEAN:
        raise ValueError(f"variance {variance:.3g} is too large to sample as int64 Skellam noise "
                         f"(at most {2 * _MAX_POISSON_MEAN:.0e}); use fewer bits of scale")
    out = np.zeros(size, dtype=np.int64)
    if mean == 0.0:
        return out
    for start in range(0, size, _CHUNK):
        part = out[start:start + _CHUNK]  # a view: filled in place
        part += rng.poisson(mean, size=part.shape[0])
        part -= rng.poisson(mean, size=part.shape[0])
    return out


def rounding_bound(*, scaled_clip: float, dim: int, beta: float) -> float:
    """L2 bound, holding with probability >= 1 - beta, on a vector of L2 norm <= scaled_clip
    after unbiased stochastic rounding to integers (Kairouz, Liu, Steinke 2021, Section 4, the
    conditional-rounding threshold; also `rounded_l2_norm_bound` in google-research/federated):

        min( sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) * (c + sqrt(d)/2)),  c + sqrt(d) )

    The second term holds always (every coordinate moves by less than 1), so beta = 0 gives it."""
    c = float(scaled_clip)
    if not (math.isfinite(c) and c >= 0):
        raise ValueError(f"scaled_clip must be finite and >= 0, got {scaled_clip}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    always = c + math.sqrt(dim)
    if beta == 0:
        return always
    squared = c * c + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + math.sqrt(dim) / 2.0)
    return min(math.sqrt(squared), always)


def conditional_rounding_accepts(*, squared_norm: float, bound: float) -> bool:
    """Whether a rounded vector of this squared L2 norm may be sent (else round again)."""
    return squared_norm <= bound * bound


def skellam_rdp(*, orders: Sequence[float], l1: float, l2: float, variance: float) -> np.ndarray:
    """RDP epsilon at each order of one release of a sum with symmetric Skellam noise of
    `variance` per coordinate and sensitivities `l1`, `l2` (all in integer units).

    Agarwal, Kairouz, Liu 2021, Section 3, the RDP bound of the multi-dimensional Skellam
    mechanism (Theorem 3.5 of arXiv:2110.04995v2), written with mu = the variance of the noise
    (Poisson(mu/2) - Poisson(mu/2) per coordinate), for integer alpha > 1:

        eps(alpha) <= alpha l2^2 / (2 mu) + min( ((2 alpha - 1) l2^2 + 6 l1) / (4 mu^2),  3 l1 / (2 mu) )

    (the same as google-research/federated's `_skellam_rdp` with its units scaled out). The
    theorem is stated for integer orders; at a fractional order this returns the bound at
    ceil(alpha), which is valid because Renyi divergence does not decrease with the order.
    Variance 0 with a positive sensitivity gives inf (no privacy)."""
    alphas = np.asarray(orders, dtype=np.float64)
    if alphas.ndim != 1 or not (np.all(np.isfinite(alphas)) and np.all(alphas > 1)):
        raise ValueError("orders must be a sequence of finite numbers > 1")
    for name, value in (("l1", l1), ("l2", l2), ("variance", variance)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if l1 == 0 and l2 == 0:
        return np.zeros_like(alphas)
    if variance == 0:
        return np.full_like(alphas, np.inf)
    a = np.ceil(alphas)
    gaussian = a * l2 * l2 / (2.0 * variance)
    correction = np.minimum(((2.0 * a - 1.0) * l2 * l2 + 6.0 * l1) / (4.0 * variance * variance),
                            3.0 * l1 / (2.0 * variance))
    return gaussian + correction


def rdp_to_epsilon(*, orders: Sequence[float], rdp: Sequence[float] | np.ndarray, delta: float) -> tuple[float, float]:
    """(epsilon, best order) of an RDP curve at `delta`: Balle et al. 2020, Theorem 21, the
    conversion of `opacus.accountants.analysis.rdp.get_privacy_spent`, with epsilon floored at 0
    and (inf, nan) when no order gives a finite bound."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    alphas = np.asarray(orders, dtype=np.float64)
    curve = np.asarray(rdp, dtype=np.float64)
    if alphas.shape != curve.shape or alphas.ndim != 1:
        raise ValueError(f"orders and rdp must be 1-D and of equal length, got {alphas.shape} and {curve.shape}")
    eps = curve - (math.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    finite = np.isfinite(eps)
    if not finite.any():
        return math.inf, math.nan
    best = int(np.argmin(np.where(finite, eps, np.inf)))
    return max(float(eps[best]), 0.0), float(alphas[best])


def skellam_epsilon(*, releases: Sequence[tuple[float, float, float]], delta: float,
                    orders: Sequence[float] | None = None) -> tuple[float, float]:
    """(epsilon, best order) at `delta` of the composition of Skellam releases
    [(l1, l2, variance), ...] (integer units; RDP adds up over releases). No releases: (0.0, nan).
    Default orders: Opacus' RDPAccountant.DEFAULT_ALPHAS."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    alphas = DEFAULT_ORDERS if orders is None else tuple(orders)
    if not releases:
        return 0.0, math.nan
    total = np.zeros(len(alphas))
    for l1, l2, variance in releases:
        total += skellam_rdp(orders=alphas, l1=l1, l2=l2, variance=variance)
    return rdp_to_epsilon(orders=alphas, rdp=total, delta=delta)


@dataclass(frozen=True)
class DistributedDPPlan:
    scale: float  # gamma: integer levels per unit of value (from Quantizer.for_range)
    bits: int  # secure-aggregation modulus 2^bits
    clip_norm: float  # L2 clip in value units
    l2_bound: float  # rounding_bound(...): the L2 sensitivity and the conditional-rounding threshold (integer units)
    l1_bound: float  # min(l2_bound^2, sqrt(dim) * l2_bound): an integer vector has ||x||_1 <= ||x||_2^2
    institution_variance: float  # Skellam variance each institution adds per coordinate (integer units)
    target_variance: float  # (noise_multiplier * clip_norm * scale)^2: what any min_survivors together carry

    def quantizer(self) -> Quantizer:
        return Quantizer(scale=self.scale, bits=self.bits)

    def release(self, *, survivors: int) -> tuple[float, float, float]:
        """(l1, l2, variance of the sum) of a round whose sum holds `survivors` updates; for
        skellam_epsilon. Fewer survivors than planned is accounted honestly (less noise)."""
        if survivors < 1:
            raise ValueError(f"a release needs at least one surviving institution, got {survivors}")
        return self.l1_bound, self.l2_bound, survivors * self.institution_variance


def plan_distributed_dp(*, clip_norm: float, noise_multiplier: float, bits: int, dim: int,
                        max_summands: int, min_survivors: int, beta: float) -> DistributedDPPlan:
    """Scale, sensitivities and per-institution Skellam variance such that any `min_survivors`
    institutions together add noise of std noise_multiplier * clip_norm (in value units), and
    the sum of up to `max_summands` of them, noise included, does not wrap mod 2^bits (at ten
    standard deviations). `beta` is the probability that one stochastic rounding exceeds the
    rounding bound and has to be redrawn (conditional rounding)."""
    problems = []
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        problems.append(f"clip_norm must be positive and finite, got {clip_norm}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        problems.append(f"noise_multiplier must be positive and finite, got {noise_multiplier} "
                        "(without noise there is no distributed DP: use plain secure aggregation)")
    if not 2 <= bits <= 32:
        problems.append(f"bits must be in 2..32, got {bits}")
    if dim < 1:
        problems.append(f"dim must be >= 1, got {dim}")
    if max_summands < 1:
        problems.append(f"max_summands must be >= 1, got {max_summands}")
    if not 1 <= min_survivors <= max(max_summands, 1):
        problems.append(f"min_survivors must be in 1..max_summands ({max_summands}), got {min_survivors}")
    if not 0 < beta < 1:
        problems.append(f"beta must be in (0, 1), got {beta} (e.g. exp(-0.5) as in Kairouz et al.)")
    if problems:
        raise ValueError("invalid distributed DP plan: " + "; ".join(problems))

    # Std of the sum's noise in value units when all max_summands add their share.
    noise_std = noise_multiplier * clip_norm * math.sqrt(max_summands / min_survivors)
    scale = Quantizer.for_range(clip=clip_norm, bits=bits, max_summands=max_summands, noise_std=noise_std).scale
    # numpy's Poisson sampler drifts from the distribution (its variance, its skew) for
    # means beyond ~1e10; the accounting assumes exact Skellam noise, so the scale is
    # capped where each institution's Poisson mean stays at most 1e9. The sensitivity is
    # then still ~1e5 levels, so rounding inflates it by under 1% even at d = 1e9.
    scale = min(scale, math.sqrt(2 * _MAX_SAMPLED_POISSON_MEAN * min_survivors) / (noise_multiplier * clip_norm))
    scaled_clip = clip_norm * scale
    l2_bound = rounding_bound(scaled_clip=scaled_clip, dim=dim, beta=beta)
    if l2_bound > _MAX_ROUNDING_INFLATION * scaled_clip:
        raise ValueError(
            f"the quantization is too coarse for a model of {dim} parameters: with {bits} bits the clip "
            f"norm is only {scaled_clip:.3g} integer levels and stochastic rounding inflates the sensitivity "
            f"to {l2_bound:.3g} ({l2_bound / scaled_clip:.2f}x, at most {_MAX_ROUNDING_INFLATION}x allowed); "
            "use more bits (or fewer institutions per round / a smaller noise multiplier)")
    l1_bound = min(l2_bound * l2_bound, math.sqrt(dim) * l2_bound)
    target_variance = (noise_multiplier * scaled_clip) ** 2
    return DistributedDPPlan(scale=scale, bits=bits, clip_norm=clip_norm, l2_bound=l2_bound, l1_bound=l1_bound,
                             institution_variance=target_variance / min_survivors, target_variance=target_variance)
