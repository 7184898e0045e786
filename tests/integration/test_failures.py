"""An institution killed mid-upload, and a coordinator restarted between rounds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedcollab.coordinator import Coordinator, RoundResult
from fedcollab.coordinator._bounds import water_fill
from tests.conftest import institution_config, recording_daemon, running, tiny_federation, wait_until

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _assert_weighted_average(model_path: Path, sent: list[tuple[int, dict[str, torch.Tensor]]]) -> None:
    # Example-weighted, with no institution above the default max_weight_share (0.5).
    counted = water_fill({str(i): n for i, (n, _) in enumerate(sent)}, max_share=0.5)
    sent = [(counted[str(i)], state) for i, (_, state) in enumerate(sent)]
    total = sum(n for n, _ in sent)
    for name, value in load_file(str(model_path)).items():
        expected = sum(n * state[name].double() for n, state in sent) / total
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)


def test_round_completes_without_an_institution_killed_mid_upload(tmp_path: Path) -> None:
    # Round 1 opens once all three are online, and needs 2 accepted updates to commit.
    config = tiny_federation(tmp_path / "coordinator", rounds=1, min_institutions=2, min_available_institutions=3,
                             round_timeout_s=120)
    with Coordinator(config=config) as coordinator:
        address = f"127.0.0.1:{coordinator.port}"
        victim = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_half_upload.py")), address, "doomed-clinic"],
            stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            pairs = [recording_daemon(institution_config(n, address=address, index=i, parts=2, state_root=tmp_path))
                     for i, n in enumerate(["hospital-a", "hospital-b"])]
            with running([d for d, _ in pairs]) as outcome:
                assert victim.stdout is not None and victim.stdout.readline().strip() == "READY"
                os.kill(victim.pid, signal.SIGKILL)
                assert coordinator.wait(timeout=60), "the study should finish without the killed institution"
                wait_until(lambda: len(outcome) == 2, timeout=20, what="daemons to see the study finish")
        finally:
            victim.kill()
            victim.wait()
        rounds = [r for r in coordinator.store.rounds() if r["status"] == "committed"]
        doomed = [p for p in coordinator.store.participations(round_number=1) if p["institution"] == "doomed-clinic"]
        models = {m.version: m for m in coordinator.store.models()}
        leftovers = list((tmp_path / "coordinator" / "spool").glob("*"))

    assert outcome == {"hospital-a": True, "hospital-b": True}
    assert [r["round"] for r in rounds] == [1]
    assert rounds[0]["metrics"]["num_updates"] == 2
    # Recorded as a failure of its own, not a deadline: the round closed when the stream
    # broke (seen as cancelled, or as ended short, depending on how the socket closed).
    assert doomed[0]["status"] == "failed"
    assert doomed[0]["reason"] in ("UPLOAD_INTERRUPTED", "UPDATE_INCOMPLETE")
    # Nothing of the half-sent update reached the aggregate.
    _assert_weighted_average(models[1].path, [t.sent[1] for _, t in pairs])
    assert leftovers == [], "the partial upload's spool file should be gone"


def test_restarted_coordinator_resumes_after_the_last_committed_round(tmp_path: Path) -> None:
    state = tmp_path / "coordinator"
    config = tiny_federation(state, rounds=4)
    two_committed = threading.Event()

    def on_round(r: RoundResult) -> None:
        if r.status == "committed" and r.round == 2:
            two_committed.set()

    first = Coordinator(config=config, on_round=on_round)
    port = first.start()
    address = f"127.0.0.1:{port}"
    pairs = [recording_daemon(institution_config(n, address=address, index=i, parts=3, state_root=tmp_path))
             for i, n in enumerate(["hospital-a", "hospital-b", "lab-c"])]
    with running([d for d, _ in pairs]) as outcome:
        try:
            assert two_committed.wait(timeout=60), "round 2 never committed"
        finally:
            first.stop()
        # Same state folder, same port: the daemons reconnect with backoff and join again.
        second = Coordinator(config=config.model_copy(update={
            "server": config.server.model_copy(update={"address": address})}))
        with second:
            assert second.engine.current_model.version >= 2
            resumed_from = second.engine.current_model.version
            assert second.wait(timeout=60), "the restarted coordinator did not finish the study"
            wait_until(lambda: len(outcome) == 3, timeout=20, what="daemons to see the study finish")
            rounds = second.store.rounds()
            models = {m.version: m for m in second.store.models()}
            parents = second.store.model_parents()

    assert outcome == {"hospital-a": True, "hospital-b": True, "lab-c": True}
    committed = [r["round"] for r in rounds if r["status"] == "committed"]
    assert committed == [1, 2, 3, 4], "every round committed exactly once"
    assert parents == {0: None, 1: 0, 2: 1, 3: 2, 4: 3}
    assert resumed_from in (2, 3)
    # Rounds after the restart start from the model the first coordinator committed.
    for r in range(resumed_from + 1, 5):
        _assert_weighted_average(models[r].path, [t.sent[r] for _, t in pairs])
    interrupted = [r for r in rounds if r["status"] in ("failed", "abandoned")]
    assert all(r["round"] == resumed_from + 1 for r in interrupted)


def test_silent_and_idle_institutions_are_recorded_and_the_round_goes_on(tmp_path: Path) -> None:
    """One joins and goes silent (its lease expires); one keeps heartbeating but never
    uploads (the round deadline passes). The round commits with the two that delivered."""
    import grpc

    from fedcollab.v1 import coordinator_service_pb2 as pb
    from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc

    config = tiny_federation(tmp_path / "coordinator", rounds=1, min_institutions=2, min_available_institutions=4,
                             round_timeout_s=4)
    with Coordinator(config=config) as coordinator:
        address = f"127.0.0.1:{coordinator.port}"
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.CoordinatorServiceStub(channel)
        stub.Join(pb.JoinRequest(institution="silent-site"))
        idle = stub.Join(pb.JoinRequest(institution="idle-site")).session_id
        stop_beating = threading.Event()

        def beat() -> None:
            while not stop_beating.wait(0.1):
                stub.Heartbeat(pb.HeartbeatRequest(session_id=idle))

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        pairs = [recording_daemon(institution_config(n, address=address, index=i, parts=2, state_root=tmp_path))
                 for i, n in enumerate(["hospital-a", "hospital-b"])]
        with running([d for d, _ in pairs]) as outcome:
            assert coordinator.wait(timeout=60)
            wait_until(lambda: len(outcome) == 2, timeout=20, what="daemons to see the study finish")
        stop_beating.set()
        beater.join()
        channel.close()
        rows = {p["institution"]: p for p in coordinator.store.participations(round_number=1)}
        rounds = coordinator.store.rounds()

    assert (rows["silent-site"]["status"], rows["silent-site"]["reason"]) == ("vanished", "LEASE_EXPIRED")
    assert (rows["idle-site"]["status"], rows["idle-site"]["reason"]) == ("failed", "ROUND_DEADLINE")
    assert rows["hospital-a"]["status"] == rows["hospital-b"]["status"] == "done"
    assert [(r["round"], r["status"]) for r in rounds] == [(1, "committed")]
    assert rounds[0]["metrics"]["num_updates"] == 2
    _assert_weighted_average(_model_path(tmp_path, 1), [t.sent[1] for _, t in pairs])


def _model_path(tmp_path: Path, version: int) -> Path:
    (path,) = (tmp_path / "coordinator" / "models").glob(f"v{version:06d}-*.safetensors")
    return path
