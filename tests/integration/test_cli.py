"""The `fedcollab` command as users run it: separate processes, shipped example files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def fedcollab(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedcollab", *args], cwd=cwd, env=ENV, text=True,
                          capture_output=True, timeout=timeout)


def _toml(value: Any, prefix: str = "") -> str:
    """Enough of a TOML writer for these config files (tables of scalars, lists, inline tables)."""
    scalars, tables = [], []
    for k, v in value.items():
        if isinstance(v, dict) and not (prefix.endswith("model") and k == "params"):
            tables.append(_toml(v, f"{prefix}.{k}" if prefix else k))
        else:
            scalars.append(f"{k} = {_literal(v)}")
    head = [f"[{prefix}]"] if prefix else []
    return "\n".join(head + scalars) + "\n\n" + "".join(tables)


def _literal(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_literal(x)}" for k, x in v.items()) + " }"
    return repr(v)


def test_default_simulation_reaches_95_percent(tmp_path: Path) -> None:
    done = fedcollab("simulate", "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = Path(re.search(r"run folder: (\S+)", done.stdout).group(1))  # type: ignore[union-attr]
    results = json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "rounds.png").stat().st_size > 10_000
    committed = [r for r in results["rounds"] if r["status"] == "committed"]
    assert [r["round"] for r in committed] == list(range(1, 21))
    assert [i["name"] for i in results["institutions"]] == [f"institution-{i}" for i in range(4)]
    assert results["final"]["central_accuracy"] >= 0.95, results["final"]
    assert "final global test accuracy" in done.stdout and "institution-3" in done.stdout


def test_private_scenario_spends_exactly_its_budget_and_learns(tmp_path: Path) -> None:
    """The epsilon-3 scenario end to end: each institution's ledger is intact and
    holds its budget, the coordinator's record matches it, and the model learns.
    (The quality figure, about 90%, is measured in the README; this guards against
    breakage with a margin for DP noise.)"""
    done = fedcollab("simulate", "--scenario", "simulations/digits_dp_eps3.toml", "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = Path(re.search(r"run folder: (\S+)", done.stdout).group(1))  # type: ignore[union-attr]
    results = json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "privacy.png").stat().st_size > 10_000
    ledgers = results["privacy"]["institutions"]
    assert sorted(ledgers) == [f"institution-{i}" for i in range(4)]
    for name, led in ledgers.items():
        assert led["ledger_intact"] and led["rounds_trained"] == 20
        assert 2.9 <= led["spent_epsilon"] <= 3.0, (name, led)
        reported = [p["epsilon"] for p in results["privacy"]["per_round"] if p["institution"] == name]
        assert len(reported) == 20 and reported[-1] == led["spent_epsilon"]
    assert results["final"]["central_accuracy"] >= 0.80, results["final"]


def _enroll(tmp_path: Path) -> dict[str, dict[str, str]]:
    """The PKI flow of the README through the CLI: the operator makes the CA; each
    party makes its key and CSR where it lives; the operator signs the CSRs."""
    ca = tmp_path / "pki"
    assert fedcollab("pki", "init", "--dir", str(ca), "--federation", "digits-two-hospitals").returncode == 0
    tls = {}
    for flag, name in (("--coordinator", "coordinator"), ("--institution", "hospital-a"),
                       ("--institution", "hospital-b")):
        home = tmp_path / f"{name}-keys"
        done = fedcollab("pki", "request", flag, name, "--dir", str(home))
        assert done.returncode == 0, done.stdout + done.stderr
        signed = fedcollab("pki", "sign", "--ca-dir", str(ca), "--csr", str(home / f"{name}.csr"),
                           "--out", str(home / f"{name}.pem"))
        assert signed.returncode == 0 and "SHA256:" in signed.stdout, signed.stdout + signed.stderr
        tls[name] = {"ca_cert": str(ca / "ca.pem"), "cert": str(home / f"{name}.pem"),
                     "key": str(home / f"{name}-key.pem")}
    tls["coordinator"]["crl"] = str(ca / "crl.pem")
    return tls


def test_coordinator_and_institutions_as_separate_processes_over_mutual_tls(tmp_path: Path) -> None:
    tls = _enroll(tmp_path)
    federation = tomllib.loads((REPO / "simulations" / "federation.toml").read_text())
    federation["server"].update(address="127.0.0.1:0", state_dir=str(tmp_path / "coordinator"),
                                http_address="127.0.0.1:0",  # the shipped 8080 is taken by any other run
                                heartbeat_interval_s=0.5, tls=tls["coordinator"])
    federation["study"]["rounds"] = 2
    (tmp_path / "federation.toml").write_text(_toml(federation))
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "fedcollab", "coordinator", "serve", "--config", str(tmp_path / "federation.toml"),
         "--exit-when-done", "--linger", "3"], cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    institutions: list[subprocess.Popen[str]] = []
    try:
        assert coordinator.stdout is not None
        port = None
        for line in coordinator.stdout:
            if m := re.search(r"serving study .* on 127\.0\.0\.1:(\d+)", line):
                port = m.group(1)
                break
        assert port, "the coordinator did not say where it listens"
        for name in ("hospital-a", "hospital-b"):
            inst = tomllib.loads((REPO / "institutions" / f"{name}.toml").read_text())
            inst["institution"].update(coordinator=f"127.0.0.1:{port}", state_dir=str(tmp_path / name))
            inst["tls"] = tls[name]
            (tmp_path / f"{name}.toml").write_text(_toml(inst))
            institutions.append(subprocess.Popen(
                [sys.executable, "-m", "fedcollab", "institution", "run", "--config", str(tmp_path / f"{name}.toml"),
                 "--exit-when-done"],
                cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        for p in institutions:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out
        out, _ = coordinator.communicate(timeout=60)
        assert coordinator.returncode == 0, out
    finally:
        for p in [coordinator, *institutions]:
            p.kill()
    status = fedcollab("coordinator", "status", "--config", str(tmp_path / "federation.toml"))
    assert status.returncode == 0, status.stderr
    assert len(re.findall(r"committed", status.stdout)) == 2, status.stdout
    assert "privacy spend reported by institutions" in status.stdout, status.stdout
    # The example institutions train with DP: each kept a ledger of its spend.
    ledger = fedcollab("institution", "ledger", "--config", str(tmp_path / "hospital-a.toml"), "--verify")
    assert ledger.returncode == 0 and "ledger intact: 2 rows" in ledger.stdout, ledger.stdout + ledger.stderr


@pytest.mark.parametrize("args, expected", [
    (["coordinator", "serve", "--config", "simulations/federation.toml"], "pass --insecure"),
    (["simulate", "--scenario", "no/such/scenario.toml"], "no such file"),
])
def test_mistakes_get_a_clear_message_and_exit_code_2(args: list[str], expected: str) -> None:
    done = fedcollab(*args, timeout=60)
    assert done.returncode == 2
    assert expected in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_errors_keep_their_bracketed_table_names(tmp_path: Path) -> None:
    path = tmp_path / "institution.toml"
    path.write_text('[institution]\nname = "a"\n')
    done = fedcollab("institution", "run", "--config", str(path), "--insecure", timeout=60)
    assert done.returncode == 2 and "a [data] table is needed" in done.stdout, done.stdout


def test_a_model_too_large_for_the_coordinator_is_refused_up_front(tmp_path: Path) -> None:
    path = tmp_path / "federation.toml"
    path.write_text(f'[server]\nstate_dir = "{tmp_path}/state"\n'
                    '[study.model]\nkind = "blob"\nparams = {{ num_parameters = 100000000000 }}\n'.replace("{{", "{")
                    .replace("}}", "}"))
    done = fedcollab("coordinator", "serve", "--config", str(path), "--insecure", timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "study.model" in done.stdout and "372.5 GiB" in done.stdout, done.stdout


def test_bad_scenario_names_its_key(tmp_path: Path) -> None:
    bad = tmp_path / "scenario.toml"
    bad.write_text('[simulation]\ninstitutions = 0\n[study.model]\nkind = "mlp"\n')
    done = fedcollab("simulate", "--scenario", str(bad), timeout=60)
    assert done.returncode == 2
    assert "simulation.institutions" in done.stdout and str(bad) in done.stdout


def test_plaintext_off_loopback_needs_force(tmp_path: Path) -> None:
    federation = tomllib.loads((REPO / "simulations" / "federation.toml").read_text())
    federation["server"].update(address="0.0.0.0:0", state_dir=str(tmp_path / "coordinator"))
    (tmp_path / "federation.toml").write_text(_toml(federation))
    done = fedcollab("coordinator", "serve", "--config", str(tmp_path / "federation.toml"), "--insecure", timeout=60)
    assert done.returncode == 2 and "--force-insecure" in done.stdout, done.stdout + done.stderr
    assert not (tmp_path / "coordinator").exists()  # refused before anything was created
