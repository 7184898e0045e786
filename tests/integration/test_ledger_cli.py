"""`fedcollab institution ledger`: show, verify and export an institution's privacy ledger."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fedcollab import cli
from fedcollab.privacy._ledger import PrivacyLedger, ledger_path

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.console, "_width", 200)  # the table must not wrap or elide in the assertions


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["institution", "ledger", *args])
    return int(exit_.value.code or 0), capsys.readouterr().out


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """An institution's state folder with its site ledger: 3 rounds of study "digits-dp",
    then 1 of "other" on the same data (the site's total grows with both)."""
    state = tmp_path / "hospital-a-state"
    with PrivacyLedger(ledger_path(state)) as ledger:
        for r, eps in enumerate((0.8, 1.55, 2.31), start=1):
            ledger.append(study="digits-dp", dataset="builtin:digits", round=r, nonce=f"n{r}", epsilon=eps,
                          site_epsilon=eps, delta=1e-5, noise_multiplier=1.1, sample_rate=0.02, steps=50,
                          accountant="prv", history=[(1.1, 0.02, 50 * r)], budget_epsilon=3.0,
                          site_budget_epsilon=3.0, update_sha256=f"{r:x}" * 64)
        ledger.append(study="other", dataset="builtin:digits", round=1, nonce="m1", epsilon=0.5, site_epsilon=2.6,
                      delta=1e-6, noise_multiplier=2.0, sample_rate=0.01, steps=10, accountant="rdp",
                      history=[(2.0, 0.01, 10)], budget_epsilon=1.0, site_budget_epsilon=3.0)
    return state


@pytest.fixture
def config(tmp_path: Path, state: Path) -> Path:
    path = tmp_path / "institution.toml"
    path.write_text(f'[institution]\nname = "hospital-a"\nstate_dir = "{state.name}"\ntrainer = "synthetic"\n')
    return path


def test_table_lists_the_rows_and_a_summary_per_study(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out = run(capsys, "--config", str(config))
    assert code == 0, out
    for header in ("seq", "time (UTC)", "study", "round", "epsilon", "limit", "site", "budget", "left", "delta",
                   "noise", "rate", "steps", "acct", "update"):
        assert header in out
    lines = [line.split() for line in out.splitlines()]
    rows = [line for line in lines if line and line[0].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    # study, round, the study's epsilon and limit, the site's epsilon and budget, what is left, delta
    assert rows[2][3:11] == ["digits-dp", "3", "2.310", "3.000", "2.310", "3.000", "0.690", "1e-05"]
    assert rows[3][3:10] == ["other", "1", "0.500", "1.000", "2.600", "3.000", "0.400"]  # the site's budget binds
    assert rows[2][-1] == "3" * 12  # update hash prefix
    assert "study digits-dp: epsilon 2.31 of its limit 3.00 spent (delta 1e-05, prv accountant), 3 rounds" in out
    assert "study other: epsilon 0.50 of its limit 1.00 spent (delta 1e-06, rdp accountant), 1 round" in out
    assert "site total on builtin:digits: epsilon 2.60 of its budget 3.00 spent, over 2 studies" in out


def test_study_filter(capsys: pytest.CaptureFixture[str], state: Path) -> None:
    code, out = run(capsys, "--ledger", str(ledger_path(state)), "--study", "other")
    assert code == 0
    assert "study other:" in out and "digits-dp" not in out
    assert "site total on builtin:digits: epsilon 2.60" in out  # the site's total counts every study
    code, out = run(capsys, "--ledger", str(ledger_path(state)), "--study", "nope")
    assert code == 0 and "no entries for study nope" in out


def test_json_parses(capsys: pytest.CaptureFixture[str], state: Path) -> None:
    code, out = run(capsys, "--ledger", str(ledger_path(state)), "--json", "--study", "digits-dp")
    assert code == 0
    entries = json.loads(out)
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[-1]["epsilon"] == 2.31 and entries[-1]["history"] == [[1.1, 0.02, 150]]
    assert entries[1]["prev_hash"] == entries[0]["hash"]


def test_verify_intact(capsys: pytest.CaptureFixture[str], config: Path, state: Path) -> None:
    code, out = run(capsys, "--config", str(config), "--verify")
    assert code == 0
    with PrivacyLedger(ledger_path(state)) as ledger:
        head = ledger.entries()[-1].hash
    assert out.strip() == f"ledger intact: 4 rows, head {head[:12]}"
    code, out = run(capsys, "--config", str(config), "--verify", "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_verify_tampered_names_the_row(capsys: pytest.CaptureFixture[str], state: Path) -> None:
    db = sqlite3.connect(str(ledger_path(state)), isolation_level=None)
    db.execute("DROP TRIGGER ledger_no_update")
    db.execute("UPDATE ledger SET epsilon = 0.1 WHERE seq = 2")
    db.close()
    code, out = run(capsys, "--ledger", str(ledger_path(state)), "--verify")
    assert code == 1
    assert "does not verify" in out and "row 2: hash does not match its contents (edited?)" in out
    code, out = run(capsys, "--ledger", str(ledger_path(state)), "--verify", "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["first_bad_seq"] == 2


def test_verify_does_not_repair(capsys: pytest.CaptureFixture[str], state: Path) -> None:
    """The command only reads: it can run next to a daemon without racing its writes."""
    head = ledger_path(state).with_suffix(".head")
    before = head.read_bytes()
    db = sqlite3.connect(str(ledger_path(state)), isolation_level=None)
    db.execute("DROP TRIGGER ledger_no_delete")
    db.execute("DELETE FROM ledger WHERE seq = 4")
    db.close()
    code, out = run(capsys, "--ledger", str(ledger_path(state)), "--verify")
    assert code == 1 and "head file says 4 rows, the ledger has 3 (newest rows removed?)" in out
    assert head.read_bytes() == before


def test_missing_ledger_is_a_configuration_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out = run(capsys, "--ledger", str(tmp_path / "privacy-ledger.sqlite"))
    assert code == 2
    assert "no privacy ledger yet" in out
    assert not (tmp_path / "privacy-ledger.sqlite").exists()


def test_not_a_ledger_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    other = tmp_path / "x.sqlite"
    other.write_bytes(b"garbage" * 1000)
    code, out = run(capsys, "--ledger", str(other), "--verify")
    assert code == 1 and "not a usable privacy ledger" in out


def test_config_or_ledger_exactly_one(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["institution", "ledger"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        cli.main(["institution", "ledger", "--config", str(config), "--ledger", "x"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_installed_command(state: Path) -> None:
    """The same through `python -m fedcollab`, as a user runs it."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "fedcollab", "institution", "ledger", "--ledger",
                           str(ledger_path(state)), "--verify"],
                          check=False, env=env, text=True, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ledger intact: 4 rows, head ")


@pytest.mark.filterwarnings("ignore:GDP accounting is experimental")
def test_an_old_per_study_ledger_is_refused_until_migrated(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from tests.unit.test_site_budget import _v1_ledger

    state = tmp_path / "old-state"
    _v1_ledger(ledger_path(state), "tiny", 2, start="2026-01-01T00:00")
    _v1_ledger(ledger_path(state / "studies" / "copy"), "copy", 1, start="2026-01-02T00:00")
    path = tmp_path / "institution.toml"
    path.write_text(f'[institution]\nname = "hospital-a"\nstate_dir = "{state.name}"\n[data]\ndataset = "digits"\n'
                    '[privacy]\ntarget_epsilon = 8.0\n')
    code, out = run(capsys, "--config", str(path))
    assert code == 1 and "older fedcollab" in out and "--migrate" in out, out
    code, out = run(capsys, "--config", str(path), "--migrate")
    assert code == 0 and "3 rows" in out and "builtin:digits" in out, out
    code, out = run(capsys, "--config", str(path), "--verify")
    assert code == 0 and "ledger intact: 3 rows" in out, out
    code, out = run(capsys, "--config", str(path))
    assert "over 2 studies" in out, out


def test_old_study_ledgers_without_a_site_ledger_ask_for_migration(capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    from tests.unit.test_site_budget import _v1_ledger

    state = tmp_path / "old-state"
    _v1_ledger(ledger_path(state / "studies" / "copy"), "copy", 1, start="2026-01-02T00:00")
    path = tmp_path / "institution.toml"
    path.write_text(f'[institution]\nname = "hospital-a"\nstate_dir = "{state.name}"\ntrainer = "synthetic"\n')
    code, out = run(capsys, "--config", str(path))
    assert code == 2 and "older fedcollab" in out and "--migrate" in out, out
    code, out = run(capsys, "--config", str(path), "--migrate")  # no [data] and [privacy] to count them against
    assert code == 2 and "needs the institution's [data] and [privacy]" in out, out
    assert not ledger_path(state).exists()
