"""Durable coordinator state in SQLite: institutions, rounds, participations, models.

A round's commit (its model version, its signed lineage record and its closing row) is
one transaction, so a restarted coordinator sees either the whole round or none of it.

Durability: the database is in WAL mode. Rounds, models and lineage are written with
synchronous=FULL (the WAL is fsynced before the commit returns): a committed round
survives a power loss. Rows written once per call (an institution's join, a
participation, evaluation reports) use synchronous=NORMAL: no fsync of their own, which
under 200 institutions was one fsync per call under the store's lock. They survive a
killed coordinator all the same (the write has reached the OS); a power loss can lose
those written since the last FULL commit, and nothing more: the WAL is a log, so its
fsync at the next round's open or commit makes every earlier row durable with it. The
rows at risk belong to a round that did not commit (abandoned at restart) or are
figures about a model already committed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedcollab.coordinator._checkpoints import ModelVersion
from fedcollab.coordinator._declines import with_declines

log = logging.getLogger("fedcollab.coordinator")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS institutions (
    name TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    num_train_examples INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    parent_version INTEGER,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'committed', 'failed', 'abandoned')),
    opened_at REAL NOT NULL,
    closed_at REAL,
    base_version INTEGER NOT NULL,
    model_version INTEGER,
    reason TEXT,
    metrics TEXT NOT NULL DEFAULT '{}',
    counted INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (round, attempt)
);
CREATE TABLE IF NOT EXISTS participations (
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    institution TEXT NOT NULL,
    status TEXT NOT NULL,
    num_examples INTEGER,
    update_sha256 TEXT,
    reason TEXT,
    metrics TEXT NOT NULL DEFAULT '{}',
    privacy TEXT,
    PRIMARY KEY (round, attempt, institution)
);
CREATE TABLE IF NOT EXISTS lineage (
    version INTEGER PRIMARY KEY,
    record BLOB NOT NULL,
    signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    round INTEGER NOT NULL,
    institution TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    loss REAL NOT NULL,
    accuracy REAL NOT NULL,
    PRIMARY KEY (round, institution)
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class Store:
    # The study's running totals (bytes in and out, failed participations by reason),
    # kept in memory by its engine and written here with each round's close and at
    # shutdown (`save_counters`): set by _counters.attach. None: none are written.
    counters_source: Callable[[], Mapping[str, int]] | None = None

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """`read_only`: for a look at the state of a coordinator that may be serving
        (`fedcollab coordinator status`): nothing is written, so its open round stays
        open. Otherwise the state is the coordinator's own, and a round still open is
        one a crash left behind."""
        # Model files live in models/ beside the database. Rows are resolved against it
        # by file name, so a state folder that was moved or copied keeps its models
        # (an absolute path from the old place would make them look like orphans).
        self._models_dir = path.parent / "models"
        self._lock = threading.Lock()
        if read_only:
            self._db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._durable = True
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._durable = True  # the connection's synchronous setting: FULL (True) or NORMAL
            self._db.executescript(_SCHEMA)
            self._allow_repeated_models()
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(participations)")}
            if "privacy" not in columns:  # state written before privacy spend was recorded
                self._db.execute("ALTER TABLE participations ADD COLUMN privacy TEXT")
            if "counted" not in {r[1] for r in self._db.execute("PRAGMA table_info(rounds)")}:
                # State from before some failed attempts were not counted: each one was.
                self._db.execute("ALTER TABLE rounds ADD COLUMN counted INTEGER NOT NULL DEFAULT 1")
            # Rounds left open by a crash never committed: say so instead of leaving them open.
            self._db.execute(
                "UPDATE rounds SET status='abandoned', closed_at=?, reason='coordinator stopped' "
                "WHERE status='open'",
                (time.time(),),
            )

    def _allow_repeated_models(self) -> None:
        """A round whose updates sum to zero commits a version with the same bytes as
        its parent; state from before that was allowed had sha256 UNIQUE. Caller holds
        the lock."""
        row = self._db.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='models'").fetchone()
        if row is not None and "UNIQUE" in row[0]:
            self._db.executescript(
                "BEGIN IMMEDIATE;"
                "CREATE TABLE models_new (version INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, path TEXT NOT NULL,"
                " size_bytes INTEGER NOT NULL, parent_version INTEGER, created_at REAL NOT NULL);"
                "INSERT INTO models_new SELECT version, sha256, path, size_bytes, parent_version, created_at "
                "FROM models;"
                "DROP TABLE models; ALTER TABLE models_new RENAME TO models; COMMIT;"
            )
        self._db.execute("CREATE INDEX IF NOT EXISTS models_by_sha ON models(sha256)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """`durable` False: committed without an fsync (see the module's docstring), only
        for rows whose loss at a power cut is harmless."""
        with self._lock:
            if durable != self._durable:  # a connection setting, outside any transaction
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._durable = durable
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # institutions
    def upsert_institution(self, *, name: str, num_train_examples: int) -> None:
        now = time.time()
        with self._tx(durable=False) as db:
            db.execute(
                "INSERT INTO institutions (name, first_seen, last_seen, num_train_examples) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET last_seen=excluded.last_seen, "
                "num_train_examples=excluded.num_train_examples",
                (name, now, now, num_train_examples),
            )

    def institutions(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM institutions ORDER BY name")]

    # models
    def add_initial_model(self, model: ModelVersion, *, lineage: tuple[bytes, bytes] | None = None) -> None:
        """`lineage` is v0's (record bytes, signature), stored in the same transaction."""
        with self._tx() as db:
            self._insert_model(db, model, parent=None)
            if lineage is not None:
                self._insert_lineage(db, model.version, lineage)

    @staticmethod
    def _insert_model(db: sqlite3.Connection, model: ModelVersion, *, parent: int | None) -> None:
        db.execute(
            "INSERT INTO models (version, sha256, path, size_bytes, parent_version, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (model.version, model.sha256, str(model.path), model.size_bytes, parent, time.time()),
        )

    @staticmethod
    def _insert_lineage(db: sqlite3.Connection, version: int, lineage: tuple[bytes, bytes]) -> None:
        record, signature = lineage
        db.execute("INSERT INTO lineage (version, record, signature) VALUES (?, ?, ?)",
                   (version, bytes(record), bytes(signature)))

    def add_lineage(self, *, version: int, record: bytes, signature: bytes) -> None:
        """A record for an already committed version (state written before lineage)."""
        with self._tx() as db:
            self._insert_lineage(db, version, (record, signature))

    def lineage(self, version_from: int = 0) -> list[tuple[int, bytes, bytes]]:
        """(version, record bytes, signature) of every signed version from `version_from` on."""
        rows = self._query("SELECT version, record, signature FROM lineage WHERE version>=? ORDER BY version",
                           (version_from,))
        return [(int(r["version"]), bytes(r["record"]), bytes(r["signature"])) for r in rows]

    def lineage_of(self, version: int) -> tuple[bytes, bytes] | None:
        """(record bytes, signature) of one version, or None if it has no record."""
        rows = self._query("SELECT record, signature FROM lineage WHERE version=?", (version,))
        return (bytes(rows[0]["record"]), bytes(rows[0]["signature"])) if rows else None

    def latest_model(self) -> ModelVersion | None:
        rows = self._query("SELECT * FROM models ORDER BY version DESC LIMIT 1")
        return self._model(rows[0]) if rows else None

    def model_by_sha(self, sha256: str) -> ModelVersion | None:
        rows = self._query("SELECT * FROM models WHERE sha256=? ORDER BY version DESC LIMIT 1", (sha256,))
        return self._model(rows[0]) if rows else None

    def models(self) -> list[ModelVersion]:
        return [self._model(r) for r in self._query("SELECT * FROM models ORDER BY version")]

    def model_parents(self) -> dict[int, int | None]:
        return {r["version"]: r["parent_version"] for r in self._query("SELECT version, parent_version FROM models")}

    # rounds
    def next_attempt(self, round_number: int) -> int:
        """The number of the round's next attempt (its row's key): every attempt, counted or not."""
        rows = self._query("SELECT COALESCE(MAX(attempt), 0) AS a FROM rounds WHERE round=?", (round_number,))
        return int(rows[0]["a"]) + 1

    def counted_attempts(self, round_number: int) -> int:
        """Attempts of the round that ended without a commit and count towards
        max_round_attempts: not those failed because institutions were refused
        (fail_round(counted=False))."""
        rows = self._query("SELECT COUNT(*) AS n FROM rounds WHERE round=? AND status!='committed' AND counted=1",
                           (round_number,))
        return int(rows[0]["n"])

    def open_round(self, *, round_number: int, attempt: int, base_version: int, participants: list[str]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO rounds (round, attempt, status, opened_at, base_version) VALUES (?, ?, 'open', ?, ?)",
                (round_number, attempt, time.time(), base_version),
            )
            db.executemany(
                "INSERT INTO participations (round, attempt, institution, status) VALUES (?, ?, ?, 'selected')",
                [(round_number, attempt, name) for name in participants],
            )

    def record_participation(
        self,
        *,
        round_number: int,
        attempt: int,
        institution: str,
        status: str,
        num_examples: int | None = None,
        update_sha256: str | None = None,
        reason: str | None = None,
        metrics: dict[str, float] | None = None,
        privacy: dict[str, Any] | None = None,
    ) -> None:
        """`privacy` is the institution's reported DP spend (PrivacySpend as a dict). Not
        durable on its own: the round's commit or failure, written after, makes it so."""
        with self._tx(durable=False) as db:
            db.execute(
                "UPDATE participations SET status=?, num_examples=?, update_sha256=?, reason=?, metrics=?, privacy=? "
                "WHERE round=? AND attempt=? AND institution=?",
                (status, num_examples, update_sha256, reason, json.dumps(metrics or {}),
                 json.dumps(privacy) if privacy is not None else None, round_number, attempt, institution),
            )

    def commit_round(
        self, *, round_number: int, attempt: int, model: ModelVersion, parent: int, metrics: dict[str, Any],
        lineage: tuple[bytes, bytes] | None = None,
    ) -> None:
        """`lineage` is the new version's (record bytes, signature): committed with it."""
        with self._tx() as db:
            self._insert_model(db, model, parent=parent)
            if lineage is not None:
                self._insert_lineage(db, model.version, lineage)
            db.execute(
                "UPDATE rounds SET status='committed', closed_at=?, model_version=?, metrics=?, reason=? "
                "WHERE round=? AND attempt=?",
                (time.time(), model.version, json.dumps(metrics),
                 _with_declines(db, round_number, attempt, None), round_number, attempt),
            )
            self._write_counters(db)

    def fail_round(self, *, round_number: int, attempt: int, reason: str, counted: bool = True) -> None:
        """`counted` False: the attempt does not count towards the study's max_round_attempts."""
        with self._tx() as db:
            db.execute(
                "UPDATE rounds SET status='failed', closed_at=?, reason=?, counted=? WHERE round=? AND attempt=?",
                (time.time(), _with_declines(db, round_number, attempt, reason), int(counted), round_number, attempt),
            )
            self._write_counters(db)

    def _write_counters(self, db: sqlite3.Connection) -> None:
        """In the caller's transaction: the round's close carries the totals at no
        extra fsync."""
        if self.counters_source is None:
            return
        try:
            totals = sorted(self.counters_source().items())
        except Exception:  # figures for /metrics must never cost a round its commit
            log.exception("the study's traffic counters could not be read; kept as last written")
            return
        db.executemany("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                       totals)

    def save_counters(self) -> None:
        """The running totals now (at shutdown: nothing since the last round is lost)."""
        with self._tx() as db:
            self._write_counters(db)

    def counters(self) -> dict[str, int]:
        try:
            return {r["name"]: int(r["value"]) for r in self._query("SELECT name, value FROM counters")}
        except sqlite3.OperationalError:  # read-only look at state from before counters were kept
            return {}

    def update_round_metrics(self, *, round_number: int, metrics: dict[str, Any]) -> None:
        with self._tx() as db:
            row = db.execute(
                "SELECT attempt, metrics FROM rounds WHERE round=? AND status='committed'", (round_number,)
            ).fetchone()
            if row is None:
                return
            merged = {**json.loads(row["metrics"]), **metrics}
            db.execute(
                "UPDATE rounds SET metrics=? WHERE round=? AND attempt=?",
                (json.dumps(merged), round_number, row["attempt"]),
            )

    def last_committed_metrics(self) -> dict[str, Any] | None:
        """The metrics of the last committed round (None before the first)."""
        rows = self._query("SELECT metrics FROM rounds WHERE status='committed' ORDER BY round DESC LIMIT 1")
        return json.loads(rows[0]["metrics"]) if rows else None

    def last_committed_round(self) -> int:
        rows = self._query("SELECT COALESCE(MAX(round), 0) AS r FROM rounds WHERE status='committed'")
        return int(rows[0]["r"])

    def rounds(self) -> list[dict[str, Any]]:
        out = []
        for r in self._query("SELECT * FROM rounds ORDER BY round, attempt"):
            d = dict(r)
            d["metrics"] = json.loads(d["metrics"])
            out.append(d)
        return out

    def participations(self, *, round_number: int | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM participations", tuple[int, ...]()
        if round_number is not None:
            sql, args = sql + " WHERE round=?", (round_number,)
        out = []
        for r in self._query(sql + " ORDER BY round, attempt, institution", args):
            d = dict(r)
            d["metrics"] = json.loads(d["metrics"])
            d["privacy"] = json.loads(d["privacy"]) if d["privacy"] else None
            out.append(d)
        return out

    def privacy_spend(self) -> list[dict[str, Any]]:
        """Each institution's reported DP spend per round, in round order: what it
        declared with its upload or decline (its own ledger is authoritative)."""
        return [
            {"round": p["round"], "attempt": p["attempt"], "institution": p["institution"], "status": p["status"],
             **p["privacy"]}
            for p in self.participations() if p["privacy"]
        ]

    # evaluations
    def record_evaluations(
        self, *, round_number: int, model_version: int, reports: dict[str, tuple[int, float, float]]
    ) -> None:
        """One evaluation's reports: institution -> (num_examples, loss, accuracy)."""
        if not reports:
            return
        with self._tx(durable=False) as db:
            db.executemany(
                "INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?)",
                [(round_number, name, model_version, n, loss, accuracy)
                 for name, (n, loss, accuracy) in sorted(reports.items())],
            )

    def evaluations(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM evaluations ORDER BY round, institution")]


    def _model(self, row: sqlite3.Row) -> ModelVersion:
        return ModelVersion(version=row["version"], sha256=row["sha256"],
                            path=self._models_dir / Path(row["path"]).name, size_bytes=row["size_bytes"])


def _with_declines(db: sqlite3.Connection, round_number: int, attempt: int, reason: str | None) -> str | None:
    """A closing round's reason, naming the institutions that declined it and why."""
    rows = db.execute("SELECT institution, reason FROM participations WHERE round=? AND attempt=? "
                      "AND status='declined'", (round_number, attempt)).fetchall()
    return with_declines(reason, [(r["institution"], r["reason"] or "") for r in rows])
