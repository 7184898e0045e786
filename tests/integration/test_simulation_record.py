"""results.json says how a simulation ran: over mutual TLS from the run folder's own CA
(paths that exist, inside the run folder) or in plaintext, with the coordinator's
state where it really was, not the [server] values the simulation overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from fedcollab.config import Scenario, SimulationConfig, StudyConfig
from fedcollab.simulation import run_simulation
from tests.conftest import TINY_MLP

pytestmark = pytest.mark.integration


def _scenario(tmp_path: Path) -> Scenario:
    return Scenario(
        simulation=SimulationConfig(name="record", institutions=2, output_dir=tmp_path / "unused"),
        study=StudyConfig(name="record", rounds=1, min_institutions=2, round_timeout_s=30, evaluation_timeout_s=10,
                          model=TINY_MLP),
    )


@pytest.mark.parametrize("insecure", [False, True], ids=["mutual-tls", "insecure"])
def test_results_record_the_transport_and_state_the_run_used(tmp_path: Path, insecure: bool) -> None:
    scenario = _scenario(tmp_path)
    assert scenario.server.tls is None  # the scenario names no TLS: the run makes its own CA
    with (tmp_path / "console.txt").open("w", encoding="utf-8") as out:
        result = run_simulation(scenario=scenario, output_dir=tmp_path / "runs", insecure=insecure,
                                console=Console(file=out, width=200))
    run_dir = result.run_dir
    recorded = json.loads((run_dir / "results.json").read_text())
    assert recorded == json.loads(json.dumps(result.results))
    server = recorded["scenario"]["server"]
    assert Path(server["state_dir"]) == run_dir / "coordinator" == Path(recorded["state"]["coordinator"])
    assert (run_dir / "coordinator" / "coordinator.sqlite").is_file()
    assert server["address"].startswith("127.0.0.1:") and not server["address"].endswith(":0")
    assert recorded["state"]["institutions"] == {
        f"institution-{i}": str(run_dir / "institutions" / f"institution-{i}") for i in range(2)}
    transport = recorded["transport"]
    if insecure:
        assert server["tls"] is None and transport["mode"] == "insecure"
        return
    assert transport["mode"] == "mutual-tls"
    ca = Path(transport["ca_cert"])
    assert ca.is_file() and ca.is_relative_to(run_dir / "pki")
    assert Path(server["tls"]["ca_cert"]) == ca and server["tls"]["require_client_auth"] is True
    assert Path(transport["coordinator_cert"]).is_file() and Path(transport["crl"]).is_file()
    certs = transport["institution_certs"]
    assert sorted(certs) == ["institution-0", "institution-1"]
    assert all(Path(c).is_file() and Path(c).is_relative_to(run_dir / "pki") for c in certs.values())
