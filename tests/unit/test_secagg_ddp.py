"""Distributed DP under secure aggregation: Skellam noise, rounding bounds, Skellam RDP
accounting, and the plan that ties scale, sensitivity and per-institution noise together."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import get_privacy_spent
from scipy import stats

from fedcollab.secagg._ddp import (
    DEFAULT_ORDERS,
    DistributedDPPlan,
    conditional_rounding_accepts,
    plan_distributed_dp,
    rdp_to_epsilon,
    rounding_bound,
    skellam_epsilon,
    skellam_noise,
    skellam_rdp,
)
from fedcollab.secagg._quantize import Quantizer

# ---------------------------------------------------------------- skellam_noise


@pytest.mark.parametrize("variance", [0.3, 12.5, 1e6, 1e12])
def test_skellam_noise_has_zero_mean_and_the_requested_variance(variance: float) -> None:
    n = 400_000
    x = skellam_noise(variance=variance, size=n, rng=np.random.default_rng(1))
    assert x.dtype == np.int64 and x.shape == (n,)
    assert abs(x.mean()) < 5 * math.sqrt(variance / n), x.mean()
    # std of the sample variance ~ variance * sqrt(2/n) = 0.22%: 2% is > 9 sigma
    assert x.var() == pytest.approx(variance, rel=0.02)


def test_skellam_noise_follows_the_skellam_pmf() -> None:
    variance = 6.0
    x = skellam_noise(variance=variance, size=300_000, rng=np.random.default_rng(2))
    for k in (0, 1, -1, 3, -5):
        expected = stats.skellam.pmf(k, variance / 2, variance / 2)
        assert np.mean(x == k) == pytest.approx(expected, abs=5 * math.sqrt(expected / x.size))


def test_a_sum_of_shares_is_skellam_with_the_summed_variance() -> None:
    rng, total, shares, n = np.random.default_rng(3), 40.0, 7, 200_000
    summed = sum(skellam_noise(variance=total / shares, size=n, rng=rng) for _ in range(shares))
    assert summed.dtype == np.int64
    assert summed.var() == pytest.approx(total, rel=0.03)
    expected = stats.skellam.pmf(0, total / 2, total / 2)
    assert np.mean(summed == 0) == pytest.approx(expected, abs=5 * math.sqrt(expected / n))


def test_skellam_noise_edge_cases_and_refusals() -> None:
    rng = np.random.default_rng(4)
    np.testing.assert_array_equal(skellam_noise(variance=0.0, size=5, rng=rng), np.zeros(5, dtype=np.int64))
    assert skellam_noise(variance=3.0, size=0, rng=rng).shape == (0,)
    big = skellam_noise(variance=50.0, size=5_000_000, rng=rng)  # chunked path; no timing assert
    assert big.shape == (5_000_000,) and big.var() == pytest.approx(50.0, rel=0.01)
    a = skellam_noise(variance=9.0, size=100, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, skellam_noise(variance=9.0, size=100, rng=np.random.default_rng(7)))
    for bad in (-1.0, math.nan, math.inf, 1e40):
        with pytest.raises(ValueError, match="variance"):
            skellam_noise(variance=bad, size=3, rng=rng)
    with pytest.raises(ValueError, match="size"):
        skellam_noise(variance=1.0, size=-1, rng=rng)


# ---------------------------------------------------------------- rounding_bound


def _stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    low = np.floor(x)
    return low + (rng.random(x.shape) < x - low)


def _half_integer_vector(dim: int, c: float) -> np.ndarray:
    """Norm exactly c with every coordinate at .5: the worst case for the rounding variance."""
    heavy = int(round((c * c - dim * 0.25) / 2.0))  # 1.5^2 - 0.5^2 = 2
    x = np.full(dim, 0.5)
    x[:heavy] = 1.5
    x *= np.where(np.arange(dim) % 2 == 0, 1.0, -1.0)
    assert np.linalg.norm(x) == pytest.approx(c)
    return x


def test_rounding_exceeds_the_bound_at_most_a_beta_fraction_of_the_time() -> None:
    dim, c, beta, trials = 10_000, 100.0, 0.1, 1_000
    rng = np.random.default_rng(5)
    bound = rounding_bound(scaled_clip=c, dim=dim, beta=beta)
    no_tail = math.sqrt(c * c + dim / 4)  # the bound without its high-probability term
    assert c <= no_tail < bound < c + math.sqrt(dim)

    direction = rng.normal(size=dim)
    for name, x in (("worst", _half_integer_vector(dim, c)), ("generic", direction / np.linalg.norm(direction) * c)):
        norms = np.array([np.linalg.norm(_stochastic_round(x, rng)) for _ in range(trials)])
        assert np.mean(norms > bound) <= beta + 3 * math.sqrt(beta * (1 - beta) / trials), name
        if name == "worst":  # the tail term is needed: here the norm exceeds sqrt(c^2 + d/4) half the time
            assert 0.4 < np.mean(norms > no_tail) < 0.6, np.mean(norms > no_tail)


def test_rounding_bound_formula_and_its_deterministic_branch() -> None:
    c, d, beta = 100.0, 10_000, 0.1
    t = math.sqrt(2 * math.log(1 / beta))
    assert rounding_bound(scaled_clip=c, dim=d, beta=beta) == pytest.approx(
        math.sqrt(c * c + d / 4 + t * (c + math.sqrt(d) / 2)))
    # tiny c, tiny beta: c + sqrt(d) is the smaller one
    assert rounding_bound(scaled_clip=0.5, dim=1, beta=1e-6) == pytest.approx(1.5)
    assert rounding_bound(scaled_clip=3.0, dim=50, beta=0.0) == pytest.approx(3.0 + math.sqrt(50))
    bounds = [rounding_bound(scaled_clip=c, dim=d, beta=b) for b in (1e-9, 1e-3, 0.1, 0.5, 0.99)]
    assert all(b >= c for b in bounds) and bounds == sorted(bounds, reverse=True)
    for kwargs in (dict(scaled_clip=-1.0, dim=3, beta=0.1), dict(scaled_clip=1.0, dim=0, beta=0.1),
                   dict(scaled_clip=1.0, dim=3, beta=1.0), dict(scaled_clip=math.nan, dim=3, beta=0.1)):
        with pytest.raises(ValueError):
            rounding_bound(**kwargs)


def test_conditional_rounding_accepts_up_to_the_bound() -> None:
    assert conditional_rounding_accepts(squared_norm=9.0, bound=3.0)
    assert not conditional_rounding_accepts(squared_norm=9.0001, bound=3.0)


# ---------------------------------------------------------------- skellam_rdp


def test_skellam_rdp_golden_values_for_both_branches_of_the_min() -> None:
    # alpha l2^2/(2v) + min(((2alpha-1) l2^2 + 6 l1)/(4v^2), 3 l1/(2v)), alpha=2, l1=10, l2=3
    np.testing.assert_allclose(skellam_rdp(orders=[2], l1=10, l2=3, variance=100.0), [0.09 + 87 / 40_000])
    np.testing.assert_allclose(skellam_rdp(orders=[2], l1=10, l2=3, variance=1.0), [9.0 + 15.0])


def test_skellam_rdp_tends_to_the_gaussian_rdp_from_above() -> None:
    orders = np.arange(2, 64)
    l2, l1 = 50.0, 50.0 * math.sqrt(10_000)
    previous = math.inf
    for variance in (1e2, 1e4, 1e6, 1e8):
        gaussian = orders * l2**2 / (2 * variance)
        rdp = skellam_rdp(orders=orders, l1=l1, l2=l2, variance=variance)
        assert np.all(rdp > gaussian)
        gap = float(np.max(rdp / gaussian - 1))
        assert gap < previous
        previous = gap
    assert previous < 1e-3


def test_skellam_rdp_is_monotone_in_alpha_and_rounds_fractional_orders_up() -> None:
    rdp = skellam_rdp(orders=DEFAULT_ORDERS, l1=300.0, l2=20.0, variance=2_000.0)
    assert np.all(np.diff(rdp) >= 0) and rdp[-1] > rdp[0]
    np.testing.assert_allclose(skellam_rdp(orders=[2.5, 3.0], l1=30.0, l2=4.0, variance=50.0),
                               skellam_rdp(orders=[3.0, 3.0], l1=30.0, l2=4.0, variance=50.0))


def test_skellam_rdp_degenerate_and_bad_inputs() -> None:
    np.testing.assert_array_equal(skellam_rdp(orders=[2, 3], l1=0, l2=0, variance=0.0), [0.0, 0.0])
    assert np.all(np.isinf(skellam_rdp(orders=[2, 3], l1=1, l2=1, variance=0.0)))
    for orders in ([1.0], [0.5, 2.0], [math.inf]):
        with pytest.raises(ValueError, match="orders"):
            skellam_rdp(orders=orders, l1=1, l2=1, variance=1.0)
    with pytest.raises(ValueError, match="variance"):
        skellam_rdp(orders=[2], l1=1, l2=1, variance=-1.0)
    with pytest.raises(ValueError, match="l2"):
        skellam_rdp(orders=[2], l1=1, l2=math.nan, variance=1.0)


# ---------------------------------------------------------------- skellam_epsilon


def test_default_orders_and_conversion_are_opacus_own() -> None:
    assert list(DEFAULT_ORDERS) == list(RDPAccountant.DEFAULT_ALPHAS)
    rdp = np.random.default_rng(6).uniform(0.01, 3.0, size=len(DEFAULT_ORDERS)).cumsum() / 20
    ours = rdp_to_epsilon(orders=DEFAULT_ORDERS, rdp=rdp, delta=1e-6)
    theirs = get_privacy_spent(orders=list(DEFAULT_ORDERS), rdp=rdp, delta=1e-6)
    assert ours == pytest.approx((float(theirs[0]), float(theirs[1])))


def test_epsilon_grows_with_releases_and_shrinks_with_variance() -> None:
    one = (1e4, 100.0, 400.0**2)
    eps = [skellam_epsilon(releases=[one] * k, delta=1e-5)[0] for k in (1, 2, 10, 100)]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    by_variance = [skellam_epsilon(releases=[(1e4, 100.0, v)] * 10, delta=1e-5)[0] for v in (1e4, 1e5, 1e6, 1e7)]
    assert by_variance == sorted(by_variance, reverse=True) and by_variance[-1] < by_variance[0]
    assert skellam_epsilon(releases=[one], delta=1e-5) != skellam_epsilon(releases=[one], delta=1e-3)


def test_epsilon_for_large_variance_is_within_a_few_percent_of_opacus_gaussian() -> None:
    delta, steps, sigma, l2, dim = 1e-5, 10, 20.0, 1_000.0, 1_000_000
    l1 = min(l2**2, math.sqrt(dim) * l2)
    eps, alpha = skellam_epsilon(releases=[(l1, l2, (sigma * l2) ** 2)] * steps, delta=delta)
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=1.0)
    gaussian = accountant.get_epsilon(delta=delta)
    assert gaussian <= eps <= 1.03 * gaussian, (eps, gaussian, alpha)
    assert 2 < alpha < 63
    # with little noise (variance 9, l2 = 3, l1 = l2^2) the Skellam correction shows: the comparison can fail
    small = skellam_epsilon(releases=[(9.0, 3.0, 9.0)] * steps, delta=delta)[0]
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=1.0, sample_rate=1.0)
    assert small > 1.1 * accountant.get_epsilon(delta=delta)


def test_no_releases_cost_nothing_and_bad_delta_is_refused() -> None:
    eps, alpha = skellam_epsilon(releases=[], delta=1e-5)
    assert eps == 0.0 and math.isnan(alpha)
    assert skellam_epsilon(releases=[(1.0, 1.0, 0.0)], delta=1e-5)[0] == math.inf
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match="delta"):
            skellam_epsilon(releases=[(1.0, 1.0, 1.0)], delta=delta)


# ---------------------------------------------------------------- plan_distributed_dp

PLAN = dict(clip_norm=1.0, noise_multiplier=1.1, bits=32, dim=100_000, max_summands=8, min_survivors=5,
            beta=math.exp(-0.5))


def test_plan_meets_the_target_with_min_survivors_and_never_wraps() -> None:
    plan = plan_distributed_dp(**PLAN)
    c = PLAN["clip_norm"] * plan.scale
    assert plan.target_variance == pytest.approx((PLAN["noise_multiplier"] * c) ** 2)
    assert PLAN["min_survivors"] * plan.institution_variance == pytest.approx(plan.target_variance)
    l1, l2, variance = plan.release(survivors=PLAN["min_survivors"])
    assert variance >= plan.target_variance * (1 - 1e-12)
    assert plan.release(survivors=8)[2] == pytest.approx(8 * plan.institution_variance)
    assert l2 == plan.l2_bound == pytest.approx(rounding_bound(scaled_clip=c, dim=PLAN["dim"], beta=PLAN["beta"]))
    assert c < l2 < 1.5 * c
    assert l1 == plan.l1_bound == pytest.approx(min(l2**2, math.sqrt(PLAN["dim"]) * l2))
    # Quantizer.for_range headroom: the largest sum plus ten noise standard deviations fits
    headroom = PLAN["max_summands"] * c + 10 * math.sqrt(PLAN["max_summands"] * plan.institution_variance)
    assert headroom < 2 ** (PLAN["bits"] - 1)
    # ...and the scale is the finest that fits, or the one where each institution's
    # Poisson mean reaches the sampler's accurate range (1e9), whichever is coarser.
    poisson_mean = plan.institution_variance / 2
    assert headroom > 0.99 * 2 ** (PLAN["bits"] - 1) or poisson_mean == pytest.approx(1e9)
    assert poisson_mean <= 1e9 * (1 + 1e-9)
    assert plan.quantizer() == Quantizer(scale=plan.scale, bits=PLAN["bits"])
    assert isinstance(plan, DistributedDPPlan)
    with pytest.raises(ValueError, match="surviving institution"):
        plan.release(survivors=0)


def test_a_secure_sum_of_planned_updates_carries_the_planned_noise() -> None:
    dim, n, bits = 2_000, 5, 24
    plan = plan_distributed_dp(clip_norm=2.0, noise_multiplier=0.5, bits=bits, dim=dim, max_summands=n,
                               min_survivors=4, beta=math.exp(-0.5))
    quantizer, rng = plan.quantizer(), np.random.default_rng(8)
    updates = rng.normal(size=(n, dim))
    updates *= np.minimum(1.0, plan.clip_norm / np.linalg.norm(updates, axis=1, keepdims=True))  # clip
    total = np.zeros(dim, dtype=np.int64)
    for update in updates:
        while True:  # conditional randomized rounding
            rounded = quantizer.round(quantizer.scaled(update), rng=rng)
            if conditional_rounding_accepts(squared_norm=float(rounded @ rounded), bound=plan.l2_bound):
                break
        noisy = rounded + skellam_noise(variance=plan.institution_variance, size=dim, rng=rng)
        total = (total + quantizer.wrap(noisy).astype(np.int64)) % (1 << bits)
    error = quantizer.decode(total) - updates.sum(axis=0)
    expected_std = math.sqrt(plan.release(survivors=n)[2]) / plan.scale  # value units
    assert expected_std == pytest.approx(0.5 * 2.0 * math.sqrt(n / 4))
    assert error.std() == pytest.approx(expected_std, rel=0.1)
    assert abs(error.mean()) < 5 * expected_std / math.sqrt(dim)


@pytest.mark.parametrize(("change", "message"), [
    (dict(clip_norm=0.0), "clip_norm"),
    (dict(clip_norm=math.nan), "clip_norm"),
    (dict(noise_multiplier=0.0), "noise_multiplier"),
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(bits=1), "bits"),
    (dict(bits=33), "bits"),
    (dict(dim=0), "dim"),
    (dict(max_summands=0), "max_summands"),
    (dict(min_survivors=0), "min_survivors"),
    (dict(min_survivors=9), "min_survivors"),
    (dict(beta=0.0), "beta"),
    (dict(beta=1.0), "beta"),
])
def test_bad_plans_are_refused(change: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_distributed_dp(**{**PLAN, **change})


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError, match="clip_norm.*noise_multiplier.*beta"):
        plan_distributed_dp(**{**PLAN, "clip_norm": -1.0, "noise_multiplier": 0.0, "beta": 2.0})


def test_quantization_too_coarse_for_the_model_size_is_refused() -> None:
    with pytest.raises(ValueError, match="too coarse.*more bits"):
        plan_distributed_dp(**{**PLAN, "bits": 12, "dim": 1_000_000, "max_summands": 2, "min_survivors": 2})
    plan_distributed_dp(**{**PLAN, "bits": 24, "dim": 1_000_000, "max_summands": 2, "min_survivors": 2})


def test_large_variances_keep_the_poisson_sampler_in_its_accurate_range() -> None:
    """At 32 bits the finest scale would ask for Poisson means near 1e15, where numpy's
    sampler is off by tens of percent in variance: the plan caps the scale instead."""
    plan = plan_distributed_dp(clip_norm=0.5, noise_multiplier=0.5, bits=32, dim=1_210, max_summands=4,
                               min_survivors=4, beta=math.exp(-0.5))
    assert plan.institution_variance / 2 <= 1e9 * (1 + 1e-9)
    noise = skellam_noise(variance=plan.institution_variance, size=400_000, rng=np.random.default_rng(5))
    assert abs(float(noise.astype(np.float64).var()) / plan.institution_variance - 1) < 0.02
