"""The coordinator's warning that an institution's budget will not last the study, from
the spend institutions declared (fedcollab.privacy._projection, `coordinator status`)."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import pytest

from fedcollab.cli import main
from fedcollab.coordinator import Store
from fedcollab.privacy._accounting import epsilon_of
from fedcollab.privacy._projection import project_budgets

RATE, STEPS, DELTA, NOISE = 0.05, 20, 1e-5, 1.1


@functools.cache
def _epsilon(rounds: int) -> float:
    return epsilon_of(history=[(NOISE, RATE, STEPS * rounds)], delta=DELTA, accountant="rdp")


def _declared(rounds_planned: int) -> list[dict[str, Any]]:
    """What one institution declares after each of its rounds, when its noise (NOISE)
    lands exactly on its budget after `rounds_planned` rounds: the cumulative epsilon."""
    return [{"epsilon": _epsilon(k), "budget_epsilon": _epsilon(rounds_planned), "noise_multiplier": NOISE,
             "sample_rate": RATE, "steps": STEPS, "delta": DELTA, "accountant": "rdp"}
            for k in range(1, rounds_planned + 3)]


def _rows(name: str, declared: list[dict[str, Any]], rounds: list[int], status: str = "done") -> list[dict[str, Any]]:
    return [{"round": r, "attempt": 1, "institution": name, "status": status, **declared[k]}
            for k, r in enumerate(rounds)]


def test_a_site_calibrated_for_the_study_is_not_warned_about() -> None:
    rows = _rows("a", _declared(5), [1, 2])
    (p,) = project_budgets(spend=rows, total_rounds=5)
    assert (p.rounds_spent, p.remaining_rounds) == (2, 3)
    assert p.projected_epsilon == pytest.approx(_epsilon(5), rel=1e-9)
    assert not p.short


def test_a_site_that_cannot_cover_the_remaining_rounds_is_warned_about() -> None:
    declared = _declared(5)
    # The study has more rounds than the site's noise was calibrated for.
    (longer,) = project_budgets(spend=_rows("b", declared, [1, 2]), total_rounds=7)
    assert longer.short and longer.projected_epsilon == pytest.approx(_epsilon(7), rel=1e-9)
    assert "b: epsilon" in longer.warning() and "5 remaining round(s)" in longer.warning()
    # An older daemon paid for round 1 twice: three spends by round 2, one round too many.
    (twice,) = project_budgets(spend=_rows("b", declared, [1, 1, 2]), total_rounds=5)
    assert twice.rounds_spent == 3 and twice.epsilon == declared[2]["epsilon"]
    assert twice.short


def test_declines_retries_and_odd_declarations_do_not_break_it() -> None:
    declared = _declared(3)
    rows = _rows("a", declared, [1]) + _rows("a", declared, [1])  # attempt 2 re-sent round 1: one round spent
    rows += _rows("c", declared, [1], status="declined")  # a decline spends nothing
    rows += [{"round": 1, "attempt": 1, "institution": "d", "status": "done", "epsilon": 1.0, "budget_epsilon": 2.0,
              "noise_multiplier": "x", "sample_rate": 2.0, "steps": -1, "delta": 1e-5, "accountant": "nope"}]
    out = {p.institution: p for p in project_budgets(spend=rows, total_rounds=3)}
    assert set(out) == {"a", "d"}
    assert out["a"].rounds_spent == 1 and not out["a"].short
    assert math.isnan(out["d"].projected_epsilon) and not out["d"].short


def test_coordinator_status_prints_the_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    store = Store(state / "coordinator.sqlite")
    declared = _declared(2)  # its budget lasts 2 rounds; the study has 6
    for r in (1, 2):
        store.open_round(round_number=r, attempt=1, base_version=r - 1, participants=["lab-c", "site-a"])
        store.record_participation(round_number=r, attempt=1, institution="lab-c", status="done", num_examples=10,
                                   update_sha256="0" * 64, privacy=declared[r - 1])
        fine = _declared(6)[r - 1]
        store.record_participation(round_number=r, attempt=1, institution="site-a", status="done", num_examples=10,
                                   update_sha256="1" * 64, privacy=fine)
    store.close()
    federation = tmp_path / "federation.toml"
    federation.write_text(f"""
[server]
address = "127.0.0.1:0"
state_dir = "{state}"
[study]
name = "s"
rounds = 6
min_institutions = 1
[study.model]
kind = "mlp"
params = {{ in_features = 64, hidden = [16], num_classes = 10 }}
""", encoding="utf-8")
    with pytest.raises(SystemExit) as done:
        main(["coordinator", "status", "--config", str(federation)])
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code in (0, None)
    assert "warning: lab-c: epsilon" in out and "4 remaining round(s)" in out, out
    assert "site-a: epsilon" not in out
