"""Aggregates that must not break the study (found by fuzzing the coordinator): an
overflowing sum of finite updates, an unchanged model, and names with a newline."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fedcollab.coordinator import Coordinator
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.wire import from_rpc_error
from tests.conftest import tiny_federation
from tests.integration.test_bad_uploads import Client, deltas_for, messages

pytestmark = pytest.mark.integration


def _round(clients: list[Client], value: float) -> None:
    for c in clients:
        task = c.task(pb.TASK_KIND_TRAIN)
        c.upload(messages(c.session, task, deltas_for(task, value)))


def test_updates_that_overflow_the_sum_are_refused_and_the_round_commits_without_them(tmp_path: Path) -> None:
    """Each 3e38 is finite in float32, and so is the first one's weighted sum; the second
    one overflows it, and is refused as it is folded. The first stays far above the
    round's median norm, and is refused at the close. The round commits, at attempt 1,
    with the two updates of 0.25."""
    config = tiny_federation(tmp_path / "c", rounds=1, min_institutions=2, min_available_institutions=4,
                             central_evaluation=None, evaluation_timeout_s=1)
    with Coordinator(config=config) as coordinator:
        clients = {n: Client(f"127.0.0.1:{coordinator.port}", n) for n in ("big-1", "big-2", "a", "b")}
        tasks = {n: c.task(pb.TASK_KIND_TRAIN) for n, c in clients.items()}
        for name, value in (("big-1", 3e38), ("big-2", 3e38), ("a", 0.25), ("b", 0.25)):
            c, task = clients[name], tasks[name]
            try:
                c.upload(messages(c.session, task, deltas_for(task, value), num_examples=1))
            except grpc.RpcError as e:
                assert (name, from_rpc_error(e).reason) == ("big-2", "UPDATE_OVERFLOWS_AGGREGATE"), e.details()
        assert coordinator.wait(timeout=30)
        rounds = coordinator.store.rounds()
        reasons = {p["institution"]: p["reason"] for p in coordinator.store.participations()}
        models = {m.version: load_file(str(m.path)) for m in coordinator.store.models()}
    assert [(r["attempt"], r["status"]) for r in rounds] == [(1, "committed")]
    assert rounds[0]["metrics"]["num_updates"] == 2
    assert reasons["big-2"] == "UPDATE_OVERFLOWS_AGGREGATE"
    assert reasons["big-1"].startswith("UPDATE_NORM_OUT_OF_BOUNDS")
    for name, value in models[1].items():
        torch.testing.assert_close(value, models[0][name] + 0.25, rtol=0, atol=1e-6)


def test_a_round_that_leaves_the_model_unchanged_commits(tmp_path: Path) -> None:
    config = tiny_federation(tmp_path / "c", rounds=2, min_institutions=2, central_evaluation=None,
                             evaluation_timeout_s=1)
    with Coordinator(config=config) as coordinator:
        clients = [Client(f"127.0.0.1:{coordinator.port}", n) for n in ("a", "b")]
        _round(clients, 0.0)
        for c in clients:
            c.evaluate()
        _round(clients, 0.5)
        assert coordinator.wait(timeout=30)
        models = coordinator.store.models()
        assert not coordinator.engine.failure
    assert [m.version for m in models] == [0, 1, 2]
    assert models[1].sha256 == models[0].sha256 != models[2].sha256


def test_names_and_reasons_with_a_trailing_newline_are_refused(tmp_path: Path) -> None:
    with Coordinator(config=tiny_federation(tmp_path / "c")) as coordinator:
        client = Client(f"127.0.0.1:{coordinator.port}", "alpha")
        with pytest.raises(grpc.RpcError) as err:
            client.stub.Join(pb.JoinRequest(institution="alpha\n"), timeout=5)
        assert from_rpc_error(err.value).reason == "INVALID_INSTITUTION_NAME"
        with pytest.raises(grpc.RpcError) as err:
            client.stub.DeclineTask(pb.DeclineTaskRequest(session_id=client.session, reason="BUDGET_EXHAUSTED\n"),
                                    timeout=5)
        assert from_rpc_error(err.value).reason == "INVALID_REASON"
        assert [i["name"] for i in coordinator.store.institutions()] == ["alpha"]
