"""An enrolled institution ("mallory") declines a study with a message full of terminal
escape sequences, over the real coordinator under mutual TLS. The operator's commands
(`fedcollab study status`, `study list`, `institutions list`, `coordinator status`) and
the coordinator's own log lines show them escaped (\\x1b...), never raw; the stored
message is bounded."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console
from rich.logging import RichHandler

from fedcollab import _operator_cli, cli
from fedcollab._display import printable
from fedcollab._logging import TerminalFormatter
from fedcollab.coordinator._consortium import MAX_DECLINE_MESSAGE
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc
from tests.integration.test_trust import _as, _join, federation  # noqa: F401 - the mTLS federation fixture

pytestmark = pytest.mark.integration
# Retitle the window, clear the screen, move the cursor home, a C1 CSI, a bidi override,
# a BEL and a line feed that would forge a table row.
PAYLOAD = ("\x1b]0;owned\x07\x1b[2J\x1b[H\x1b[31mALL ROUNDS OK\x1b[0m \x9b2J "
           "\u202eevil\u202c\nhospital-a: approved [bold red]markup[/]")
RAW = ("\x1b", "\x07", "\x9b", "\u202e", "\u202c")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    assert exit_.value.code in (0, None), out + err
    return out + err


def test_escape_sequences_in_a_decline_never_reach_the_terminal(
        federation, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    pki, coordinator = federation
    monkeypatch.setattr(_operator_cli.console, "_width", 400)  # no wrapping inside the escapes
    monkeypatch.setattr(cli.console, "_width", 400)
    terminal = io.StringIO()  # the coordinator's log as `fedcollab coordinator serve` writes it
    handler = RichHandler(console=Console(file=terminal, width=400), show_path=False)
    handler.setFormatter(TerminalFormatter("%(name)s: %(message)s"))
    logger = logging.getLogger("fedcollab")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        channel = _as(pki, coordinator, "mallory")
        _join(channel)
        pb_grpc.CoordinatorServiceStub(channel).DeclineStudy(pb.DeclineStudyRequest(
            study=coordinator.config.study.name, reason="STUDY_NOT_ACCEPTED",
            message=PAYLOAD + "x" * 5000), timeout=10)
        channel.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

    (stored,) = coordinator.consortium.declines(coordinator.config.study.name)
    assert stored["institution"] == "mallory" and len(stored["message"]) <= MAX_DECLINE_MESSAGE
    assert stored["message"].startswith(PAYLOAD)  # kept as sent (bounded): escaped when shown

    cert, key = pki.operators["operator"]
    operator = ["--coordinator", f"127.0.0.1:{coordinator.port}", "--cert", str(cert), "--key", str(key),
                "--ca", str(pki.ca_cert)]
    status = _run(capsys, "study", "status", *operator)
    words = " ".join(status.split())  # the console wraps long lines
    assert "declined by mallory: STUDY_NOT_ACCEPTED: \\x1b]0;owned\\x07\\x1b[2J" in words, status
    assert "\\u202eevil\\u202c\\x0ahospital-a: approved [bold red]markup[/]" in words, status  # markup shown, not run
    outputs = {"study status": status, "study list": _run(capsys, "study", "list", *operator),
               "institutions list": _run(capsys, "institutions", "list", *operator),
               "log": terminal.getvalue()}
    assert "mallory declined study" in outputs["log"] and "\\x1b[2J" in outputs["log"], outputs["log"]
    for where, text in outputs.items():
        for ch in RAW:
            assert ch not in text, (where, ch, text)


def test_printable() -> None:
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("\u202eabc\u200b") == "\\u202eabc\\u200b"
    assert printable("e\u0301 日本 ok") == "e\u0301 日本 ok"  # combining marks and scripts are text
    assert printable("x" * 10, limit=4) == "xxxx\u2026"
