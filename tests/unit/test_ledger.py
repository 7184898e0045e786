"""The privacy ledger: durable spend, a hash chain that catches edits, removals and truncation."""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from fedcollab.errors import FedcollabError
from fedcollab.privacy._ledger import (
    GENESIS_HASH,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    VerifyReport,
    ledger_path,
)


def spend(round_: int, epsilon: float, **overrides: Any) -> dict[str, Any]:
    """Arguments for append(): round `round_` of study "s" bringing the spend to `epsilon`.
    Each study on a dataset of its own unless told (so the site's figure is the study's)."""
    values: dict[str, Any] = {
        "study": "s", "round": round_, "nonce": f"nonce-{round_}", "epsilon": epsilon, "delta": 1e-5,
        "noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 100, "accountant": "prv",
        "history": [(1.1, 0.01, 100 * round_)], "budget_epsilon": 3.0, "update_sha256": f"{round_:064x}",
    }
    values.update(overrides)
    values.setdefault("dataset", f"data-{values['study']}")
    values.setdefault("site_epsilon", values["epsilon"])
    values.setdefault("site_budget_epsilon", values["budget_epsilon"] if "budget_epsilon" in overrides else 3.0)
    return values


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return ledger_path(tmp_path / "state")


def filled(path: Path, rounds: int = 4) -> list[LedgerEntry]:
    with PrivacyLedger(path) as ledger:
        return [ledger.append(**spend(r, 0.5 * r)) for r in range(1, rounds + 1)]


def raw(path: Path) -> sqlite3.Connection:
    """What someone with the file could do: a plain connection, triggers dropped."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("DROP TRIGGER ledger_no_update")
    db.execute("DROP TRIGGER ledger_no_delete")
    return db


def verify(path: Path) -> VerifyReport:
    with PrivacyLedger(path) as ledger:
        return ledger.verify()


def test_ledger_lives_in_the_state_folder(tmp_path: Path) -> None:
    assert ledger_path(tmp_path) == tmp_path / "privacy-ledger.sqlite"


def test_append_and_read_back_exactly(path: Path) -> None:
    epsilon = 0.1 + 0.2  # 0.30000000000000004: must not come back as 0.3
    history = [(1.1, 1 / 3, 7), (0.9000000000000001, 0.01, 3)]
    with PrivacyLedger(path) as ledger:
        entry = ledger.append(**spend(1, epsilon, history=history, sample_rate=1 / 3, delta=1e-5))
        assert path.is_file() and path.with_suffix(".head").is_file()
        assert (entry.seq, entry.study, entry.round, entry.nonce) == (1, "s", 1, "nonce-1")
        assert entry.epsilon == epsilon and entry.sample_rate == 1 / 3
        assert entry.history == ((1.1, 1 / 3, 7), (0.9000000000000001, 0.01, 3))
        assert entry.prev_hash == GENESIS_HASH and len(entry.hash) == 64
        assert entry.created_at.endswith("+00:00")
        assert ledger.entries() == [entry]
        assert ledger.latest(study="s") == entry
        assert ledger.spent(study="s") == epsilon
        assert ledger.history(study="s") == history
        assert all(isinstance(h[2], int) for h in ledger.history(study="s"))
        assert entry.remaining_epsilon == 3.0 - epsilon
        assert json.loads(json.dumps(entry.to_dict()))["history"] == [list(h) for h in history]


def test_empty_ledger(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        assert ledger.entries() == [] and ledger.latest(study="s") is None
        assert ledger.spent(study="s") == 0.0 and ledger.history(study="s") == []
        assert ledger.verify() == VerifyReport(ok=True, rows=0, head_hash=GENESIS_HASH)


def test_chain_verifies_and_links(path: Path) -> None:
    entries = filled(path)
    assert [e.prev_hash for e in entries[1:]] == [e.hash for e in entries[:-1]]
    assert verify(path) == VerifyReport(ok=True, rows=4, head_hash=entries[-1].hash)
    assert json.loads(path.with_suffix(".head").read_text()) == {"seq": 4, "hash": entries[-1].hash}


def test_restart_keeps_the_spend(path: Path) -> None:
    filled(path, rounds=3)
    with PrivacyLedger(path) as ledger:  # a restarted daemon
        assert ledger.spent(study="s") == 1.5
        assert ledger.history(study="s") == [(1.1, 0.01, 300)]
        entry = ledger.append(**spend(4, 2.0))
        assert entry.seq == 4
        assert ledger.verify().ok


def test_edited_epsilon_is_detected(path: Path) -> None:
    filled(path)
    db = raw(path)
    db.execute("UPDATE ledger SET epsilon = 0.01 WHERE seq = 3")
    db.close()
    report = verify(path)
    assert not report.ok and report.first_bad_seq == 3
    assert report.problem == "row 3: hash does not match its contents (edited?)"


def test_edited_row_with_recomputed_hash_breaks_the_next_link(path: Path) -> None:
    from fedcollab.privacy._ledger import _COLUMNS, row_hash

    filled(path)
    db = raw(path)
    row = dict(zip(_COLUMNS, db.execute("SELECT * FROM ledger WHERE seq = 2").fetchone(), strict=True))
    row["epsilon"] = 0.01
    db.execute("UPDATE ledger SET epsilon = ?, hash = ? WHERE seq = 2", (0.01, row_hash(row["prev_hash"], row)))
    db.close()
    report = verify(path)
    assert not report.ok and report.first_bad_seq == 3
    assert report.problem == "row 3: prev_hash does not link to row 2 (row removed or reordered?)"


def test_a_value_of_the_wrong_type_is_detected(path: Path) -> None:
    filled(path)
    db = raw(path)
    db.execute("UPDATE ledger SET epsilon = 'zero' WHERE seq = 2")
    db.close()
    report = verify(path)
    assert not report.ok and report.first_bad_seq == 2 and report.problem.startswith("row 2: malformed")
    with PrivacyLedger(path) as ledger, pytest.raises(LedgerError, match="row 2: malformed"):
        ledger.entries()


def test_deleted_middle_row_is_detected(path: Path) -> None:
    filled(path)
    db = raw(path)
    db.execute("DELETE FROM ledger WHERE seq = 3")
    db.close()
    report = verify(path)
    assert not report.ok and report.first_bad_seq == 4
    assert report.problem == "seq gap after row 2 (rows deleted?)"


def test_deleted_first_row_is_detected(path: Path) -> None:
    filled(path)
    db = raw(path)
    db.execute("DELETE FROM ledger WHERE seq = 1")
    db.close()
    report = verify(path)
    assert not report.ok and report.first_bad_seq == 2 and "rows deleted" in report.problem


def test_deleted_newest_row_is_detected_by_the_head(path: Path) -> None:
    filled(path)
    db = raw(path)
    db.execute("DELETE FROM ledger WHERE seq = 4")
    db.close()
    report = verify(path)
    assert not report.ok and report.rows == 3 and report.first_bad_seq == 4
    assert report.problem == "head file says 4 rows, the ledger has 3 (newest rows removed?)"


def test_missing_head_is_detected(path: Path) -> None:
    filled(path, rounds=2)
    path.with_suffix(".head").unlink()
    report = verify(path)
    assert not report.ok and "head file privacy-ledger.head missing" in report.problem


def test_garbled_head_is_detected(path: Path) -> None:
    filled(path, rounds=2)
    path.with_suffix(".head").write_text("{not json")
    report = verify(path)
    assert not report.ok and "head file privacy-ledger.head is not valid" in report.problem


def test_head_pointing_at_another_chain_is_detected(path: Path) -> None:
    filled(path, rounds=2)
    path.with_suffix(".head").write_text(json.dumps({"seq": 2, "hash": "f" * 64}))
    report = verify(path)
    assert not report.ok and report.problem == "head file's hash does not match row 2 (rows rewritten?)"


def test_head_two_rows_behind_is_reported(path: Path) -> None:
    entries = filled(path)
    path.with_suffix(".head").write_text(json.dumps({"seq": 2, "hash": entries[1].hash}))
    report = verify(path)
    assert not report.ok and report.problem.startswith("head file says 2 rows, the ledger has 4")


def test_head_one_behind_after_a_crash_is_repaired(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    entries = filled(path, rounds=3)
    head = path.with_suffix(".head")
    # A crash after the commit of row 3 and before its head write leaves the head at row 2.
    head.write_text(json.dumps({"seq": 2, "hash": entries[1].hash}))
    with PrivacyLedger(path, readonly=True) as ledger:  # read-only: tolerated, not repaired
        assert ledger.verify().ok
    assert json.loads(head.read_text())["seq"] == 2
    with caplog.at_level(logging.WARNING, logger="fedcollab.privacy._ledger"):
        report = verify(path)
    assert report == VerifyReport(ok=True, rows=3, head_hash=entries[2].hash)
    assert json.loads(head.read_text()) == {"seq": 3, "hash": entries[2].hash}
    assert "one row behind" in caplog.text


def test_crash_right_after_the_first_row_is_repaired(path: Path) -> None:
    entries = filled(path, rounds=1)
    path.with_suffix(".head").write_text(json.dumps({"seq": 0, "hash": GENESIS_HASH}))
    assert verify(path).ok
    assert json.loads(path.with_suffix(".head").read_text()) == {"seq": 1, "hash": entries[0].hash}


def test_sql_cannot_update_or_delete(path: Path) -> None:
    filled(path, rounds=2)
    db = sqlite3.connect(str(path), isolation_level=None)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE ledger SET epsilon = 0 WHERE seq = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM ledger WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM ledger_meta")
    db.close()
    assert verify(path).ok


def test_dropped_triggers_come_back_on_open(path: Path) -> None:
    filled(path, rounds=1)
    raw(path).close()
    PrivacyLedger(path).close()
    db = sqlite3.connect(str(path), isolation_level=None)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM ledger")
    db.close()


def test_append_refuses_a_tampered_ledger(path: Path) -> None:
    filled(path)
    with PrivacyLedger(path) as ledger:
        db = raw(path)
        db.execute("UPDATE ledger SET epsilon = 0.01 WHERE seq = 2")
        db.close()
        with pytest.raises(LedgerError, match=r"refusing to append .* row 2: hash does not match"):
            ledger.append(**spend(5, 2.5))
        assert len(ledger.entries()) == 4


def test_append_refuses_a_truncated_ledger(path: Path) -> None:
    filled(path)
    db = raw(path)
    db.execute("DELETE FROM ledger WHERE seq = 4")
    db.close()
    with PrivacyLedger(path) as ledger, pytest.raises(LedgerError, match="newest rows removed"):
        ledger.append(**spend(4, 2.0))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epsilon": math.nan}, "epsilon must be finite"),
        ({"epsilon": math.inf}, "epsilon must be finite"),
        ({"epsilon": -0.1}, "epsilon must be >= 0"),
        ({"accountant": "moments"}, "accountant must be one of prv, rdp, gdp"),
        ({"delta": 0.0}, r"delta must be in \(0, 1\)"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\)"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\]"),
        ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\]"),
        ({"noise_multiplier": math.nan}, "noise_multiplier must be finite"),
        ({"steps": -1}, "steps must be >= 0"),
        ({"steps": 1.5}, "steps must be an integer"),
        ({"round": True}, "round must be an integer"),
        ({"budget_epsilon": 0}, "budget_epsilon must be > 0"),
        ({"study": ""}, "study must be a non-empty string"),
        ({"nonce": ""}, "nonce must be"),
        ({"update_sha256": "XYZ"}, "update_sha256 must be 64 lowercase hex digits"),
        ({"history": [(1.1, 0.01)]}, r"history\[0\] must be \(noise_multiplier, sample_rate, steps\)"),
        ({"history": [(1.1, math.nan, 3)]}, r"history\[0\] sample_rate must be finite"),
        ({"history": "abc"}, "history must be a list"),
    ],
)
def test_invalid_values_are_refused(path: Path, overrides: dict[str, Any], message: str) -> None:
    with PrivacyLedger(path) as ledger:
        with pytest.raises(LedgerError, match=message):
            ledger.append(**{**spend(1, 0.5), **overrides})
        assert ledger.entries() == []


def test_spend_never_decreases(path: Path) -> None:
    filled(path, rounds=2)
    with PrivacyLedger(path) as ledger:
        with pytest.raises(LedgerError, match=r"epsilon 0\.5 for study 's' is below the 1\.0 already recorded at "
                                              r"row 2: .* spend never decreases"):
            ledger.append(**spend(3, 0.5))
        assert ledger.append(**spend(3, 1.0)).seq == 3  # equal is fine (no steps this round)
        assert issubclass(LedgerError, FedcollabError)


def test_find_the_spend_of_one_assignment(path: Path) -> None:
    entries = filled(path, rounds=3)
    with PrivacyLedger(path) as ledger:
        assert ledger.find(study="s", round=2, nonce="nonce-2") == entries[1]
        assert ledger.find(study="s", round=2, nonce="another") is None
        assert ledger.find(study="s", round=9, nonce="nonce-2") is None
        assert ledger.find(study="other", round=2, nonce="nonce-2") is None
        again = ledger.append(**spend(2, 2.0))  # the same assignment trained again spends again
        assert ledger.find(study="s", round=2, nonce="nonce-2") == again


def test_a_retried_attempt_on_the_same_base_is_the_same_assignment(path: Path) -> None:
    base, other = "b" * 64, "c" * 64
    with PrivacyLedger(path) as ledger:
        first = ledger.append(**spend(1, 0.5, base_sha256=base))
        assert first.base_sha256 == base
        # Attempt 2 of round 1 comes with a new nonce; the base model says it is the same release.
        assert ledger.find(study="s", round=1, nonce="attempt-2", base_sha256=base) == first
        assert ledger.find(study="s", round=1, nonce="attempt-2", base_sha256=other) is None  # a new base spends
        assert ledger.find(study="s", round=2, nonce="attempt-2", base_sha256=base) is None  # a new round spends
        assert ledger.find(study="s", round=1, nonce="attempt-2") is None  # no base: only the nonce counts


def test_the_base_is_covered_by_the_chain(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        ledger.append(**spend(1, 0.5, base_sha256="b" * 64))
    with raw(path) as db:
        db.execute("UPDATE ledger SET base_sha256=? WHERE seq=1", ("c" * 64,))
    report = verify(path)
    assert not report.ok and report.first_bad_seq == 1


def test_a_ledger_from_before_the_base_column_still_verifies_and_is_upgraded(path: Path) -> None:
    entries = filled(path, rounds=2)
    with raw(path) as db:  # the schema fedcollab wrote before it recorded the base model
        db.execute("ALTER TABLE ledger DROP COLUMN base_sha256")
    with PrivacyLedger(path, readonly=True) as ledger:  # inspection reads it as it is
        assert ledger.entries() == entries and ledger.verify().ok
    with PrivacyLedger(path) as ledger:  # a writable open adds the column; old rows keep their hashes
        assert ledger.verify().ok and ledger.entries() == entries
        third = ledger.append(**spend(3, 1.5, base_sha256="d" * 64))
        assert ledger.find(study="s", round=3, nonce="retry", base_sha256="d" * 64) == third
        assert ledger.find(study="s", round=2, nonce="nonce-2") == entries[1]
    assert verify(path).ok


def test_studies_keep_separate_spend(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        ledger.append(**spend(1, 1.0, study="a"))
        ledger.append(**spend(1, 0.25, study="b", history=[(2.0, 0.02, 5)]))
        ledger.append(**spend(2, 1.5, study="a"))
        # b's spend is its own: lower than a's and still allowed to grow from 0.25
        ledger.append(**spend(2, 0.5, study="b", history=[(2.0, 0.02, 10)]))
        assert ledger.spent(study="a") == 1.5 and ledger.spent(study="b") == 0.5
        assert ledger.history(study="b") == [(2.0, 0.02, 10)]
        assert [e.seq for e in ledger.entries(study="a")] == [1, 3]
        assert [e.seq for e in ledger.entries()] == [1, 2, 3, 4]
        assert ledger.verify().ok


def test_numpy_style_numbers_are_accepted(path: Path) -> None:
    np = pytest.importorskip("numpy")
    with PrivacyLedger(path) as ledger:
        entry = ledger.append(**spend(1, np.float64(0.7), steps=np.int64(12),
                                      history=[(np.float64(1.1), np.float32(0.5), np.int64(12))]))
        assert type(entry.epsilon) is float and type(entry.steps) is int
        assert entry.history == ((1.1, 0.5, 12),)
        assert ledger.verify().ok


def test_integral_floats_hash_the_same_after_reading(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        ledger.append(**spend(1, 1, budget_epsilon=3, delta=1e-5, noise_multiplier=1))
    assert verify(path).ok


def test_concurrent_appends_from_threads_keep_the_chain(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        def work(study: str) -> None:
            for r in range(1, 11):
                ledger.append(**spend(r, 0.1 * r, study=study))

        threads = [threading.Thread(target=work, args=(f"study-{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report = ledger.verify()
        assert report.ok and report.rows == 40


def test_two_connections_share_one_chain(path: Path) -> None:
    """Two ledgers on one file (say, two processes on one state folder) still build one chain."""
    with PrivacyLedger(path) as first, PrivacyLedger(path) as second:
        first.append(**spend(1, 0.5))
        second.append(**spend(2, 1.0))
        first.append(**spend(3, 1.5))
        assert [e.seq for e in second.entries()] == [1, 2, 3]
        assert first.verify().ok and second.verify().ok


def test_not_a_ledger(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(str(other))
    db.execute("CREATE TABLE rounds (round INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match=r"other\.sqlite: this SQLite file is not a fedcollab privacy ledger"):
        PrivacyLedger(other)


def test_corrupted_file(tmp_path: Path) -> None:
    bad = tmp_path / "privacy-ledger.sqlite"
    bad.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(LedgerError, match=r"privacy-ledger\.sqlite: not a usable privacy ledger .* Do not delete it"):
        PrivacyLedger(bad)


def test_readonly_needs_an_existing_ledger_and_never_writes(path: Path) -> None:
    with pytest.raises(LedgerError, match="no privacy ledger here"):
        PrivacyLedger(path, readonly=True)
    assert not path.exists()
    filled(path, rounds=1)
    with PrivacyLedger(path, readonly=True) as ledger:
        assert ledger.spent(study="s") == 0.5
        with pytest.raises(LedgerError, match="read-only"):
            ledger.append(**spend(2, 1.0))


def test_closed_ledger_says_so(path: Path) -> None:
    ledger = PrivacyLedger(path)
    ledger.close()
    ledger.close()  # idempotent
    with pytest.raises(LedgerError, match="closed"):
        ledger.spent(study="s")


def test_wal_and_full_sync(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        db = ledger._conn()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_failed_head_write_keeps_the_row_and_is_repaired_later(
        path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    filled(path, rounds=1)
    with PrivacyLedger(path) as ledger:
        def full_disk(seq: int, hash_: str) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ledger, "_write_head", full_disk)
        with caplog.at_level(logging.ERROR, logger="fedcollab.privacy._ledger"):
            entry = ledger.append(**spend(2, 1.0))  # recorded: raising would invite a second append
        assert "row 2 recorded, but the head file could not be written" in caplog.text
        with pytest.raises(LedgerError, match="cannot write the ledger's head file"):
            ledger.append(**spend(3, 1.5))  # a head that cannot move refuses before adding more
        monkeypatch.undo()
        assert ledger.append(**spend(3, 1.5)).prev_hash == entry.hash  # repaired, then appended
        assert ledger.verify() == VerifyReport(ok=True, rows=3, head_hash=ledger.entries()[-1].hash)
