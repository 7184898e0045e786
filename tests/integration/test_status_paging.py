"""`fedcollab study status` of a study with thousands of rounds, over the real
coordinator under mutual TLS: GetStatus pages its rounds (AIP-158), each reply under
the smallest message limit (chunk_bytes 1 KiB here: 65 KiB), and the CLI shows them all.
Without paging the reply was RESOURCE_EXHAUSTED past a few hundred rounds."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from fedcollab import _operator_cli, cli
from fedcollab.coordinator._status_pages import MAX_PAGE_SIZE, PAGE_BYTES, token_for
from fedcollab.v1 import operator_service_pb2 as opb
from fedcollab.v1 import operator_service_pb2_grpc as opb_grpc
from fedcollab.wire import from_rpc_error
from tests.integration.test_trust import _as, _join, federation  # noqa: F401 - the mTLS federation fixture

pytestmark = pytest.mark.integration
ROUNDS = 2000
METRICS = {f"metric_{k:02d}": 0.125 * k for k in range(12)}


def _fill(db: Path, first: int, last: int) -> None:
    """Round attempts first..last, written as the engine writes them (committed, with
    metrics; every tenth failed first, with a reason), in one transaction."""
    now = time.time()
    rows = []
    for n in range(first, last + 1):
        if n % 10 == 0:
            rows.append((n, 1, "failed", now, now, 0, None, f"quorum not met in round {n}: " + "r" * 60, "{}"))
        rows.append((n, 2 if n % 10 == 0 else 1, "committed", now, now, n - 1, n, None,
                     json.dumps({**METRICS, "num_updates": 3, "train_loss": 1.0 / n})))
    with sqlite3.connect(db) as conn:
        conn.executemany("INSERT INTO rounds (round, attempt, status, opened_at, closed_at, base_version, "
                         "model_version, reason, metrics) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def _refused(call, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert from_rpc_error(err.value).reason == reason


def test_thousands_of_rounds_come_in_pages(federation, capsys: pytest.CaptureFixture[str],  # noqa: F811
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pki, coordinator = federation
    db = Path(coordinator.config.server.state_dir) / "coordinator.sqlite"
    _fill(db, 1, ROUNDS)
    attempts = ROUNDS + ROUNDS // 10
    study = coordinator.config.study.name
    _join(_as(pki, coordinator, "hospital-a"))
    op = opb_grpc.OperatorServiceStub(_as(pki, coordinator, "operator", group="operators"))

    # Page by page: every attempt once, in order, each reply within the limit.
    seen: list[tuple[int, int]] = []
    token, pages = "", 0
    while True:
        reply = op.GetStatus(opb.GetStatusRequest(page_size=MAX_PAGE_SIZE, page_token=token), timeout=10)
        assert reply.ByteSize() < PAGE_BYTES + 4096  # under the 65 KiB limit
        assert reply.total_size == (attempts if pages < 2 else attempts + 5)
        assert [i.name for i in reply.institutions] == (["hospital-a"] if pages == 0 else [])
        seen += [(r.round, r.attempt) for r in reply.rounds]
        pages += 1
        if pages == 2:  # rounds that open meanwhile come on a later page, and shift nothing
            _fill(db, ROUNDS + 1, ROUNDS + 5)
        token = reply.next_page_token
        if not token:
            break
    assert seen == sorted(set(seen)) and len(seen) == attempts + 5 and seen[-1] == (ROUNDS + 5, 1)
    assert pages > 10  # the size bound, not page_size, cut them
    assert [r.round for r in op.GetStatus(opb.GetStatusRequest(page_size=7), timeout=10).rounds] == list(range(1, 8))

    # Bad paging is INVALID_ARGUMENT with its reason.
    _refused(lambda: op.GetStatus(opb.GetStatusRequest(page_size=-1), timeout=10), "INVALID_PAGE_SIZE")
    for bad in ("garbage!", "cjE6", token_for(study="another-study", round_number=1, attempt=1),
                token_for(study=study, round_number=-1, attempt=1)):
        _refused(lambda bad=bad: op.GetStatus(opb.GetStatusRequest(page_token=bad), timeout=10), "INVALID_PAGE_TOKEN")

    # The operator's command pages to the end and shows the latest 100 attempts (or N).
    monkeypatch.setattr(_operator_cli.console, "_width", 200)
    cert, key = pki.operators["operator"]
    operator = ["--coordinator", f"127.0.0.1:{coordinator.port}", "--cert", str(cert), "--key", str(key),
                "--ca", str(pki.ca_cert)]
    for argv, shown in ((["study", "status"], 100), (["study", "status", "--last", "3"], 3)):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*argv, *operator])
        out = capsys.readouterr().out
        assert exit_.value.code in (0, None), out
        assert f"the latest {shown} of {attempts + 5} attempts" in out, out
        rows = [(int(a), int(b)) for a, b in re.findall(r"^│ (\d+)\s+│ (\d+)\s+│", out, flags=re.M)]
        assert rows == seen[-shown:]
