"""A site whose data does not fit the study's model, over real gRPC: it declines each task
with DATA_INCOMPATIBLE before spending any privacy, the coordinator records who declined
and why in the round itself, and the other sites' rounds go on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcollab.config import DataConfig, InstitutionConfig, PrivacyConfig
from fedcollab.coordinator import Coordinator
from fedcollab.data import load_dataset
from fedcollab.institution import InstitutionDaemon, daemon_from_config
from fedcollab.institution._daemon import DaemonEvent
from tests.conftest import institution_config, running, tiny_federation, wait_until

pytestmark = pytest.mark.integration

WHY = "DATA_INCOMPATIBLE: the site's data has 10 features; the study's model mlp takes 64"


def _sites(tmp_path: Path, port: int) -> list[InstitutionConfig]:
    """hospital-a and -b on digits; lab-c, under DP, with 10 of digits' 64 features."""
    good = [institution_config(n, address=f"127.0.0.1:{port}", index=i, parts=2, state_root=tmp_path)
            for i, n in enumerate(["hospital-a", "hospital-b"])]
    train, _ = load_dataset("digits", seed=0)
    path = tmp_path / "lab-c.npz"
    np.savez(path, x=train.x[:300, :10], y=train.y[:300])
    lab = institution_config("lab-c", address=f"127.0.0.1:{port}", index=0, parts=2, state_root=tmp_path)
    lab = lab.model_copy(update={
        "data": DataConfig(dataset="npz", path=path, val_fraction=0.2),
        "privacy": PrivacyConfig(target_epsilon=5.0, accountant="rdp", grad_sample_mode="hooks"),
    })
    return [*good, lab]


def _daemons(configs: list[InstitutionConfig], events: list[DaemonEvent]) -> list[InstitutionDaemon]:
    daemons = []
    for c in configs:
        d = daemon_from_config(c, on_event=events.append if c.institution.name == "lab-c" else None)
        d._poll_wait = 1.0  # the tiny federation's rounds are short
        daemons.append(d)
    return daemons


def test_a_site_whose_data_does_not_fit_declines_and_the_study_goes_on(tmp_path: Path) -> None:
    # Round 1 waits for all three, so lab-c is asked (and declines) in every round.
    config = tiny_federation(tmp_path / "coordinator", rounds=2, min_institutions=2, min_available_institutions=3)
    events: list[DaemonEvent] = []
    with Coordinator(config=config) as coordinator:
        daemons = _daemons(_sites(tmp_path, coordinator.port), events)
        with running(daemons) as outcome:
            assert coordinator.wait(timeout=120), "study did not finish"
            wait_until(lambda: len(outcome) == 3, timeout=20, what="daemons to finish")
        rounds = coordinator.store.rounds()
        lab = [p for p in coordinator.store.participations() if p["institution"] == "lab-c"]
    assert [(r["round"], r["status"]) for r in rounds] == [(1, "committed"), (2, "committed")], rounds
    assert all(r["metrics"]["num_updates"] == 2 for r in rounds)
    # Recorded per round, with the site's words, and shown in the round's reason.
    assert [(p["round"], p["status"], p["reason"]) for p in lab] == [(1, "declined", WHY), (2, "declined", WHY)]
    assert all(r["reason"] == f"declined: lab-c ({WHY})" for r in rounds), rounds
    # Nothing spent on data that could not be trained on, and no task failed (no traceback).
    assert daemons[2].privacy is not None and daemons[2].privacy.ledger.entries() == []
    assert {e.kind for e in events} <= {"joined", "declined", "evaluated", "finished"}, events
    assert [e.detail for e in events if e.kind == "declined"] == [WHY, WHY]


def test_a_round_without_quorum_says_who_declined_and_why(tmp_path: Path) -> None:
    # The symptom as it was: "quorum not met: 2 accepted updates" and nothing more.
    config = tiny_federation(tmp_path / "coordinator", rounds=1, min_institutions=3, max_round_attempts=1)
    with Coordinator(config=config) as coordinator:
        daemons = _daemons(_sites(tmp_path, coordinator.port), [])
        with running(daemons):
            wait_until(lambda: coordinator.engine.failure is not None, timeout=60, what="the study to fail")
        rounds = coordinator.store.rounds()
    assert [r["status"] for r in rounds] == ["failed"]
    assert rounds[0]["reason"] == f"quorum not met: 2 accepted updates, 3 needed; declined: lab-c ({WHY})"
    assert daemons[2].privacy is not None and daemons[2].privacy.ledger.entries() == []
