"""A round's reason names who declined it and why (fedcollab/coordinator/_declines.py)."""

from __future__ import annotations

from pathlib import Path

from fedcollab.coordinator import Store
from fedcollab.coordinator._declines import MAX_EACH, MAX_NAMED, declined_note, with_declines


def test_the_note_names_each_institution_with_its_reason() -> None:
    assert declined_note([]) == ""
    assert declined_note([("lab-c", "DATA_INCOMPATIBLE: 10 features"), ("a", "BUDGET_EXHAUSTED")]) == (
        "declined: a (BUDGET_EXHAUSTED), lab-c (DATA_INCOMPATIBLE: 10 features)")
    assert with_declines(None, []) is None and with_declines("quorum not met", []) == "quorum not met"
    assert with_declines("quorum not met", [("a", "X")]) == "quorum not met; declined: a (X)"
    assert with_declines(None, [("a", "")]) == "declined: a (no reason given)"


def test_the_note_is_bounded_however_many_decline_and_whatever_they_say() -> None:
    note = declined_note([(f"site-{i:02}", "R: " + "x" * 5000) for i in range(20)])
    assert note.count("site-") == MAX_NAMED and note.endswith(f" and {20 - MAX_NAMED} more")
    assert len(note) < MAX_NAMED * (MAX_EACH + 20) + 40


def test_a_closed_round_keeps_its_declines_in_its_reason(tmp_path: Path) -> None:
    store = Store(tmp_path / "coordinator.sqlite")
    store.open_round(round_number=1, attempt=1, base_version=0, participants=["a", "b", "c"])
    store.record_participation(round_number=1, attempt=1, institution="c", status="declined",
                               reason="DATA_INCOMPATIBLE: the site's data has 10 features")
    store.record_participation(round_number=1, attempt=1, institution="b", status="failed", reason="ROUND_DEADLINE")
    store.fail_round(round_number=1, attempt=1, reason="quorum not met: 1 accepted updates, 2 needed")
    store.open_round(round_number=1, attempt=2, base_version=0, participants=["a", "b"])  # nobody declined
    store.fail_round(round_number=1, attempt=2, reason="quorum not met: 1 accepted updates, 2 needed")
    reasons = [r["reason"] for r in store.rounds()]
    store.close()
    assert reasons == [
        "quorum not met: 1 accepted updates, 2 needed; "
        "declined: c (DATA_INCOMPATIBLE: the site's data has 10 features)",
        "quorum not met: 1 accepted updates, 2 needed",
    ]
