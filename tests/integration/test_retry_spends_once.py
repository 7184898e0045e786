"""A retried round spends no privacy twice, over real gRPC.

Each institution's ledger row names the round and the base model it trained from.
When the coordinator asks again for that round on that base (a new attempt after a
failed quorum, a suspension, a pause, or the coordinator's own SIGINT or kill -9), the
institution re-sends the update it already paid for. Every test ends with each
ledger holding exactly one row per round and the final epsilon at exactly what the
noise was calibrated for: the study's planned rounds, no more. A coordinator that
asks for a paid-for round in another shape (other tensors) gets a decline
(TASK_CHANGED), not a second spend.

Heartbeats flow while a site trains: a slow, GIL-bound training step outlasting the
lease does not make the coordinator take the institution for gone.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedcollab.config import InstitutionConfig, PrivacyConfig
from fedcollab.coordinator import Coordinator
from fedcollab.institution import DaemonEvent, InstitutionDaemon, daemon_from_config
from fedcollab.institution._trainer import Trainer
from fedcollab.privacy._ledger import PrivacyLedger, ledger_path
from fedcollab.v1 import operator_service_pb2 as opb
from fedcollab.v1 import operator_service_pb2_grpc as opb_grpc
from tests.chaos.harness import Settings, child_env, free_port, read_store, write_configs
from tests.conftest import assert_spent_as_planned, institution_config, running, tiny_federation, wait_until

pytestmark = pytest.mark.integration

NAMES = ["hospital-a", "hospital-b", "lab-c"]
TARGET = 4.0


def _private(name: str, i: int, *, address: str, root: Path) -> InstitutionConfig:
    base = institution_config(name, address=address, index=i, parts=3, state_root=root)
    return base.model_copy(update={"privacy": PrivacyConfig(target_epsilon=TARGET, target_delta=1e-5, accountant="rdp",
                                                            grad_sample_mode="hooks")})


class _Slow:
    """A trainer that, the first time it trains each of `rounds`, first spins until that
    round's `release`: half of the time in pure Python, holding the GIL the way Opacus'
    per-sample hooks do, which heartbeats must get through."""

    def __init__(self, *rounds: int) -> None:
        self._inner: Trainer | None = None
        self.started = {r: threading.Event() for r in rounds}
        self.release = {r: threading.Event() for r in rounds}
        self._done: set[int] = set()

    def train(self, *, model: Any, plan: Any, round_number: int, privacy: Any = None) -> Any:
        if round_number in self.started and round_number not in self._done:
            self._done.add(round_number)
            self.started[round_number].set()
            end = time.monotonic() + 90
            while not self.release[round_number].is_set() and time.monotonic() < end:
                busy = time.monotonic() + 0.02
                while time.monotonic() < busy:  # pure Python: the GIL is held, as in a training step
                    pass
                time.sleep(0.02)  # and let go, as torch's kernels do (the other sites train meanwhile)
        assert self._inner is not None
        return self._inner.train(model=model, plan=plan, round_number=round_number, privacy=privacy)

    def evaluate(self, *, model: Any) -> Any:
        assert self._inner is not None
        return self._inner.evaluate(model=model)


def _wrapped(chosen: _Slow, inner: Trainer) -> Trainer:
    chosen._inner = inner
    return chosen  # type: ignore[return-value]


def _daemons(configs: list[InstitutionConfig], *, slow: dict[str, _Slow] | None = None,
             on_event: Callable[[str, DaemonEvent], None] | None = None) -> list[InstitutionDaemon]:
    out = []
    for c in configs:
        chosen = (slow or {}).get(c.institution.name)
        wrap = None if chosen is None else functools.partial(_wrapped, chosen)
        name = c.institution.name
        events = None if on_event is None else (lambda e, name=name: on_event(name, e))  # type: ignore[misc]
        d = daemon_from_config(c, wrap_trainer=wrap, on_event=events)
        d._poll_wait = 1.0
        out.append(d)
    return out


def _failed(rounds: list[dict[str, Any]], round_number: int) -> bool:
    return any(r["round"] == round_number and r["status"] == "failed" for r in rounds)


def _attempts(rounds: list[dict[str, Any]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in rounds:
        out[r["round"]] = max(out.get(r["round"], 0), r["attempt"])
    return out


def test_a_failed_quorum_is_retried_with_the_updates_already_paid_for(tmp_path: Path) -> None:
    # lab-c trains round 2 past the round's deadline: the attempt fails its quorum of 3
    # after hospital-a and -b spent and sent. Attempt 2 asks all three again, on the same
    # base; lab-c's late upload of attempt 1 is refused, and it too re-sends.
    config = tiny_federation(tmp_path / "coordinator", rounds=3, round_timeout_s=10, max_round_attempts=6,
                             central_evaluation=None)
    with Coordinator(config=config) as coordinator:
        address = f"127.0.0.1:{coordinator.port}"
        configs = [_private(n, i, address=address, root=tmp_path) for i, n in enumerate(NAMES)]
        slow = {"lab-c": _Slow(2)}
        resent: list[tuple[str, int]] = []
        daemons = _daemons(configs, slow=slow,
                           on_event=lambda n, e: resent.append((n, e.round)) if e.kind == "resent" else None)
        # The coordinator lies once: hospital-b's task for attempt 2 of round 2 names the
        # model's tensors in another order, which the update it paid for cannot answer.
        engine, honest_poll, lied = coordinator.engine, coordinator.engine.poll, []

        def poll(**kw: Any) -> Any:
            task = honest_poll(**kw)
            if (task.round == 2 and task.train.local_epochs and not lied and _failed(engine._store.rounds(), 2)
                    and engine._sessions[kw["session_id"]].institution == "hospital-b"):
                lied.append(task.nonce)
                task = type(task).FromString(task.SerializeToString())
                specs = list(task.manifest.tensors)[::-1]
                del task.manifest.tensors[:]
                task.manifest.tensors.extend(specs)
            return task

        engine.poll = poll  # type: ignore[method-assign]
        with running(daemons) as outcome:
            assert slow["lab-c"].started[2].wait(90), "lab-c should reach round 2"
            wait_until(lambda: _failed(coordinator.store.rounds(), 2), timeout=60, what="round 2's quorum to fail")
            slow["lab-c"].release[2].set()
            assert coordinator.wait(timeout=120), "study did not finish"
            wait_until(lambda: len(outcome) == 3, timeout=20, what="daemons to finish")
        rounds = coordinator.store.rounds()
        parts = coordinator.store.participations(round_number=2)
        reasons = [p["reason"] or "" for p in coordinator.store.participations()]
    assert _attempts(rounds)[2] >= 2, rounds  # the quorum did fail
    assert [r["round"] for r in rounds if r["status"] == "committed"] == [1, 2, 3]
    assert {("hospital-a", 2), ("hospital-b", 2), ("lab-c", 2)} <= set(resent)
    # Asked for a paid-for round in another shape, hospital-b declined rather than train and spend again.
    assert lied and any(p["institution"] == "hospital-b" and (p["reason"] or "").startswith("TASK_CHANGED")
                        for p in parts), parts
    # The same update went to every attempt it reached.
    for name in NAMES:
        sent = {p["update_sha256"] for p in parts if p["institution"] == name and p["update_sha256"]}
        assert len(sent) == 1, (name, parts)
    # lab-c was never taken for gone while it spun: its heartbeats kept flowing.
    assert not any("LEASE_EXPIRED" in r for r in reasons), reasons
    assert_spent_as_planned({d.name: d.privacy.ledger.entries() for d in daemons}, rounds=3, target=TARGET)  # type: ignore[union-attr]


def _operator(coordinator: Coordinator) -> tuple[opb_grpc.OperatorServiceStub, list[tuple[str, str]]]:
    channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
    return opb_grpc.OperatorServiceStub(channel), [("authorization", f"Bearer {coordinator.operator_token}")]


def test_suspend_approve_and_pause_resume_cycles_spend_each_round_once(tmp_path: Path) -> None:
    # Round 2: lab-c is suspended while it trains (hospital-a and -b have sent), so the
    # attempt fails its quorum; approved again, it rejoins. Round 3: the study is paused
    # and resumed. Every institution takes part in every round.
    config = tiny_federation(tmp_path / "coordinator", rounds=4, round_timeout_s=10, max_round_attempts=6,
                             central_evaluation=None)
    with Coordinator(config=config) as coordinator:
        op, token = _operator(coordinator)
        address = f"127.0.0.1:{coordinator.port}"
        configs = [_private(n, i, address=address, root=tmp_path) for i, n in enumerate(NAMES)]
        slow = {"lab-c": _Slow(2)}
        uploaded: set[tuple[str, int]] = set()
        daemons = _daemons(configs, slow=slow,
                           on_event=lambda n, e: uploaded.add((n, e.round)) if e.kind == "uploaded" else None)
        with running(daemons) as outcome:
            assert slow["lab-c"].started[2].wait(90), "lab-c should reach round 2"
            wait_until(lambda: {("hospital-a", 2), ("hospital-b", 2)} <= uploaded, timeout=30,
                       what="hospital-a and -b to send round 2")
            op.SetMembership(opb.SetMembershipRequest(institution="lab-c", status="suspended", reason="audit"),
                             metadata=token, timeout=5)
            wait_until(lambda: _failed(coordinator.store.rounds(), 2), timeout=30, what="round 2's quorum to fail")
            op.SetMembership(opb.SetMembershipRequest(institution="lab-c", status="approved"), metadata=token,
                             timeout=5)
            slow["lab-c"].release[2].set()
            wait_until(lambda: any(r["round"] == 3 for r in coordinator.store.rounds()), timeout=60,
                       what="round 3 to open")
            op.ChangeStudy(opb.ChangeStudyRequest(study="tiny", action="pause", reason="check"), metadata=token,
                           timeout=5)
            time.sleep(1.5)
            op.ChangeStudy(opb.ChangeStudyRequest(study="tiny", action="resume"), metadata=token, timeout=5)
            assert coordinator.wait(timeout=120), "study did not finish"
            wait_until(lambda: len(outcome) == 3, timeout=20, what="daemons to finish")
        rounds = coordinator.store.rounds()
    assert [r["round"] for r in rounds if r["status"] == "committed"] == [1, 2, 3, 4]
    assert all(r["metrics"]["num_updates"] == 3 for r in rounds if r["status"] == "committed")
    assert_spent_as_planned({d.name: d.privacy.ledger.entries() for d in daemons}, rounds=4, target=TARGET)  # type: ignore[union-attr]


# ------------------------------------------------------------------ the coordinator stopped
def _serve(federation: Path, *, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fedcollab", "coordinator", "serve", "--config", str(federation),
                             "--insecure", "--exit-when-done", "--linger", "3"], cwd=cwd, env=child_env(),
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def test_a_coordinator_stopped_mid_round_resumes_without_spending_again(tmp_path: Path) -> None:
    # Round 2: the coordinator is stopped with SIGINT (Ctrl-C); round 3: killed with -9.
    # Each time lab-c holds the round open and hospital-a and -b have spent and sent.
    port = free_port()
    settings = Settings(rounds=3, heartbeat_s=0.25, lease_intervals=12, round_timeout_s=20, central_evaluation=False)
    federation, _ = write_configs(tmp_path, settings=settings, port=port)
    log = tmp_path / "coordinator.log"
    store = tmp_path / "coordinator-state" / "coordinator.sqlite"
    configs = [_private(n, i, address=f"127.0.0.1:{port}", root=tmp_path) for i, n in enumerate(NAMES)]
    slow = {"lab-c": _Slow(2, 3)}
    uploaded: set[tuple[str, int]] = set()
    daemons = _daemons(configs, slow=slow,
                       on_event=lambda n, e: uploaded.add((n, e.round)) if e.kind == "uploaded" else None)
    coordinator = _serve(federation, cwd=tmp_path, log=log)
    try:
        with running(daemons) as outcome:
            for round_number, stop in ((2, lambda p: p.send_signal(signal.SIGINT)), (3, lambda p: p.kill())):
                assert slow["lab-c"].started[round_number].wait(90), \
                    f"lab-c should reach round {round_number}\n{log.read_text()[-3000:]}"
                wait_until(lambda r=round_number: {("hospital-a", r), ("hospital-b", r)} <= uploaded, timeout=30,
                           what=f"hospital-a and -b to send round {round_number}")
                stop(coordinator)
                coordinator.wait(timeout=30)
                coordinator = _serve(federation, cwd=tmp_path, log=log)
                slow["lab-c"].release[round_number].set()
            wait_until(lambda: len(outcome) == 3, timeout=120, what="daemons to finish the study")
        assert coordinator.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.wait()
    rounds = read_store(store)["rounds"]
    assert [r["round"] for r in rounds if r["status"] == "committed"] == [1, 2, 3]
    attempts = _attempts(rounds)
    assert attempts[2] >= 2 and attempts[3] >= 2, rounds  # each resumed as a new attempt
    entries = {}
    for c in configs:
        with PrivacyLedger(ledger_path(c.institution.state_dir), readonly=True) as ledger:
            entries[c.institution.name] = ledger.entries()
    assert_spent_as_planned(entries, rounds=3, target=TARGET)
