"""Privacy accounting against Opacus: golden figures and step-by-step equivalence."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant

from fedcollab.privacy import PrivacyError, calibrate_noise, compose, epsilon_of

# Opacus 1.6.0's figures for its MNIST example (Abadi et al. 2016 settings): noise 1.1,
# batch 256 of 60,000, 60 epochs (14,062 steps), delta 1e-5. Recorded from
# `opacus.accountants.{RDP,PRV,Gaussian}Accountant` with that history; a change here
# means the accountant changed, and every recorded budget with it.
MNIST = [(1.1, 256 / 60000, 14062)]
GOLDEN = [
    ("rdp", MNIST, 1e-5, 2.5965558689607486),
    ("prv", MNIST, 1e-5, 2.391743695945225),
    ("gdp", MNIST, 1e-5, 2.3242688733471946),
    ("rdp", [(1.0, 0.01, 100)], 1e-5, 1.2141452107864754),
    ("prv", [(1.0, 0.01, 100)], 1e-5, 0.7281339329831141),
    ("rdp", [(3.0, 0.2, 50), (2.0, 0.1, 30)], 1e-6, 3.016654680601539),
    ("prv", [(3.0, 0.2, 50), (2.0, 0.1, 30)], 1e-6, 2.792031949388895),
    ("gdp", [(3.0, 0.2, 50), (2.0, 0.1, 30)], 1e-6, 1.254019152501112),
]


@pytest.mark.parametrize(("accountant", "history", "delta", "expected"), GOLDEN)
def test_epsilon_matches_opacus_golden_values(accountant: str, history: list, delta: float, expected: float) -> None:
    # RDP and GDP are closed forms: equal to the last digits. PRV discretises the privacy
    # loss and convolves it by FFT, whose last digits follow the NumPy/SciPy build (SciPy
    # 1.17.1 moved the MNIST figure by 3e-9 relative); 1e-7 still catches any change in
    # the accountant itself, whose own error bound (eps_error) is 1e-2.
    rel = 1e-7 if accountant == "prv" else 1e-9
    assert epsilon_of(history=history, delta=delta, accountant=accountant) == pytest.approx(expected, rel=rel)


def test_history_built_round_by_round_equals_opacus_stepping() -> None:
    """The ledger composes one round at a time; Opacus steps one batch at a time."""
    live = RDPAccountant()
    history: list[tuple[float, float, int]] = []
    for _round in range(5):
        for _ in range(12):
            live.step(noise_multiplier=1.3, sample_rate=0.05)
        history = compose(history, noise_multiplier=1.3, sample_rate=0.05, steps=12)
    assert history == [(1.3, 0.05, 60)]  # merged: the stored state stays one entry
    assert epsilon_of(history=history, delta=1e-5, accountant="rdp") == pytest.approx(
        live.get_epsilon(delta=1e-5), rel=1e-12)


def test_compose_keeps_distinct_settings_apart() -> None:
    h = compose([], noise_multiplier=1.0, sample_rate=0.1, steps=10)
    h = compose(h, noise_multiplier=1.0, sample_rate=0.2, steps=5)
    h = compose(h, noise_multiplier=1.0, sample_rate=0.2, steps=0)
    assert h == [(1.0, 0.1, 10), (1.0, 0.2, 5)]


@pytest.mark.parametrize("accountant", ["prv", "rdp", "gdp"])
def test_calibrated_noise_meets_the_target_within_one_percent(accountant: str) -> None:
    z = calibrate_noise(target_epsilon=3.0, delta=1e-5, sample_rate=0.2, steps=100, accountant=accountant)
    eps = epsilon_of(history=[(z, 0.2, 100)], delta=1e-5, accountant=accountant)
    assert 2.97 <= eps <= 3.0


def test_spend_grows_with_steps_and_is_zero_without_any() -> None:
    assert epsilon_of(history=[], delta=1e-5, accountant="prv") == 0.0
    a = epsilon_of(history=[(2.0, 0.1, 10)], delta=1e-5, accountant="prv")
    b = epsilon_of(history=[(2.0, 0.1, 20)], delta=1e-5, accountant="prv")
    assert 0 < a < b


def test_noiseless_steps_have_no_finite_epsilon() -> None:
    assert math.isinf(epsilon_of(history=[(0.0, 0.1, 10)], delta=1e-5, accountant="rdp"))


def test_unknown_accountant_and_impossible_budget_are_clear_errors() -> None:
    with pytest.raises(PrivacyError, match="unknown accountant 'moments'"):
        epsilon_of(history=[(1.0, 0.1, 1)], delta=1e-5, accountant="moments")
    with pytest.raises(PrivacyError, match="no noise level reaches epsilon"):
        calibrate_noise(target_epsilon=1e-9, delta=1e-12, sample_rate=1.0, steps=10**6, accountant="rdp")
