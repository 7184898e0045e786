"""Crash-resume: the coordinator killed (-9) at each of its crash points and every
institution at one of its own, all restarted; the study still commits each round
exactly once on an intact, signed model chain, and every process exits 0.

A reduced, fixed plan of tests/chaos/crash_resume.py (which kills at random points
over 20 rounds, several runs). One run, shared by the tests below: about a minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.harness import (
    COORDINATOR,
    COORDINATOR_POINTS,
    INSTITUTION_POINTS,
    STRAYS_COORDINATOR,
    STRAYS_INSTITUTIONS,
    Fault,
    Plan,
    RunResult,
    Settings,
    run_chaos,
)

pytestmark = pytest.mark.integration

ROUNDS = 4
SETTINGS = Settings(rounds=ROUNDS, central_evaluation=False)  # no scikit-learn at each coordinator start
# Update: 1,210 float32 in 1 KiB chunks = 5 chunks; 3 institutions = 15 per round.
PLAN = Plan(
    coordinator=(
        Fault("targeted", point="coordinator.upload_chunk", count=8),  # round 1: one update in, one half in
        Fault("targeted", point="coordinator.aggregated", count=1),  # round 1 again: before anything is written
        Fault("targeted", point="coordinator.commit_written", count=1),  # model file durable, store unaware
        Fault("targeted", point="coordinator.commit_recorded", count=1),  # committed, lineage copy not written
    ),
    institutions={
        "hospital-a": (Fault("targeted", point="institution.download_chunk", count=3),),  # fetching v0
        "hospital-b": (Fault("targeted", point="institution.trained", count=2),),  # trained, nothing sent
        "lab-c": (Fault("targeted", point="institution.upload_chunk", count=8),),  # its 2nd upload, mid-stream
    },
)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    folder: Path = tmp_path_factory.mktemp("crash-resume")
    return run_chaos(folder, settings=SETTINGS, plan=PLAN, timeout_s=150)


def _check(result: RunResult, name: str) -> None:
    check = next((c for c in result.checks if c.name == name), None)
    assert check is not None, f"no check {name!r} ran: {[c.name for c in result.checks]}"
    assert check.ok, f"{check.name}: {check.detail}\n(run folder: {result.folder})"


def test_the_study_finishes_and_every_process_exits_0(chaos: RunResult) -> None:
    assert chaos.error is None, chaos.error
    _check(chaos, "every process exits 0 at the end (the study finishes)")


def test_every_planned_kill_landed_at_its_point(chaos: RunResult) -> None:
    assert not chaos.not_reached, chaos.not_reached
    landed = sorted((life.process, life.killed_by) for life in chaos.kills)
    expected = sorted([(COORDINATOR, p) for p in COORDINATOR_POINTS]
                      + [(name, f.point) for name, faults in PLAN.institutions.items() for f in faults])
    assert landed == expected
    assert {f.point for faults in PLAN.institutions.values() for f in faults} == set(INSTITUTION_POINTS)


def test_each_round_is_committed_exactly_once(chaos: RunResult) -> None:
    for name in ("exactly `rounds` rounds committed", "no round committed twice", "round attempts consistent",
                 "commits chain v(k-1) -> vk with a quorum"):
        _check(chaos, name)
    # Each coordinator kill before a commit abandons the attempt then open; commit_recorded's does not.
    assert chaos.attempts.get("committed") == ROUNDS
    assert chaos.attempts.get("abandoned", 0) >= 3, chaos.attempts


def test_the_model_chain_and_its_signed_lineage_are_intact(chaos: RunResult) -> None:
    for name in ("model chain v0..vR intact (files, SHA-256, parents)",
                 "signed lineage v0..vR (signatures, parents, contributions, copies)",
                 "`fedcollab lineage verify` passes",
                 "`fedcollab coordinator status` lists each round committed once"):
        _check(chaos, name)


def test_no_stray_files_are_left(chaos: RunResult) -> None:
    # The coordinator killed mid-upload left spool files that a restart must remove; hospital-a's
    # partial download of v0 is resumed, as v0 is still the base when it is back.
    _check(chaos, STRAYS_COORDINATOR)
    _check(chaos, STRAYS_INSTITUTIONS)
