"""Aggregates that must not break the study (found by fuzzing the coordinator): an
overflowing sum of finite updates, an unchanged model, and names with a newline."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

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


def test_an_overflowing_aggregate_fails_the_round_and_the_study_goes_on(tmp_path: Path) -> None:
    config = tiny_federation(tmp_path / "c", rounds=1, min_institutions=2, central_evaluation=None,
                             evaluation_timeout_s=1)
    with Coordinator(config=config) as coordinator:
        clients = [Client(f"127.0.0.1:{coordinator.port}", n) for n in ("a", "b")]
        _round(clients, 3e38)  # each finite in float32; their weighted sum is not
        _round(clients, 0.25)  # the next attempt
        assert coordinator.wait(timeout=30)
        rounds = coordinator.store.rounds()
    assert [(r["attempt"], r["status"]) for r in rounds] == [(1, "failed"), (2, "committed")]
    assert rounds[0]["reason"].startswith("NON_FINITE_AGGREGATE")


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
