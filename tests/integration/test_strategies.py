"""Strategies and update validation through the real coordinator over gRPC: a norm
bound refuses and records an update, over-selection closes a round at its quota (the
straggler meets ROUND_CLOSED), FedProx's mu reaches the institutions, server optimizers
keep their state across a restart, and robust rules aggregate spilled updates.

Clients speak the protocol by hand (tests/integration/test_bad_uploads.py's Client), so
every update is known and the committed models can be checked exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fedcollab.config import StrategyConfig
from fedcollab.coordinator import Coordinator
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.wire import from_rpc_error
from tests.conftest import tiny_federation
from tests.integration.test_bad_uploads import Client, deltas_for, messages

pytestmark = pytest.mark.integration
Code = grpc.StatusCode


def _models(coordinator: Coordinator) -> dict[int, dict[str, torch.Tensor]]:
    return {m.version: load_file(str(m.path)) for m in coordinator.store.models()}


def test_an_update_above_the_norm_bound_is_refused_recorded_and_left_out(tmp_path: Path) -> None:
    config = tiny_federation(tmp_path / "c", rounds=1, min_institutions=2, min_available_institutions=3,
                             central_evaluation=None, max_update_norm=1.0)
    with Coordinator(config=config) as coordinator:
        address = f"127.0.0.1:{coordinator.port}"
        clients = {n: Client(address, n) for n in ("a", "b", "big")}
        tasks = {n: c.task(pb.TASK_KIND_TRAIN) for n, c in clients.items()}
        for name, value in (("a", 0.01), ("b", -0.02)):  # 1,210 parameters: norms 0.35 and 0.70
            clients[name].upload(messages(clients[name].session, tasks[name], deltas_for(tasks[name], value)))
        with pytest.raises(grpc.RpcError) as err:  # norm 1.04: just above the bound
            clients["big"].upload(messages(clients["big"].session, tasks["big"], deltas_for(tasks["big"], 0.03)))
        assert (err.value.code(), from_rpc_error(err.value).reason) == (Code.INVALID_ARGUMENT,
                                                                         "UPDATE_NORM_OUT_OF_BOUNDS")
        assert "max_update_norm" in err.value.details()
        for c in clients.values():
            c.evaluate()
        assert coordinator.wait(timeout=30)
        models = _models(coordinator)
        row = next(p for p in coordinator.store.participations() if p["institution"] == "big")
    assert (row["status"], row["reason"]) == ("failed", "UPDATE_NORM_OUT_OF_BOUNDS")
    for name, value in models[1].items():  # the mean of a and b (10 examples each) only
        torch.testing.assert_close(value, models[0][name] + (0.01 - 0.02) / 2, rtol=0, atol=1e-6)


def test_over_selection_closes_the_round_at_its_quota_and_refuses_the_straggler(tmp_path: Path) -> None:
    config = tiny_federation(tmp_path / "c", rounds=1, min_institutions=2, min_available_institutions=3,
                             updates_per_round=2, central_evaluation=None)
    with Coordinator(config=config) as coordinator:
        address = f"127.0.0.1:{coordinator.port}"
        clients = {n: Client(address, n) for n in ("fast-1", "fast-2", "slow")}
        tasks = {n: c.task(pb.TASK_KIND_TRAIN) for n, c in clients.items()}
        for name in ("fast-1", "fast-2"):
            clients[name].upload(messages(clients[name].session, tasks[name], deltas_for(tasks[name], 0.1)))
        evaluation = clients["fast-1"].task(pb.TASK_KIND_EVALUATE)  # committed without waiting for "slow"
        assert evaluation.round == 1
        with pytest.raises(grpc.RpcError) as err:
            clients["slow"].upload(messages(clients["slow"].session, tasks["slow"], deltas_for(tasks["slow"], 9.0)))
        assert (err.value.code(), from_rpc_error(err.value).reason) == (Code.FAILED_PRECONDITION, "ROUND_CLOSED")
        row = next(p for p in coordinator.store.participations() if p["institution"] == "slow")
        models = _models(coordinator)
    assert row["status"] == "late" and row["reason"].startswith("ROUND_CLOSED")
    for name, value in models[1].items():
        torch.testing.assert_close(value, models[0][name] + 0.1, rtol=0, atol=1e-6)


def test_fedprox_sends_its_mu_with_every_training_task(tmp_path: Path) -> None:
    config = tiny_federation(tmp_path / "c", rounds=1, min_institutions=1, central_evaluation=None,
                             strategy=StrategyConfig(name="fedprox", proximal_mu=0.25))
    with Coordinator(config=config) as coordinator:
        client = Client(f"127.0.0.1:{coordinator.port}", "a")
        assert client.task(pb.TASK_KIND_TRAIN).train.proximal_mu == 0.25
        client.channel.close()


def test_the_server_optimizer_state_survives_a_restart(tmp_path: Path) -> None:
    """Two rounds of FedAdam with a coordinator restart between them give the model
    that two uninterrupted steps of the same optimizer give."""
    from fedcollab.aggregation import ServerOptimizer, ServerOptimizerSettings

    config = tiny_federation(tmp_path / "c", rounds=2, min_institutions=2, central_evaluation=None,
                             strategy=StrategyConfig(name="fedadam", eta=0.05),
                             max_weight_share=1.0)  # the exact example-weighted mean is stepped on
    values = {1: {"a": (10, 0.02), "b": (30, -0.01)}, 2: {"a": (10, 0.03), "b": (30, 0.01)}}
    for round_number in (1, 2):
        with Coordinator(config=config) as coordinator:
            address = f"127.0.0.1:{coordinator.port}"
            clients = {n: Client(address, n) for n in ("a", "b")}
            tasks = {n: c.task(pb.TASK_KIND_TRAIN) for n, c in clients.items()}
            assert all(t.round == round_number for t in tasks.values())
            for name, (n, value) in values[round_number].items():
                clients[name].upload(messages(clients[name].session, tasks[name], deltas_for(tasks[name], value),
                                              num_examples=n))
            for c in clients.values():
                c.evaluate()
                c.channel.close()
            if round_number == 2:
                assert coordinator.wait(timeout=30)
            models = _models(coordinator)
            record = [r for r in coordinator.store.rounds() if r["status"] == "committed"]
    assert len(record) == 2
    assert sorted(os.listdir(tmp_path / "c" / "optimizer")) == ["v000001.safetensors", "v000002.safetensors"]
    optimizer = ServerOptimizer(settings=ServerOptimizerSettings.defaults("fedadam", eta=0.05))
    expected = {k: v.clone().reshape(-1) for k, v in models[0].items()}
    states: dict[str, dict[str, torch.Tensor] | None] = {k: None for k in expected}
    for round_number in (1, 2):
        (na, va), (nb, vb) = values[round_number]["a"], values[round_number]["b"]
        mean = (na * va + nb * vb) / (na + nb)
        for k, params in expected.items():
            states[k] = optimizer.step_(params=params, mean_delta=torch.full_like(params, mean), state=states[k],
                                        server_round=round_number)
    for k, v in models[2].items():
        torch.testing.assert_close(v.reshape(-1), expected[k], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(models[2][k], models[0][k] + 0.02 * 0.25 + 0.0175)  # not plain FedAvg


@pytest.mark.parametrize(("name", "settings"), [("fedmedian", {}), ("krum", {"num_malicious": 1})])
def test_robust_rules_aggregate_spilled_updates_and_ignore_the_outlier(tmp_path: Path, name: str,
                                                                       settings: dict[str, int]) -> None:
    config = tiny_federation(tmp_path / "c", rounds=1, min_institutions=5, central_evaluation=None,
                             strategy=StrategyConfig(name=name, **settings))  # type: ignore[arg-type]
    honest = {"a": 0.01, "b": 0.02, "c": 0.03, "d": 0.04}
    with Coordinator(config=config) as coordinator:
        address = f"127.0.0.1:{coordinator.port}"
        clients = {n: Client(address, n) for n in [*honest, "evil"]}
        tasks = {n: c.task(pb.TASK_KIND_TRAIN) for n, c in clients.items()}
        for n, c in clients.items():
            value = honest.get(n, -50.0)
            c.upload(messages(c.session, tasks[n], deltas_for(tasks[n], value)))
        for c in clients.values():
            c.evaluate()
            c.channel.close()
        assert coordinator.wait(timeout=30)
        models = _models(coordinator)
        committed = next(r for r in coordinator.store.rounds() if r["status"] == "committed")
    assert committed["metrics"]["num_updates"] == 5
    assert not list((tmp_path / "c").rglob("*.upload")), "kept spools must be removed after the commit"
    # median of (0.01, 0.02, 0.03, 0.04, -50) is 0.02; Krum (f = 1) picks the update
    # closest to its n - f - 2 = 2 nearest neighbours: b or c, both at 0.01 from two others.
    for k, v in models[1].items():
        step = (v - models[0][k]).reshape(-1)
        if name == "fedmedian":
            torch.testing.assert_close(step, torch.full_like(step, 0.02), rtol=0, atol=1e-6)
        else:
            assert any(torch.allclose(step, torch.full_like(step, x), atol=1e-6) for x in (0.02, 0.03))
