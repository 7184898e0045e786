"""What keeps one coordinator responsive under hundreds of institutions
(benchmarks/load.py): long-polls woken only by what concerns them, an evaluation
sample, per-call rows without an fsync, the identity check built once per method.

An in-process engine with its round driver, no gRPC: every wait here is bounded, and
the delays asserted are well under the 1 s at which a waiting long-poll wakes anyway,
so a missed wake-up fails the test instead of only slowing it."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch

from fedcollab.config import FederationConfig, ModelConfig, ServerConfig, StudyConfig
from fedcollab.coordinator._auth import IdentityInterceptor
from fedcollab.coordinator._checkpoints import ModelVersion
from fedcollab.coordinator._engine import RoundEngine
from fedcollab.coordinator._store import Store
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.wire import iter_chunks, stream_sha256, torch_dtype

# A task due now reaches a poller that was already waiting within this; without a
# wake-up it would take until the poller's own 1 s tick.
PROMPT_S = 0.6
# How long a poller waits before the event it should be woken by: its tick then comes
# 1 - LEAD_S after the event, beyond PROMPT_S.
LEAD_S = 0.15


class Federation:
    """An engine, its store and its round driver; every institution joined up front."""

    def __init__(self, state: Path, names: list[str], **study: Any) -> None:
        config = FederationConfig(
            server=ServerConfig(address="127.0.0.1:0", state_dir=state, chunk_bytes=1024, heartbeat_interval_s=1.0,
                                lease_intervals=10, max_poll_wait_s=5.0),
            study=StudyConfig(**{"name": "load", "rounds": 1, "min_institutions": len(names), "round_timeout_s": 30,
                                 "evaluation_timeout_s": 30, "seed": 7,
                                 "model": ModelConfig(kind="mlp", params={"in_features": 8, "hidden": [4],
                                                                          "num_classes": 3}),
                                 **study}),
        )
        self.store = Store(state / "coordinator.sqlite")
        self.engine = RoundEngine(config=config, store=self.store, models_dir=state / "models",
                                  spool_dir=state / "spool")
        self.sessions = {n: self.engine.join(institution=n, num_train_examples=10)[0] for n in names}
        self._stop = threading.Event()
        self._driver = threading.Thread(target=self.engine.run, args=(self._stop,), daemon=True)
        self._pool = ThreadPoolExecutor(max_workers=len(names))

    def start(self) -> None:
        self._driver.start()

    def poll(self, name: str, *, wait_s: float = 5.0) -> pb.Task:
        return self.engine.poll(session_id=self.sessions[name], wait_s=wait_s)

    def poll_later(self, name: str, *, wait_s: float = 5.0) -> Future[tuple[pb.Task, float]]:
        """A long-poll in its own thread: (its task, when it returned)."""
        return self._pool.submit(lambda: (self.poll(name, wait_s=wait_s), time.monotonic()))

    def upload(self, name: str, task: pb.Task) -> None:
        assert task.kind == pb.TASK_KIND_TRAIN, task
        deltas = [torch.full(tuple(s.shape), 0.01, dtype=torch_dtype(s.dtype)) for s in task.manifest.tensors]
        header = pb.UpdateHeader(
            session_id=self.sessions[name], round=task.round, nonce=task.nonce, base_version=task.model.version,
            manifest=task.manifest, total_bytes=sum(t.numel() * t.element_size() for t in deltas),
            sha256=stream_sha256(deltas), num_examples=10,
        )
        upload = self.engine.start_upload(header=header)
        for chunk in iter_chunks(deltas, chunk_bytes=1024):
            self.engine.accept_chunk(upload, chunk)
        self.engine.finish_upload(upload)

    def report(self, name: str, task: pb.Task) -> None:
        assert task.kind == pb.TASK_KIND_EVALUATE, task
        self.engine.report_evaluation(request=pb.ReportEvaluationRequest(
            session_id=self.sessions[name], round=task.round, nonce=task.nonce, model_sha256=task.model.sha256,
            num_examples=10, loss=0.5, accuracy=0.5))

    def train_all(self) -> None:
        for name in self.sessions:
            self.upload(name, self.poll(name))

    def evaluators(self) -> dict[str, pb.Task]:
        """Who is asked to evaluate, once the round has committed: every institution
        polls at once, the others' polls end empty after 1 s."""
        polls = {n: self.poll_later(n, wait_s=1.0) for n in self.sessions}
        tasks = {n: f.result(timeout=30)[0] for n, f in polls.items()}
        assert {t.kind for t in tasks.values()} <= {pb.TASK_KIND_EVALUATE, pb.TASK_KIND_WAIT}, tasks
        return {n: t for n, t in tasks.items() if t.kind == pb.TASK_KIND_EVALUATE}

    def close(self) -> None:
        self._stop.set()
        if self._driver.is_alive():
            self._driver.join(timeout=10)
        self._pool.shutdown(wait=True)
        self.store.close()


@contextmanager
def federation(state: Path, names: list[str], **study: Any) -> Iterator[Federation]:
    f = Federation(state, names, **study)
    try:
        yield f
    finally:
        f.close()


def _delivered(future: Future[tuple[pb.Task, float]], kind: int, *, since: float) -> float:
    task, at = future.result(timeout=30)
    assert task.kind == kind, f"expected {pb.TaskKind.Name(kind)}, got {task}"
    return at - since


# ------------------------------------------------------------------ evaluation sample
def test_only_the_evaluation_sample_gets_evaluate_tasks(tmp_path: Path) -> None:
    names = [f"site-{i}" for i in range(6)]
    samples = []
    for run in ("first", "again"):
        with federation(tmp_path / run, names, evaluation_institutions_per_round=2) as f:
            f.start()
            f.train_all()
            evaluating = f.evaluators()
            for name, task in evaluating.items():
                f.report(name, task)
            assert f.poll(names[0]).kind == pb.TASK_KIND_FINISHED
            recorded = sorted(e["institution"] for e in f.store.evaluations())
            metrics = f.store.rounds()[0]["metrics"]
        assert len(evaluating) == 2
        assert recorded == sorted(evaluating)
        assert metrics["eval_institutions"] == 2.0 and metrics["eval_examples"] == 20.0
        samples.append(sorted(evaluating))
    assert samples[0] == samples[1], "the sample is drawn from the study's seed: the same in every run"


def test_evaluation_sample_larger_than_the_online_asks_everyone(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    with federation(tmp_path, names, evaluation_institutions_per_round=10) as f:
        f.start()
        f.train_all()
        assert sorted(f.evaluators()) == names


# ------------------------------------------------------------------ long-poll wake-ups
def test_every_task_kind_reaches_a_waiting_poller_promptly(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    with federation(tmp_path, names) as f:
        # TRAIN: all three wait before the round opens.
        polls = {n: f.poll_later(n) for n in names}
        time.sleep(LEAD_S)
        opened = time.monotonic()
        f.start()
        trains = {n: polls[n].result(timeout=30)[0] for n in names}
        for n in names:
            assert _delivered(polls[n], pb.TASK_KIND_TRAIN, since=opened) < PROMPT_S
        # EVALUATE: a and b wait while c's upload closes the round.
        f.upload("a", trains["a"])
        f.upload("b", trains["b"])
        polls = {n: f.poll_later(n) for n in ("a", "b")}
        time.sleep(LEAD_S)
        closed = time.monotonic()
        f.upload("c", trains["c"])
        evaluations = {n: polls[n].result(timeout=30)[0] for n in ("a", "b")}
        for n in ("a", "b"):
            assert _delivered(polls[n], pb.TASK_KIND_EVALUATE, since=closed) < PROMPT_S
        # FINISHED: a and b wait while c's report ends the study's last evaluation.
        evaluations["c"] = f.poll("c", wait_s=0.01)
        f.report("a", evaluations["a"])
        f.report("b", evaluations["b"])
        polls = {n: f.poll_later(n) for n in ("a", "b")}
        time.sleep(LEAD_S)
        finished = time.monotonic()
        f.report("c", evaluations["c"])
        for n in ("a", "b"):
            assert _delivered(polls[n], pb.TASK_KIND_FINISHED, since=finished) < PROMPT_S


def test_reports_do_not_wake_pollers_they_give_no_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["a", "b", "c", "d"]
    with federation(tmp_path, names, evaluation_institutions_per_round=3) as f:
        f.start()
        f.train_all()
        evaluating = f.evaluators()
        (idle,) = set(names) - set(evaluating)
        # Each pass of a waiting poll asks for its task once: count the passes.
        looked: Counter[str] = Counter()
        task_for = f.engine._task_for

        def counting(institution: str) -> pb.Task | None:
            looked[institution] += 1
            return task_for(institution)

        monkeypatch.setattr(f.engine, "_task_for", counting)
        waiting = f.poll_later(idle)
        deadline = time.monotonic() + 5
        while looked[idle] == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        first, second, last = sorted(evaluating)
        for name in (first, second):  # the evaluation stays open: `last` has not reported
            f.report(name, evaluating[name])
            time.sleep(0.05)  # time for a woken poller to look again
        assert looked[idle] == 1, "a report woke a poller it gives no task"
        ended = time.monotonic()
        f.report(last, evaluating[last])  # the study's last evaluation closes: it finishes
        assert _delivered(waiting, pb.TASK_KIND_FINISHED, since=ended) < PROMPT_S


# ------------------------------------------------------------------ max_workers
def test_more_institutions_than_server_threads_is_warned_once(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    assert ServerConfig().max_workers > 200, "the default serves a couple of hundred long-polling institutions"
    config = FederationConfig(
        server=ServerConfig(state_dir=tmp_path, max_workers=4),
        study=StudyConfig(model=ModelConfig(kind="mlp", params={"in_features": 8, "hidden": [4], "num_classes": 3})),
    )
    store = Store(tmp_path / "coordinator.sqlite")
    try:
        engine = RoundEngine(config=config, store=store, models_dir=tmp_path / "models", spool_dir=tmp_path / "spool")
        with caplog.at_level(logging.WARNING, logger="fedcollab.coordinator"):
            for i in range(6):
                engine.join(institution=f"site-{i}", num_train_examples=1)
    finally:
        store.close()
    warnings = [r.getMessage() for r in caplog.records if "max_workers" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("4 institutions have joined and server.max_workers is 4")


# ------------------------------------------------------------------ store durability
def test_rounds_and_models_are_committed_with_an_fsync_and_per_call_rows_without(tmp_path: Path) -> None:
    store = Store(tmp_path / "coordinator.sqlite")
    full, normal = 2, 1  # PRAGMA synchronous values

    def synchronous() -> int:
        return int(store._query("PRAGMA synchronous")[0][0])

    try:
        store.upsert_institution(name="a", num_train_examples=1)
        assert synchronous() == normal
        store.open_round(round_number=1, attempt=1, base_version=0, participants=["a"])
        assert synchronous() == full
        store.record_participation(round_number=1, attempt=1, institution="a", status="done", num_examples=1)
        assert synchronous() == normal
        model = ModelVersion(version=1, sha256="ab" * 32, path=tmp_path / "models" / "v1.safetensors", size_bytes=1)
        store.commit_round(round_number=1, attempt=1, model=model, parent=0, metrics={})
        assert synchronous() == full
        store.record_evaluations(round_number=1, model_version=1, reports={"a": (5, 0.5, 0.75)})
        assert synchronous() == normal
        store.update_round_metrics(round_number=1, metrics={"eval_loss": 0.5})
        assert synchronous() == full
        assert [(e["institution"], e["num_examples"], e["accuracy"]) for e in store.evaluations()] == [("a", 5, 0.75)]
    finally:
        store.close()


# ------------------------------------------------------------------ identity interceptor
def test_the_guarded_handler_is_built_once_per_method() -> None:
    interceptor = IdentityInterceptor(authenticator=None)
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: (request, context.caller))
    heartbeat = SimpleNamespace(method="/fedcollab.v1.CoordinatorService/Heartbeat")
    first = interceptor.intercept_service(lambda details: handler, heartbeat)
    assert interceptor.intercept_service(lambda details: handler, heartbeat) is first
    assert first.unary_unary("ping", object()) == ("ping", None)  # plaintext: no caller
    # Another method, or another handler for the same one, gets its own.
    poll = SimpleNamespace(method="/fedcollab.v1.CoordinatorService/PollTask")
    assert interceptor.intercept_service(lambda details: handler, poll) is not first
    replaced = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    assert interceptor.intercept_service(lambda details: replaced, heartbeat) is not first
    assert interceptor.intercept_service(lambda details: None, heartbeat) is None
