"""How long the daemons live, over mutual TLS. A service (the commands' default) stays
up and waits quietly with backoff: for the next study, and for a coordinator that is
away. A one-shot run (--exit-when-done) ends when its studies end, including when the
coordinator is gone before the institution could hear it from a listing. Failures
that repeat are said once; each round is one line at the institution."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedcollab.cli import main
from fedcollab.config import FederationConfig, PolicyConfig, PrivacyConfig, TlsConfig
from fedcollab.coordinator import Coordinator
from fedcollab.institution._agent import InstitutionAgent
from fedcollab.institution._daemon import DaemonEvent
from fedcollab.pki import issue_ephemeral
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc
from fedcollab.v1 import operator_service_pb2 as opb
from fedcollab.v1 import operator_service_pb2_grpc as opb_grpc
from tests.conftest import institution_config, tiny_federation, wait_until

pytestmark = pytest.mark.integration
LOGGER = "fedcollab.institution"
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def pki(tmp_path: Path) -> Any:
    return issue_ephemeral(directory=tmp_path / "pki", federation="lifecycle", institutions=["site-a"],
                           operators=["op"])


def _federation(tmp_path: Path, pki: Any, *, address: str = "127.0.0.1:0", **study: Any) -> FederationConfig:
    cert, key = pki.coordinator
    base = tiny_federation(tmp_path / "coordinator", **{"rounds": 1, "min_institutions": 1,
                                                        "central_evaluation": None, **study})
    return base.model_copy(update={"server": base.server.model_copy(update={
        "address": address, "tls": TlsConfig(ca_cert=pki.ca_cert, cert=cert, key=key, crl=pki.crl)})})


def _agent(tmp_path: Path, pki: Any, port: int, *, dp: bool = False, **kwargs: Any) -> InstitutionAgent:
    config = institution_config("site-a", address=f"127.0.0.1:{port}", index=0, parts=1, state_root=tmp_path)
    cert, key = pki.institutions["site-a"]
    config = config.model_copy(update={"tls": TlsConfig(ca_cert=pki.ca_cert, cert=cert, key=key),
                                       "policy": PolicyConfig(),
                                       # hooks: no autotune
                                       "privacy": PrivacyConfig(target_epsilon=8.0, accountant="rdp",
                                                                grad_sample_mode="hooks") if dp else None})
    return InstitutionAgent(config=config, list_every_s=0.2, **kwargs)


def _running(agent: InstitutionAgent, stop: threading.Event) -> tuple[threading.Thread, dict[str, bool]]:
    out: dict[str, bool] = {}
    thread = threading.Thread(target=lambda: out.__setitem__("finished", agent.run(stop=stop)), daemon=True)
    thread.start()
    return thread, out


def _lines(caplog: pytest.LogCaptureFixture, text: str, *, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= level and text in r.getMessage()]


def _gone_at_finish(coordinator: Coordinator) -> Any:
    """The race of the benchmarks, made certain: the coordinator stops the moment its
    institution hears FINISHED, before the agent can list studies again."""
    def on_event(event: DaemonEvent) -> None:
        if event.kind == "finished":
            coordinator.stop(grace=0.5)
    return on_event


def test_one_shot_exits_when_the_coordinator_is_gone_after_its_study(
        tmp_path: Path, pki: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    coordinator = Coordinator(config=_federation(tmp_path, pki))
    coordinator.start()
    agent = _agent(tmp_path, pki, coordinator.port, dp=True, on_event=_gone_at_finish(coordinator))
    stop = threading.Event()
    thread, out = _running(agent, stop)
    thread.join(timeout=60)
    stop.set()
    agent.close()
    assert not thread.is_alive(), "a one-shot institution kept retrying a coordinator gone after its study"
    assert out == {"finished": True}
    assert len(_lines(caplog, "the coordinator is gone")) == 1, caplog.text
    # (Listed while its daemon was still saying goodbye, the agent may have met it gone once.)
    assert len(_lines(caplog, "UNAVAILABLE", level=logging.WARNING)) <= 1, caplog.text
    # One line for its round: examples, the study's epsilon so far, upload size and time.
    [line] = _lines(caplog, "round 1: trained on")
    assert re.fullmatch(r"site-a: round 1: trained on \d+ examples, epsilon \d+\.\d{3} of 8\.000 spent in this "
                        r"study, uploaded \d+\.\d KiB in \d+\.\d\ds", line), line


def test_a_service_waits_quietly_for_a_coordinator_that_is_gone_and_says_when_it_is_back(
        tmp_path: Path, pki: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    first = Coordinator(config=_federation(tmp_path, pki))
    port = first.start()
    agent = _agent(tmp_path, pki, port, keep_running=True, on_event=_gone_at_finish(first))
    stop = threading.Event()
    thread, out = _running(agent, stop)
    try:
        wait_until(lambda: bool(_lines(caplog, "study finished")), timeout=60, what="the study to finish")
        # Away for a while: retries every 0.5 s at most, each at DEBUG only.
        wait_until(lambda: len(_lines(caplog, "still UNAVAILABLE", level=logging.DEBUG)) >= 4, timeout=20,
                   what="several quiet retries")
        assert thread.is_alive(), "a service exited once its coordinator was gone"
        assert len(_lines(caplog, "UNAVAILABLE", level=logging.WARNING)) == 1, caplog.text
        # Back (same port, same state: its study is over, it offers none): said once, and it waits on.
        with Coordinator(config=_federation(tmp_path, pki, address=f"127.0.0.1:{port}")):
            wait_until(lambda: bool(_lines(caplog, "go through again (after UNAVAILABLE)")), timeout=20,
                       what="the institution to see the coordinator back")
            stop.wait(1.0)
            assert thread.is_alive(), "a service exited with no study left to join"
            assert len(_lines(caplog, "go through again")) == 1, caplog.text
    finally:
        stop.set()
        thread.join(timeout=30)
        agent.close()
    assert out == {"finished": False}


def test_a_suspended_institution_says_so_once_then_backs_off_quietly(
        tmp_path: Path, pki: Any, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    # Two institutions needed: no round opens, the study stays running while site-a waits in it.
    with Coordinator(config=_federation(tmp_path, pki, rounds=5, min_institutions=2)) as coordinator:
        agent = _agent(tmp_path, pki, coordinator.port, keep_running=True)
        stop = threading.Event()
        thread, _ = _running(agent, stop)
        cert, key = pki.operators["op"]
        operator = ["--coordinator", f"127.0.0.1:{coordinator.port}", "--ca", str(pki.ca_cert), "--cert", str(cert),
                    "--key", str(key)]
        try:
            wait_until(lambda: bool(_lines(caplog, "joined study")), timeout=30, what="site-a to join")
            with pytest.raises(SystemExit) as done:
                main(["institutions", "suspend", "site-a", "--reason", "audit pending", *operator])
            assert done.value.code == 0, capsys.readouterr()
            # The agent's listings and the daemon's Joins are both refused, many times over.
            wait_until(lambda: len(_lines(caplog, "still INSTITUTION_SUSPENDED", level=logging.DEBUG)) >= 6,
                       timeout=30, what="retries of a suspended institution")
            said = _lines(caplog, "INSTITUTION_SUSPENDED", level=logging.WARNING)
            assert len(said) == 1 and "audit pending" in said[0], caplog.text
            with pytest.raises(SystemExit) as done:
                main(["institutions", "approve", "site-a", *operator])
            assert done.value.code == 0, capsys.readouterr()
            wait_until(lambda: bool(_lines(caplog, "go through again (after INSTITUTION_SUSPENDED)")), timeout=30,
                       what="site-a to be accepted again")
            # The agent's listing or the daemon's Join may be the call that goes through first.
            wait_until(lambda: len(_lines(caplog, "joined study")) == 2, timeout=30, what="site-a to join again")
            assert len(_lines(caplog, "INSTITUTION_SUSPENDED", level=logging.WARNING)) == 1, caplog.text
        finally:
            stop.set()
            thread.join(timeout=30)
            agent.close()


# ------------------------------------------------------------------ the command line
def _serve(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen[str], int, str]:
    """`fedcollab coordinator serve` in its own process (plaintext on loopback: the study
    is ended through the operator token, no institution needed)."""
    config = tmp_path / "federation.toml"
    config.write_text(f'[server]\naddress = "127.0.0.1:0"\nstate_dir = "{tmp_path / "state"}"\n'
                      '[study]\nname = "tiny"\n[study.model]\nkind = "mlp"\n'
                      'params = { in_features = 64, hidden = [16], num_classes = 10 }\n', encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "fedcollab", "coordinator", "serve", "--config", str(config),
                             "--insecure", *flags], cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    head = []
    for line in proc.stdout:
        head.append(line)
        if m := re.search(r"serving study .* on 127\.0\.0\.1:(\d+)", line):
            return proc, int(m.group(1)), "".join(head)
    raise AssertionError(f"the coordinator did not say where it listens (exit {proc.wait()})")


def _cancel_every_study(tmp_path: Path, port: int) -> grpc.Channel:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    token = (tmp_path / "state" / "operator.token").read_text().strip()
    opb_grpc.OperatorServiceStub(channel).ChangeStudy(
        opb.ChangeStudyRequest(study="tiny", action="cancel", reason="lifecycle test"),
        metadata=[("authorization", f"Bearer {token}")], timeout=20)
    return channel


def test_serve_keeps_serving_once_its_studies_ended_until_stopped(tmp_path: Path) -> None:
    proc, port, _ = _serve(tmp_path)
    try:
        channel = _cancel_every_study(tmp_path, port)
        assert proc.stdout is not None
        for line in proc.stdout:
            if "every study has ended; serving on" in line:
                break
        time.sleep(1.0)
        assert proc.poll() is None, "a service exited once its study ended"
        pb_grpc.CoordinatorServiceStub(channel).ListStudies(pb.ListOpenStudiesRequest(), timeout=10)  # still up
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out  # stopped on request: a service's normal end
    finally:
        proc.kill()


def test_serve_exit_when_done_exits_once_its_studies_ended(tmp_path: Path) -> None:
    proc, port, head = _serve(tmp_path, "--exit-when-done", "--linger", "0.5", "--keep-serving")  # old flag: a no-op
    try:
        _cancel_every_study(tmp_path, port)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "--keep-serving is deprecated and does nothing" in head, head
    finally:
        proc.kill()
