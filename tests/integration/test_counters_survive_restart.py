"""Byte and failure counters outlive the coordinator process: a coordinator restarted
in-process on the same state folder starts from the totals its predecessor wrote, and
/metrics keeps counting from there (Prometheus reads a drop as a counter reset)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcollab.coordinator import Coordinator
from fedcollab.coordinator._metrics import render_metrics
from fedcollab.coordinator._snapshot import snapshot_of
from fedcollab.coordinator._store import Store
from tests.conftest import institution_config, recording_daemon, running, tiny_federation, wait_until
from tests.unit.test_metrics_and_dashboard import parse_exposition

pytestmark = pytest.mark.integration
NAMES = ["hospital-a", "lab-b"]
STUDY = "counted"


def _run_study(coordinator: Coordinator, root: Path) -> None:
    daemons = [recording_daemon(institution_config(n, address=f"127.0.0.1:{coordinator.port}", index=i,
                                                   parts=len(NAMES), state_root=root))[0]
               for i, n in enumerate(NAMES)]
    with running(daemons) as outcome:
        assert coordinator.wait(timeout=90), "the study did not finish"
        wait_until(lambda: len(outcome) == len(NAMES), timeout=20, what="daemons to finish")
    assert coordinator.engine.failure is None, coordinator.engine.failure


def _scraped(coordinator: Coordinator) -> dict[str, float]:
    _, samples = parse_exposition(render_metrics(snapshot_of(coordinator)))
    s = {"study": STUDY}
    return {n: v for n, labels, v in samples if labels == s}


def test_byte_counters_continue_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "coordinator"
    with Coordinator(config=tiny_federation(state, name=STUDY, rounds=1, min_institutions=2,
                                            central_evaluation=None)) as first:
        _run_study(first, tmp_path)
        # A failed participation the engine counted (as _fail does): it must survive too.
        first.engine.failures["ROUND_DEADLINE"] += 2
        before = (first.engine.bytes_in, first.engine.bytes_out)
    assert before[0] > 0 and before[1] > 0

    # Same state folder, one more round: the totals start where the first process stopped.
    second = Coordinator(config=tiny_federation(state, name=STUDY, rounds=2, min_institutions=2,
                                                central_evaluation=None))
    try:
        assert (second.engine.bytes_in, second.engine.bytes_out) == before
        assert second.engine.failures == {"ROUND_DEADLINE": 2}
        second.start()
        scraped = _scraped(second)
        assert scraped["fedcollab_received_bytes_total"] >= before[0]
        assert scraped["fedcollab_sent_bytes_total"] >= before[1]
        _run_study(second, tmp_path)
        after = (second.engine.bytes_in, second.engine.bytes_out)
        # Round 2's traffic came on top; its own figures are what the round recorded.
        round_2 = next(r for r in second.store.rounds() if r["round"] == 2 and r["status"] == "committed")
        assert after[0] >= before[0] + round_2["metrics"]["bytes_in"] > before[0]
        assert after[1] > before[1]
        scraped = _scraped(second)
        assert scraped["fedcollab_received_bytes_total"] == after[0]
        assert scraped["fedcollab_sent_bytes_total"] == after[1]
    finally:
        second.stop()
    # Written at the stop: a third process would start from `after`.
    store = Store(state / "coordinator.sqlite", read_only=True)
    try:
        saved = store.counters()
    finally:
        store.close()
    assert (saved["bytes_in"], saved["bytes_out"]) == after and saved["failed:ROUND_DEADLINE"] == 2


def test_a_round_close_writes_the_totals_with_it(tmp_path: Path) -> None:
    """A kill -9 loses only what came since the last round closed: the close (a commit
    or a failure) writes the totals in its own transaction."""
    store = Store(tmp_path / "coordinator.sqlite")
    totals = {"bytes_in": 10, "bytes_out": 20}
    store.counters_source = lambda: dict(totals)
    try:
        store.open_round(round_number=1, attempt=1, base_version=0, participants=["a"])
        assert store.counters() == {}  # opening a round writes nothing
        totals.update(bytes_in=15, **{"failed:UPLOAD_REJECTED": 1})
        store.fail_round(round_number=1, attempt=1, reason="quorum not met")
        assert store.counters() == {"bytes_in": 15, "bytes_out": 20, "failed:UPLOAD_REJECTED": 1}
        totals["bytes_out"] = 99
        store.save_counters()
        assert store.counters()["bytes_out"] == 99
    finally:
        store.close()
