"""An enrolled institution that attacks the federation with numbers, over mutual TLS.

"mallory" holds a valid certificate of her own and speaks the protocol by hand (raw
gRPC, a hand-built UpdateHeader and chunks); two honest institutions send known deltas.
Each case checks the safe outcome: her weight is bounded and recorded as bounded, an
update that would overflow the sum is refused while the round commits with the honest
ones at its first attempt, and a lying evaluation count cannot set the round's figures.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fedcollab.config import TlsConfig
from fedcollab.coordinator import Coordinator
from fedcollab.coordinator._bounds import CLAIMED_METRIC
from fedcollab.pki import issue_ephemeral
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.wire import from_rpc_error
from tests.conftest import tiny_federation
from tests.integration.test_bad_uploads import Client, deltas_for, messages

pytestmark = pytest.mark.integration
Code = grpc.StatusCode
HONEST = {"hospital-a": 100, "hospital-b": 300}  # name: examples it trains on
NUMEL = 1210  # the tiny MLP's parameters


class Federation:
    """A coordinator under mutual TLS (the federation PKI's certificates), and a way to
    join it as one of its institutions, declaring a number of training examples."""

    def __init__(self, tmp_path: Path, *, rounds: int, **study: object) -> None:
        pki = issue_ephemeral(directory=tmp_path / "pki", federation="hostile",
                              institutions=[*HONEST, "hospital-c", "mallory"])
        cert, key = pki.coordinator
        values: dict[str, object] = dict(rounds=rounds, min_institutions=2, min_available_institutions=3,
                                         round_timeout_s=30, evaluation_timeout_s=5, central_evaluation=None)
        base = tiny_federation(tmp_path / "coordinator", **{**values, **study})
        config = base.model_copy(update={"server": base.server.model_copy(update={
            "tls": TlsConfig(ca_cert=pki.ca_cert, cert=cert, key=key, crl=pki.crl)})})
        self._pki = pki
        self.coordinator = Coordinator(config=config)
        self.clients: list[Client] = []

    def join(self, name: str, examples: int) -> Client:
        cert_path, key_path = self._pki.institutions[name]
        creds = grpc.ssl_channel_credentials(root_certificates=Path(self._pki.ca_cert).read_bytes(),
                                             private_key=Path(key_path).read_bytes(),
                                             certificate_chain=Path(cert_path).read_bytes())
        self.clients.append(Client(f"127.0.0.1:{self.coordinator.port}", name, creds, examples=examples))
        return self.clients[-1]


@pytest.fixture()
def federation(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[Federation] = []

    def start(*, rounds: int, **study: object) -> Federation:
        started.append(Federation(tmp_path, rounds=rounds, **study))
        started[-1].coordinator.__enter__()
        return started[-1]

    yield start
    for f in started:
        for c in f.clients:
            c.channel.close()
        f.coordinator.__exit__(None, None, None)


def _honest_round(clients: dict[str, Client], tasks: dict[str, pb.Task], values: dict[str, float]) -> None:
    for name, value in values.items():
        c = clients[name]
        c.upload(messages(c.session, tasks[name], deltas_for(tasks[name], value), num_examples=HONEST[name]))


def _refused(call, code: Code, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert (err.value.code(), from_rpc_error(err.value).reason) == (code, reason), err.value.details()


def _evaluate(clients: dict[str, Client]) -> None:
    for c in clients.values():
        c.evaluate()


def test_a_huge_example_count_buys_at_most_the_share_it_is_allowed(federation) -> None:  # type: ignore[no-untyped-def]
    f = federation(rounds=3)
    coordinator, join = f.coordinator, f.join
    clients = {n: join(n, 1000) for n in HONEST}
    mallory = clients["mallory"] = join("mallory", 10**12)  # declares the count she will claim
    # Round 1: +5 everywhere, claiming 10^12 examples. The study's cap makes it 10^8, and
    # the share cap (0.5) makes it as heavy as both honest updates together: 400.
    tasks = {n: c.task(pb.TASK_KIND_TRAIN) for n, c in clients.items()}
    _honest_round(clients, tasks, {"hospital-a": 1.0, "hospital-b": -1.0})
    mallory.upload(messages(mallory.session, tasks["mallory"], deltas_for(tasks["mallory"], 5.0),
                            num_examples=10**12))
    _evaluate(clients)
    # Round 2: the norm bound is now 10 x round 1's median norm (that of a delta of 1.0):
    # 20.0 everywhere is refused; the honest round commits, the larger weight capped again.
    tasks = {n: c.task(pb.TASK_KIND_TRAIN) for n, c in clients.items()}
    _refused(lambda: mallory.upload(messages(mallory.session, tasks["mallory"], deltas_for(tasks["mallory"], 20.0),
                                             num_examples=10**12)), Code.INVALID_ARGUMENT, "UPDATE_NORM_OUT_OF_BOUNDS")
    _honest_round(clients, tasks, {"hospital-a": 0.5, "hospital-b": 0.25})
    _evaluate(clients)
    # Round 3: mallory joins again declaring 10 examples, and claims more.
    clients["mallory"] = mallory = join("mallory", 10)
    tasks = {n: c.task(pb.TASK_KIND_TRAIN) for n, c in clients.items()}
    _refused(lambda: mallory.upload(messages(mallory.session, tasks["mallory"], deltas_for(tasks["mallory"], 0.1),
                                             num_examples=11)), Code.INVALID_ARGUMENT, "EXAMPLE_COUNT_ABOVE_DECLARED")
    _honest_round(clients, tasks, {"hospital-a": 0.1, "hospital-b": 0.1})
    _evaluate(clients)
    assert coordinator.wait(timeout=30)
    models = {m.version: load_file(str(m.path)) for m in coordinator.store.models()}
    rounds = [r for r in coordinator.store.rounds() if r["status"] == "committed"]
    rows = {(p["round"], p["institution"]): p for p in coordinator.store.participations()}
    records = {v: json.loads(r) for v, r, _ in coordinator.engine.lineage()}

    assert [(r["round"], r["attempt"]) for r in rounds] == [(1, 1), (2, 1), (3, 1)]
    steps = {1: (100 * 1.0 + 300 * -1.0 + 400 * 5.0) / 800, 2: (0.5 + 0.25) / 2, 3: 0.1}
    for v, step in steps.items():
        for name, value in models[v].items():
            torch.testing.assert_close(value, models[v - 1][name] + step, rtol=0, atol=1e-5, msg=f"round {v}")
    assert steps[1] == 2.25  # not base + 5
    assert (rows[1, "mallory"]["status"], rows[1, "mallory"]["num_examples"]) == ("done", 400)
    assert rows[1, "mallory"]["metrics"][CLAIMED_METRIC] == 10**12
    assert rounds[0]["metrics"]["num_examples"] == 800
    contributions = {c["institution"]: c["num_examples"] for c in records[1]["contributions"]}
    assert contributions == {"hospital-a": 100, "hospital-b": 300, "mallory": 400}  # signed: what counted
    assert records[1]["aggregator"]["bounded_weights"]["claimed"] == {"mallory": 10**12}
    assert rounds[1]["metrics"]["update_norm_bound"] == pytest.approx(10 * NUMEL**0.5, rel=1e-5)
    assert rows[2, "mallory"]["reason"] == "UPDATE_NORM_OUT_OF_BOUNDS"
    assert rows[2, "hospital-b"]["num_examples"] == 100  # an honest share above 0.5 is capped alike
    assert rows[3, "mallory"]["reason"] == "EXAMPLE_COUNT_ABOVE_DECLARED"


def test_an_overflowing_update_is_refused_and_the_round_commits_at_once(federation) -> None:  # type: ignore[no-untyped-def]
    f = federation(rounds=2)
    coordinator, join = f.coordinator, f.join
    clients = {n: join(n, 1000) for n in HONEST}
    mallory = clients["mallory"] = join("mallory", 10**12)
    tasks = {n: c.task(pb.TASK_KIND_TRAIN) for n, c in clients.items()}
    _honest_round(clients, {n: tasks[n] for n in HONEST}, {"hospital-a": 0.25})
    # Finite float32 values that overflow the sum once weighted: refused as they are folded.
    _refused(lambda: mallory.upload(messages(mallory.session, tasks["mallory"], deltas_for(tasks["mallory"], 3e38),
                                             num_examples=10**12)), Code.INVALID_ARGUMENT, "UPDATE_OVERFLOWS_AGGREGATE")
    _honest_round(clients, tasks, {"hospital-b": -0.5})
    _evaluate(clients)
    # The study goes on, and mallory, refused in round 1, takes part in round 2.
    tasks = {n: c.task(pb.TASK_KIND_TRAIN) for n, c in clients.items()}
    _honest_round(clients, tasks, {"hospital-a": 0.1, "hospital-b": 0.1})
    mallory.upload(messages(mallory.session, tasks["mallory"], deltas_for(tasks["mallory"], 0.1), num_examples=100))
    _evaluate(clients)
    assert coordinator.wait(timeout=30)
    assert not coordinator.engine.failure
    rounds = coordinator.store.rounds()
    models = {m.version: load_file(str(m.path)) for m in coordinator.store.models()}
    mallory_row = next(p for p in coordinator.store.participations() if p["institution"] == "mallory")

    assert [(r["round"], r["attempt"], r["status"]) for r in rounds] == [(1, 1, "committed"), (2, 1, "committed")]
    assert rounds[0]["metrics"]["num_updates"] == 2
    assert (mallory_row["status"], mallory_row["reason"]) == ("failed", "UPDATE_OVERFLOWS_AGGREGATE")
    step = (100 * 0.25 + 100 * -0.5) / 200  # the honest ones only (hospital-b's 300 capped to half)
    for name, value in models[1].items():
        torch.testing.assert_close(value, models[0][name] + step, rtol=0, atol=1e-6)
    assert coordinator.engine.failures["UPDATE_OVERFLOWS_AGGREGATE"] == 1


def test_a_huge_evaluation_count_cannot_set_the_rounds_accuracy(federation) -> None:  # type: ignore[no-untyped-def]
    f = federation(rounds=1)
    coordinator, join = f.coordinator, f.join
    clients = {n: join(n, 1000) for n in HONEST}
    mallory = clients["mallory"] = join("mallory", 1000)
    tasks = {n: c.task(pb.TASK_KIND_TRAIN) for n, c in clients.items()}
    _honest_round(clients, tasks, {"hospital-a": 0.01, "hospital-b": 0.01})
    mallory.upload(messages(mallory.session, tasks["mallory"], deltas_for(tasks["mallory"], 0.01), num_examples=100))
    honest = {"hospital-a": (100, 0.05, 0.986), "hospital-b": (120, 0.07, 0.97)}
    for name, (n, loss, accuracy) in {**honest, "mallory": (9 * 10**18, 40.0, 0.0)}.items():
        task = clients[name].task(pb.TASK_KIND_EVALUATE)
        clients[name].stub.ReportEvaluation(pb.ReportEvaluationRequest(
            session_id=clients[name].session, round=task.round, nonce=task.nonce, model_sha256=task.model.sha256,
            num_examples=n, loss=loss, accuracy=accuracy), timeout=5)
    assert coordinator.wait(timeout=30)
    metrics = coordinator.store.rounds()[0]["metrics"]
    evaluations = {e["institution"]: e["num_examples"] for e in coordinator.store.evaluations()}

    # 9e18 counts as the 10^8 the study allows, then as much as both others together (220).
    assert evaluations == {"hospital-a": 100, "hospital-b": 120, "mallory": 220}
    assert metrics["eval_examples"] == 440
    assert metrics["eval_accuracy"] == pytest.approx((100 * 0.986 + 120 * 0.97) / 440)  # was 1.6e-17
    assert metrics["eval_accuracy"] >= 0.5 * min(a for _, _, a in honest.values())  # at most half of it moved
    assert metrics["eval_accuracy_median"] == 0.97  # the median of the three reports stays with the honest ones


def _selected(clients: dict[str, Client], count: int) -> dict[str, pb.Task]:
    """The TRAIN tasks of the `count` institutions selected for the round now open."""
    got: dict[str, pb.Task] = {}
    for _ in range(100):
        for name, c in clients.items():
            if name not in got:
                task = c.stub.PollTask(pb.PollTaskRequest(session_id=c.session, wait_seconds=0.05), timeout=5).task
                if task.kind == pb.TASK_KIND_TRAIN:
                    got[name] = task
        if len(got) == count:
            return got
    raise AssertionError(f"only {sorted(got)} got a task")


def test_a_round_failed_by_a_refused_institution_is_not_an_attempt(federation) -> None:  # type: ignore[no-untyped-def]
    """Quorum 3 of 3 selected from 4: mallory's refusal leaves 2, so attempt 1 fails. It is
    not counted (max_round_attempts = 1 would end the study otherwise), and attempt 2
    leaves her out and commits with the three honest institutions."""
    names = ["hospital-a", "hospital-b", "hospital-c", "mallory"]
    # The study's seed decides who is selected (as the engine draws them); one where mallory is.
    seed = next(s for s in range(100) if "mallory" in random.Random(str((s, 1, 1))).sample(names, 3))
    f = federation(rounds=1, min_institutions=3, min_available_institutions=4, institutions_per_round=3,
                   max_round_attempts=1, seed=seed)
    coordinator = f.coordinator
    clients = {n: f.join(n, 10**12 if n == "mallory" else 1000) for n in names}
    tasks = _selected(clients, 3)
    assert "mallory" in tasks
    for name, task in tasks.items():
        c = clients[name]
        if name == "mallory":
            _refused(lambda c=c, task=task: c.upload(messages(c.session, task, deltas_for(task, 3e38),
                                                              num_examples=10**12)),
                     Code.INVALID_ARGUMENT, "UPDATE_OVERFLOWS_AGGREGATE")
        else:
            c.upload(messages(c.session, task, deltas_for(task, 0.1), num_examples=100))
    tasks = _selected(clients, 3)
    assert sorted(tasks) == ["hospital-a", "hospital-b", "hospital-c"]
    for name, task in tasks.items():
        clients[name].upload(messages(clients[name].session, task, deltas_for(task, 0.1), num_examples=100))
    _evaluate(clients)
    assert coordinator.wait(timeout=30)
    assert not coordinator.engine.failure
    rounds = coordinator.store.rounds()
    assert [(r["attempt"], r["status"], r["counted"]) for r in rounds] == [(1, "failed", 0), (2, "committed", 1)]
    assert rounds[0]["reason"].startswith("quorum not met")
    assert coordinator.store.counted_attempts(1) == 0
