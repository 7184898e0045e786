"""The institution's privacy ledger: a durable, append-only, hash-chained record of spend.

Differential privacy is only a guarantee if the institution never forgets what it has
already spent: a daemon that restarts with a fresh accountant would silently reset
epsilon to zero. So every round's spend is written here, durably (SQLite in WAL mode
with synchronous=FULL), *before* the update leaves the institution.

There is one ledger per institution (the site), at the top of its state folder, for
every study it takes part in: the budget is the site's, per dataset, not the study's
(a coordinator that offers the same study under new names gets no fresh budget). Each
row names its study and its dataset (a key derived from the site's own [data] config,
fedcollab.privacy._dataset) and carries two cumulative figures after that round: the
study's own epsilon on that dataset (checked against the study's sub-limit) and the
site's epsilon on that dataset, composed by one accountant over every study's rows
(checked against the site's budget). A restarted daemon rebuilds its accountant from
the rows (`history`) and recognizes an assignment it already paid for (`find`).

The figures are computed by the caller (fedcollab.privacy._budget) from a snapshot of
the rows; `append(based_on=...)` refuses with LedgerConflict when a row was added since
that snapshot (another study's daemon, another process), so the check and the append
are one step under SQLite's write lock and two studies cannot both spend the last of a
budget. Ledgers of the older per-study format are migrated by
fedcollab.privacy._ledger_migrate.

Tamper evidence, in layers:

* triggers make UPDATE and DELETE of `ledger` fail, which stops mistakes;
* each row's `hash` covers its contents and the previous row's hash, so editing,
  removing or reordering a row breaks the chain;
* a head file next to the database (`privacy-ledger.head`) records the newest row's
  seq and hash, so removing the newest rows (which leaves a valid, shorter chain) is
  detected too.

The chain has no secret key: someone who can write the folder can rebuild the whole
chain and the head file. What it does is make accidental or naive edits loud; anchoring
head hashes outside the institution (for example with the coordinator) would be the
next step against a deliberate adversary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fedcollab._fileio import atomic_write
from fedcollab.privacy._ledger_rows import (
    _ARGS,
    _COLUMNS,
    LedgerConflict,
    LedgerEntry,
    LedgerError,
    OverLimit,
    _entry,
    _read_entry,
    _typed,
    _validate,
    canonical_json,
    row_hash,
)

__all__ = [
    "FORMAT", "FORMAT_V1", "GENESIS_HASH", "LEDGER_FILENAME", "LIMIT_TOLERANCE", "LedgerConflict", "LedgerEntry",
    "LedgerError", "OverLimit", "PrivacyLedger", "VerifyReport", "canonical_json", "ledger_path", "row_hash",
]

log = logging.getLogger(__name__)

LEDGER_FILENAME = "privacy-ledger.sqlite"
FORMAT = "fedcollab-privacy-ledger/2"
# Per-study ledgers (studies/<name>/privacy-ledger.sqlite) of fedcollab before the site ledger.
FORMAT_V1 = "fedcollab-privacy-ledger/1"
# Allowed excess over a limit: floating-point noise of the accountants, not extra spend.
LIMIT_TOLERANCE = 1e-9
GENESIS_HASH = "0" * 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    study TEXT NOT NULL,
    dataset TEXT NOT NULL,
    round INTEGER NOT NULL,
    nonce TEXT NOT NULL,
    epsilon REAL NOT NULL,
    site_epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    accountant TEXT NOT NULL,
    accountant_state TEXT NOT NULL,
    budget_epsilon REAL NOT NULL,
    site_budget_epsilon REAL NOT NULL,
    update_sha256 TEXT NOT NULL,
    base_sha256 TEXT NOT NULL DEFAULT '',
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_study ON ledger (dataset, study, seq);
CREATE INDEX IF NOT EXISTS ledger_assignment ON ledger (dataset, study, round, nonce);
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only: rows cannot be updated'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only: rows cannot be deleted'); END;
CREATE TRIGGER IF NOT EXISTS ledger_meta_no_update BEFORE UPDATE ON ledger_meta
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_meta_no_delete BEFORE DELETE ON ledger_meta
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"""

@dataclass(frozen=True)
class VerifyReport:
    """What `PrivacyLedger.verify` found. It reports tampering; it never raises for it."""

    ok: bool
    rows: int
    head_hash: str
    """Hash of the newest row (64 zeros for an empty ledger)."""
    first_bad_seq: int | None = None
    """The first row that is wrong or missing; None when ok, or when the problem is not one row's."""
    problem: str = ""


def ledger_path(state_dir: Path) -> Path:
    """Where a site's ledger lives: at the top of its state folder, one for every study."""
    return Path(state_dir) / LEDGER_FILENAME


class PrivacyLedger:
    """An institution's privacy ledger in one SQLite file, safe to share between threads.

    `readonly=True` (for inspection, e.g. the CLI next to a running daemon) requires the
    file to exist and never writes: no schema creation, no head repair, no append.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_suffix(".head")
        self.readonly = readonly
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._columns = ", ".join(_COLUMNS)  # what SELECTs read (see _select_list)
        if readonly and not self.path.is_file():
            raise LedgerError(f"{self.path}: no privacy ledger here")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE), so the chain
            # check and the insert it guards happen under one write lock, across processes.
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        except sqlite3.Error as e:
            raise self._unusable(e) from None
        self._db = db
        try:
            self._open(db)
        except BaseException:
            self.close()
            raise

    def _unusable(self, e: Exception) -> LedgerError:
        return LedgerError(
            f"{self.path}: not a usable privacy ledger ({e}). It may be corrupted or another kind of "
            "file. Do not delete it: it records privacy already spent. Move it aside and restore the "
            "ledger from a backup (with its .head file), or point state_dir at the right folder."
        )

    def _open(self, db: sqlite3.Connection) -> None:
        try:
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check[0] if check else 'no answer'}")
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not self.readonly:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
            if not tables and not self.readonly:
                db.execute("BEGIN IMMEDIATE")  # not executescript: it would COMMIT halfway
                try:
                    for statement in _split_sql(_SCHEMA):
                        db.execute(statement)
                    db.execute("INSERT OR IGNORE INTO ledger_meta (key, value) VALUES ('format', ?)", (FORMAT,))
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            else:
                meta = None
                if "ledger_meta" in tables:
                    meta = db.execute("SELECT value FROM ledger_meta WHERE key='format'").fetchone()
                if meta is not None and meta[0] == FORMAT_V1:
                    raise LedgerError(
                        f"{self.path}: a per-study privacy ledger of an older fedcollab ({FORMAT_V1}); the "
                        "budget is now the site's, in one ledger for every study. Migrate this state folder "
                        "(its rows are kept): `fedcollab institution ledger --config institution.toml --migrate`, "
                        "or start `fedcollab institution run`, which migrates it before training"
                    )
                if meta is None or meta[0] != FORMAT or "ledger" not in tables:
                    raise LedgerError(
                        f"{self.path}: this SQLite file is not a fedcollab privacy ledger "
                        f"(format {meta[0] if meta else 'unknown'!r}, expected {FORMAT!r}); "
                        "check the path, or move the file aside so a new ledger can be created"
                    )
                self._columns = _select_list(db)
                if not self.readonly and "''" in self._columns:
                    # A ledger from before base_sha256: the column is added (its old rows
                    # keep '' and, with it, the hashes they were chained with).
                    try:
                        db.execute("ALTER TABLE ledger ADD COLUMN base_sha256 TEXT NOT NULL DEFAULT ''")
                    except sqlite3.OperationalError as e:  # another process on this folder added it first
                        if "duplicate column" not in str(e):
                            raise
                    self._columns = _select_list(db)
                if not self.readonly:
                    # Someone may have dropped them; the chain still catches edits, but put the
                    # guard rails back.
                    for statement in _split_sql(_SCHEMA):
                        if statement.lstrip().upper().startswith("CREATE TRIGGER"):
                            db.execute(statement)
        except sqlite3.Error as e:
            raise self._unusable(e) from None
        if not self.readonly:
            report = self._inspect(repair=True)  # repairs a head left one row behind by a crash
            if not report.ok:  # still opens, so the spend can be read and the damage inspected
                log.error("%s does not verify: %s; appends are refused until it is restored",
                          self.path, report.problem)

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise LedgerError(f"{self.path}: the ledger is closed")
        return self._db

    @contextlib.contextmanager
    def _tx(self, *, write: bool, convert: bool = True) -> Iterator[sqlite3.Connection]:
        """A transaction under the thread lock; `write` takes SQLite's write lock up front.

        SQLite errors (disk full, I/O, a locked file) become LedgerError unless `convert`
        is false, so callers such as the trainer handle one exception type.
        """
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield db
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error as e:
                if not convert:
                    raise
                with contextlib.suppress(sqlite3.Error):
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                raise LedgerError(f"{self.path}: {e}") from e

    # -- writing ------------------------------------------------------------------------

    def append(
        self,
        *,
        study: str,
        dataset: str,
        round: int,
        nonce: str,
        epsilon: float,
        site_epsilon: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: str,
        history: Iterable[Sequence[float | int]],
        budget_epsilon: float,
        site_budget_epsilon: float,
        update_sha256: str = "",
        base_sha256: str = "",
        based_on: int | None = None,
    ) -> LedgerEntry:
        """Record one round's spend durably; returns the committed row.

        Call it before the update is sent: when it returns, the row is on disk. It
        refuses (LedgerError) invalid values; a cumulative figure below the previous
        one (spend never decreases); a row past the study's limit or the site's budget
        (OverLimit); a ledger whose chain does not verify (a tampered ledger is never
        built upon); and, with `based_on` (the `snapshot` seq the figures were computed
        from), any row added since (LedgerConflict: compute again and retry).
        """
        if self.readonly:
            raise LedgerError(f"{self.path}: opened read-only")
        values = _validate(study=study, dataset=dataset, round=round, nonce=nonce, epsilon=epsilon,
                           site_epsilon=site_epsilon, delta=delta, noise_multiplier=noise_multiplier,
                           sample_rate=sample_rate, steps=steps, accountant=accountant, history=history,
                           budget_epsilon=budget_epsilon, site_budget_epsilon=site_budget_epsilon,
                           update_sha256=update_sha256, base_sha256=base_sha256)
        for figure, limit, what in (("epsilon", "budget_epsilon", f"the limit of study {study!r}"),
                                    ("site_epsilon", "site_budget_epsilon", "the site's budget")):
            if values[figure] > values[limit] * (1 + LIMIT_TOLERANCE):
                raise OverLimit(f"{figure} {values[figure]!r} is past {what} of {values[limit]!r} on dataset "
                                f"{dataset!r}: a spend past a limit is never recorded (nor sent)")
        with self._lock:
            with self._tx(write=True) as db:
                report = self._verified_locked(db, doing="append to")
                if based_on is not None and report.rows != based_on:
                    raise LedgerConflict(f"{self.path}: {report.rows - based_on} row(s) added since the spend was "
                                         "computed; compute it again")
                previous = self._latest_locked(db, values["study"], values["dataset"])
                if previous is not None and values["epsilon"] < previous.epsilon:
                    raise LedgerError(
                        f"epsilon {values['epsilon']!r} for study {values['study']!r} is below the "
                        f"{previous.epsilon!r} already recorded at row {previous.seq}: epsilon is the "
                        "cumulative spend of the study, and spend never decreases"
                    )
                site = self._latest_locked(db, None, values["dataset"])
                if site is not None and values["site_epsilon"] < site.site_epsilon:
                    raise LedgerError(
                        f"site_epsilon {values['site_epsilon']!r} on dataset {values['dataset']!r} is below the "
                        f"{site.site_epsilon!r} already recorded at row {site.seq}: the site's spend never decreases"
                    )
                fields: dict[str, Any] = {
                    "seq": report.rows + 1,
                    "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
                    **values,
                }
                fields["prev_hash"] = report.head_hash
                fields["hash"] = row_hash(report.head_hash, fields)
                db.execute(f"INSERT INTO ledger ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                           tuple(fields[c] for c in _COLUMNS))
            entry = _entry(fields)
            self._move_head(entry.seq)
            return entry

    def import_rows(self, rows: Sequence[dict[str, Any]], *, meta: dict[str, str]) -> int:
        """Append already-spent rows (a migration) in one transaction with `meta` keys
        that mark their source, so a crash imports all or nothing and a source is never
        imported twice (a meta key already present refuses the whole import). Rows are
        not checked against the limits: their spend happened; later rounds are."""
        if self.readonly:
            raise LedgerError(f"{self.path}: opened read-only")
        checked = []
        for r in rows:
            values = _validate(**{k: r[k] for k in _ARGS if k in r})
            checked.append({"created_at": str(r["created_at"]), **values})
        with self._lock:
            with self._tx(write=True) as db:
                report = self._verified_locked(db, doing="import into")
                for key, value in meta.items():
                    db.execute("INSERT INTO ledger_meta (key, value) VALUES (?, ?)", (key, value))
                prev, seq = report.head_hash, report.rows
                for values in checked:
                    seq += 1
                    fields: dict[str, Any] = {"seq": seq, **values, "prev_hash": prev}
                    fields = {c: fields[c] for c in _COLUMNS if c != "hash"}
                    fields["hash"] = prev = row_hash(prev, fields)
                    db.execute(f"INSERT INTO ledger ({', '.join(_COLUMNS)}) "
                               f"VALUES ({', '.join('?' * len(_COLUMNS))})", tuple(fields[c] for c in _COLUMNS))
            self._move_head(seq)
            return len(checked)

    def meta(self, key: str) -> str | None:
        """A value of the ledger's meta table (format, migrated sources)."""
        with self._tx(write=False) as db:
            row = db.execute("SELECT value FROM ledger_meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _move_head(self, seq: int) -> None:
        """The rows are committed and durable. Now move the head, under SQLite's write lock
        so that concurrent writers (another process on the same folder) cannot move it
        backwards: it always records the newest committed row."""
        try:
            with self._tx(write=True) as db:
                newest = db.execute("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
                if newest is not None:
                    self._write_head(int(newest[0]), str(newest[1]))
        except OSError as e:
            # Not raised: the spend *is* recorded, and a caller that saw an exception
            # might record it twice. A head one row behind is repaired on the next open
            # or append; if the folder stays unwritable the next append raises.
            log.error("%s: row %d recorded, but the head file could not be written: %s", self.path, seq, e)

    def _write_head(self, seq: int, hash_: str) -> None:
        """Replace the head file atomically and durably."""
        atomic_write(self.head_path, (canonical_json({"seq": seq, "hash": hash_}) + "\n").encode("utf-8"))

    # -- reading ------------------------------------------------------------------------

    def entries(self, *, study: str | None = None, dataset: str | None = None) -> list[LedgerEntry]:
        """All rows (of one study and/or one dataset if given), oldest first. Does not
        verify: call verify() for that."""
        where, args = _where(study, dataset)
        with self._tx(write=False) as db:
            rows = db.execute(f"SELECT {self._columns} FROM ledger{where} ORDER BY seq", args).fetchall()
        return [_read_entry(row) for row in rows]

    def snapshot(self, *, dataset: str) -> tuple[int, list[LedgerEntry]]:
        """(rows in the whole ledger, this dataset's rows) read at one instant: the
        figures of an append are computed from it and `append(based_on=...)` checks
        that nothing was added since."""
        with self._tx(write=False) as db:
            count = int(db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])
            rows = db.execute(f"SELECT {self._columns} FROM ledger WHERE dataset=? ORDER BY seq",
                              (dataset,)).fetchall()
        return count, [_read_entry(row) for row in rows]

    def latest(self, *, study: str | None, dataset: str | None = None) -> LedgerEntry | None:
        """The newest row of a study (on one dataset if given), or of a dataset (study None)."""
        with self._tx(write=False) as db:
            return self._latest_locked(db, study, dataset)

    def _latest_locked(self, db: sqlite3.Connection, study: str | None,
                       dataset: str | None = None) -> LedgerEntry | None:
        where, args = _where(study, dataset)
        row = db.execute(f"SELECT {self._columns} FROM ledger{where} ORDER BY seq DESC LIMIT 1",
                         args).fetchone()
        return None if row is None else _read_entry(row)

    def find(self, *, study: str, round: int, nonce: str, base_sha256: str = "",
             dataset: str | None = None) -> LedgerEntry | None:
        """The spend recorded for this assignment, so that it is not spent twice: the row
        of this round trained from the same base model (`base_sha256`; a retried attempt
        has a new nonce but asks for the same release), or of this very nonce (rows from
        before base_sha256 was recorded).

        If the same assignment was recorded more than once (it was trained again, which
        spends again), the newest row is returned.
        """
        where, args = _where(study, dataset)
        with self._tx(write=False) as db:
            row = db.execute(
                f"SELECT {self._columns} FROM ledger{where} AND round=? AND (nonce=? OR (base_sha256 != '' "
                "AND base_sha256=?)) ORDER BY seq DESC LIMIT 1", (*args, round, nonce, base_sha256)).fetchone()
        return None if row is None else _read_entry(row)

    def spent(self, *, study: str, dataset: str | None = None) -> float:
        """Cumulative epsilon spent in a study so far (0.0 before its first row)."""
        entry = self.latest(study=study, dataset=dataset)
        return 0.0 if entry is None else entry.epsilon

    def site_spent(self, *, dataset: str) -> float:
        """The site's cumulative epsilon on a dataset, over every study (0.0 before any row)."""
        entry = self.latest(study=None, dataset=dataset)
        return 0.0 if entry is None else entry.site_epsilon

    def history(self, *, study: str, dataset: str | None = None) -> list[tuple[float, float, int]]:
        """The accountant history to restore after a restart (opacus' `accountant.history`)."""
        entry = self.latest(study=study, dataset=dataset)
        return [] if entry is None else list(entry.history)

    # -- verification -------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Check the whole chain and the head file. Reports tampering; never raises for it.

        A head file exactly one row behind is the trace of a crash between the commit and
        the head write (or of an append in flight in another process): it is not reported,
        and a writable ledger repairs it.
        """
        return self._inspect(repair=not self.readonly)

    def _inspect(self, *, repair: bool) -> VerifyReport:
        with self._lock:
            try:
                if self.readonly:
                    # No write lock: read the head before the rows, so that an append in
                    # another process can only make the head look behind, never ahead.
                    head = self._read_head()
                    with self._tx(write=False, convert=False) as db:
                        return self._check(db, head, repair=False)
                with self._tx(write=True, convert=False) as db:
                    return self._inspect_locked(db, repair=repair)
            except sqlite3.Error as e:
                return VerifyReport(ok=False, rows=0, head_hash="", problem=f"cannot read the ledger: {e}")

    def _verified_locked(self, db: sqlite3.Connection, *, doing: str) -> VerifyReport:
        """Caller holds the lock, in a write transaction: the chain's report, or LedgerError
        if it does not verify (nothing is ever added to a broken chain)."""
        report = self._inspect_locked(db, repair=True)
        if not report.ok:
            raise LedgerError(f"{self.path}: refusing to {doing} a ledger that does not verify: {report.problem}")
        return report

    def _inspect_locked(self, db: sqlite3.Connection, *, repair: bool) -> VerifyReport:
        return self._check(db, self._read_head(), repair=repair)

    def _read_head(self) -> tuple[int, str] | str | None:
        """(seq, hash), None when the file is missing, or a description of what is wrong with it."""
        try:
            text = self.head_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            return f"head file {self.head_path.name} cannot be read: {e}"
        try:
            data = json.loads(text)
            seq, hash_ = data["seq"], data["hash"]
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or not isinstance(hash_, str):
                raise ValueError("wrong types")
        except (ValueError, KeyError, TypeError) as e:
            return f"head file {self.head_path.name} is not valid ({e})"
        return seq, hash_

    def _check(self, db: sqlite3.Connection, head: tuple[int, str] | str | None, *, repair: bool) -> VerifyReport:
        rows = db.execute(f"SELECT {self._columns} FROM ledger ORDER BY seq").fetchall()
        n = len(rows)
        hashes = [GENESIS_HASH]  # hashes[k] = hash of row k (row 0: the genesis)
        expected_prev = GENESIS_HASH
        for index, raw in enumerate(rows, start=1):
            seq = raw[0]
            if seq != index:
                if index == 1:
                    problem = f"seq gap: the ledger starts at row {seq} (rows deleted?)"
                else:
                    problem = f"seq gap after row {index - 1} (rows deleted?)"
                return VerifyReport(ok=False, rows=n, head_hash=expected_prev, first_bad_seq=seq, problem=problem)
            try:
                fields = _typed(raw)
                _entry(fields)
            except (TypeError, ValueError) as e:
                return VerifyReport(ok=False, rows=n, head_hash=expected_prev, first_bad_seq=seq,
                                    problem=f"row {seq}: malformed ({e}) (edited?)")
            if row_hash(fields["prev_hash"], fields) != fields["hash"]:
                return VerifyReport(ok=False, rows=n, head_hash=expected_prev, first_bad_seq=seq,
                                    problem=f"row {seq}: hash does not match its contents (edited?)")
            if fields["prev_hash"] != expected_prev:
                link = "the start of the chain" if seq == 1 else f"row {seq - 1}"
                return VerifyReport(ok=False, rows=n, head_hash=expected_prev, first_bad_seq=seq,
                                    problem=f"row {seq}: prev_hash does not link to {link} "
                                            "(row removed or reordered?)")
            expected_prev = fields["hash"]
            hashes.append(expected_prev)
        newest = hashes[-1]

        def bad(problem: str, first_bad: int | None = None) -> VerifyReport:
            return VerifyReport(ok=False, rows=n, head_hash=newest, first_bad_seq=first_bad, problem=problem)

        if isinstance(head, str):
            return bad(head)
        if head is None:
            if n == 0:  # a fresh ledger whose genesis head was not written yet
                if repair:
                    self._repair_head(0, GENESIS_HASH, n)
                return VerifyReport(ok=True, rows=0, head_hash=newest)
            return bad(f"head file {self.head_path.name} missing (deleted, or the ledger copied without it?)")
        head_seq, head_hash = head
        if head_seq > n:
            return bad(f"head file says {head_seq} rows, the ledger has {n} (newest rows removed?)", n + 1)
        if head_hash != hashes[head_seq]:
            return bad(f"head file's hash does not match row {head_seq} (rows rewritten?)", head_seq or None)
        if head_seq == n - 1:
            if repair:
                self._repair_head(n, newest, n)
            return VerifyReport(ok=True, rows=n, head_hash=newest)
        if head_seq < n:
            return bad(f"head file says {head_seq} rows, the ledger has {n} "
                       "(head file replaced with an older copy?)", head_seq + 1)
        return VerifyReport(ok=True, rows=n, head_hash=newest)

    def _repair_head(self, seq: int, hash_: str, rows: int) -> None:
        """Bring a head one row behind up to date (called under SQLite's write lock)."""
        if rows:
            log.warning("%s: head file was one row behind (a crash between recording row %d and "
                        "writing the head?); repaired", self.path, seq)
        try:
            self._write_head(seq, hash_)
        except OSError as e:
            raise LedgerError(f"{self.head_path}: cannot write the ledger's head file: {e}") from None


def _where(study: str | None, dataset: str | None) -> tuple[str, tuple[str, ...]]:
    """A WHERE clause (never empty: callers append AND ...) and its arguments."""
    clauses, args = ["1=1"], []
    if study is not None:
        clauses.append("study=?")
        args.append(study)
    if dataset is not None:
        clauses.append("dataset=?")
        args.append(dataset)
    return " WHERE " + " AND ".join(clauses), tuple(args)


def _select_list(db: sqlite3.Connection) -> str:
    """The SELECT list that reads a row in _COLUMNS' order: a ledger from before
    base_sha256 (read-only, or just before it is upgraded) reads it as ''."""
    have = {str(r[1]) for r in db.execute("PRAGMA table_info(ledger)")}
    return ", ".join(c if c in have else f"'' AS {c}" for c in _COLUMNS)


def _split_sql(script: str) -> list[str]:
    """The schema's statements (triggers contain ';' inside BEGIN ... END)."""
    statements, current = [], ""
    for line in script.strip().splitlines():
        current += line + "\n"
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements
