"""The institution's budget: calibration once per study, refusal past the budget,
spend that survives a restart, and settings that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedcollab.config import InstitutionConfig, PrivacyConfig, load_config
from fedcollab.errors import ConfigError
from fedcollab.privacy import (
    BudgetExhausted,
    InstitutionPrivacy,
    PrivacyError,
    epsilon_of,
    train_private,
    validate_model,
)
from fedcollab.privacy._ledger import PrivacyLedger, ledger_path


def _privacy(tmp_path: Path, n: int = 300, **config: object) -> InstitutionPrivacy:
    values: dict[str, object] = {"target_epsilon": 3.0, "target_delta": 1e-5, "accountant": "rdp"}
    values.update(config)
    return InstitutionPrivacy(config=PrivacyConfig(**values), ledger=PrivacyLedger(ledger_path(tmp_path)),
                              num_examples=n)


def _spend_round(p: InstitutionPrivacy, r: int, *, rounds: int = 5, epochs: int = 1, study: str = "s") -> float:
    rp = p.plan(study=study, total_rounds=rounds, round_number=r, nonce=f"n{r}", epochs=epochs, batch_size=60)
    p.record(rp, update_sha256="ab" * 32)
    return rp.epsilon_after


def test_planned_rounds_spend_the_target_and_no_more(tmp_path: Path) -> None:
    p = _privacy(tmp_path)
    rp = p.plan(study="s", total_rounds=5, round_number=1, nonce="x", epochs=1, batch_size=60)
    assert rp.steps == 5 and rp.sample_rate == pytest.approx(0.2)  # 300 examples in batches of 60
    assert p.ledger.entries() == []  # planning spends nothing
    spent = [_spend_round(p, r) for r in range(1, 6)]
    assert spent == sorted(spent)
    assert 2.95 <= spent[-1] <= 3.0


def test_a_round_past_the_budget_is_refused_and_spends_nothing(tmp_path: Path) -> None:
    p = _privacy(tmp_path)
    for r in range(1, 6):
        _spend_round(p, r)
    before = p.spent(study="s")
    with pytest.raises(BudgetExhausted, match="past this institution's budget of 3") as e:
        p.plan(study="s", total_rounds=5, round_number=6, nonce="n6", epochs=1, batch_size=60)
    assert e.value.spent == before and e.value.would_be > 3.0
    assert p.spent(study="s") == before
    assert len(p.ledger.entries()) == 5


def test_more_local_epochs_than_planned_hit_the_budget_sooner(tmp_path: Path) -> None:
    """The coordinator sets the plan, not the price: noise stays as calibrated for the
    first round's plan, so asking for more steps spends faster and is refused."""
    p = _privacy(tmp_path)
    _spend_round(p, 1)
    with pytest.raises(BudgetExhausted):
        for r in range(2, 6):
            _spend_round(p, r, epochs=3)


def test_a_restart_does_not_reset_the_spend(tmp_path: Path) -> None:
    first = _privacy(tmp_path)
    a = _spend_round(first, 1)
    _spend_round(first, 2)
    noise = first.ledger.entries()[0].noise_multiplier
    first.ledger.close()
    again = _privacy(tmp_path)  # the daemon restarted: same state folder
    assert again.spent(study="s") > a
    rp = again.plan(study="s", total_rounds=5, round_number=3, nonce="n3", epochs=1, batch_size=60)
    assert rp.noise_multiplier == noise  # calibrated once per study, not again
    assert rp.epsilon_after == pytest.approx(
        epsilon_of(history=[(noise, 0.2, 15)], delta=1e-5, accountant="rdp"))


def test_each_study_has_its_own_spend(tmp_path: Path) -> None:
    p = _privacy(tmp_path)
    _spend_round(p, 1, study="a")
    assert p.spent(study="b") == 0.0
    assert p.recorded(study="a", round_number=1, nonce="n1") is not None
    assert p.recorded(study="a", round_number=1, nonce="other") is None


def test_delta_not_below_one_over_n_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PrivacyError, match="not below 1/n"):
        _privacy(tmp_path, n=50, target_delta=0.05)


def test_invalid_privacy_settings_name_the_key(tmp_path: Path) -> None:
    cases = {
        "target_epsilon = 0": "privacy.target_epsilon",
        "target_epsilon = 3\ntarget_delta = 0.5": "privacy.target_delta",
        "target_epsilon = 3\naccountant = \"moments\"": "privacy.accountant",
        "target_epsilon = 3\ngrad_sample_mode = \"fast\"": "privacy.grad_sample_mode",
        "target_epsilon = 3\nbudget_epsilon = 2": "budget_epsilon (2.0) is below target_epsilon",
        "target_epsilon = 3\nmax_grad_norm = -1": "privacy.max_grad_norm",
        "target_epsilon = 3\nepsilon = 3": "privacy.epsilon: unknown key",
    }
    for body, expected in cases.items():
        path = tmp_path / "institution.toml"
        path.write_text(f'[institution]\nname = "a"\n[data]\ndataset = "digits"\n[privacy]\n{body}\n')
        with pytest.raises(ConfigError) as e:
            load_config(InstitutionConfig, path)
        assert expected in str(e.value), (body, str(e.value))


def test_a_model_opacus_cannot_train_gets_the_fix() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(PrivacyError, match="BatchNorm -> GroupNorm"):
        validate_model(model)


def test_private_training_takes_exactly_the_accounted_steps_and_learns() -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(4, 2))
    before = nn.functional.cross_entropy(model(x), y).item()
    done = train_private(model=model, x=x, y=y, epochs=3, batch_size=50, optimizer="sgd", learning_rate=0.5,
                         noise_multiplier=0.5, max_grad_norm=1.0, mode="hooks")
    assert done.steps == 12  # 3 epochs x ceil(200 / 50) Poisson-sampled steps
    assert nn.functional.cross_entropy(model(x), y).item() < before
    assert not hasattr(model, "_module")  # the plain model is handed back unwrapped
