"""What the coordinator keeps about its consortium, above any one study: the studies
it runs (submitted ones with their TOML), institutions' membership, the studies each
institution declined and why, the model versions the operator published, and the
history of status changes (a study paused, resumed, cancelled, failed; an institution
suspended, approved) with when and by whom, for the operators' page.

One SQLite file, `consortium.sqlite`, beside the default study's state. Each study's
rounds, models and lineage stay in its own store (see _studies.py for where).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STUDY_STATUSES = ("queued", "running", "paused", "cancelled", "finished", "failed")
MEMBERSHIP_STATUSES = ("approved", "pending", "suspended")
MAX_DECLINE_MESSAGE = 1024  # characters of a decline message kept
MAX_HISTORY_ROWS = 500  # rows one history() call returns at most (the newest)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    is_default INTEGER NOT NULL DEFAULT 0,
    config_toml TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    start_after TEXT NOT NULL DEFAULT '',
    submitted_by TEXT NOT NULL DEFAULT '',
    submitted_at REAL NOT NULL,
    changed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS membership (
    institution TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    changed_by TEXT NOT NULL DEFAULT '',
    changed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS declines (
    study TEXT NOT NULL,
    institution TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL,
    PRIMARY KEY (study, institution)
);
CREATE TABLE IF NOT EXISTS publications (
    study TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    published_by TEXT NOT NULL DEFAULT '',
    published_at REAL NOT NULL,
    PRIMARY KEY (study, version)
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('study', 'membership')),
    subject TEXT NOT NULL,
    status TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    changed_by TEXT NOT NULL DEFAULT ''
);
"""


class Consortium:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        # Read on every Join and by every wait for the studies' end: kept in memory,
        # written through.
        self._membership = {r["institution"]: dict(r) for r in self._rows("SELECT * FROM membership")}
        self._studies = {r["name"]: r for r in self._rows("SELECT * FROM studies ORDER BY position")}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args)]

    # studies
    def add_study(self, *, name: str, config_toml: str, status: str, is_default: bool = False, start_after: str = "",
                  submitted_by: str = "") -> None:
        now = time.time()
        row = {"name": name, "is_default": int(is_default), "config_toml": config_toml, "status": status,
               "reason": "", "start_after": start_after, "submitted_by": submitted_by, "submitted_at": now,
               "changed_at": now}
        with self._tx() as db:
            row["position"] = db.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM studies").fetchone()[0]
            db.execute("INSERT INTO studies (name, position, is_default, config_toml, status, reason, start_after, "
                       "submitted_by, submitted_at, changed_at) VALUES (:name, :position, :is_default, :config_toml, "
                       ":status, :reason, :start_after, :submitted_by, :submitted_at, :changed_at)", row)
            _record(db, at=now, kind="study", subject=name, status=status, changed_by=submitted_by,
                    note="the federation's default study" if is_default
                    else "submitted" + (f", starts after {start_after}" if start_after else ""))
            self._studies[name] = row

    def set_study_status(self, name: str, *, status: str, reason: str = "", note: str | None = None) -> None:
        """`note`: what the history says (default: `reason`), e.g. who resumed it, where
        the study's own reason is cleared."""
        assert status in STUDY_STATUSES, status
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE studies SET status=?, reason=?, changed_at=? WHERE name=?", (status, reason, now, name))
            previous = self._studies.get(name, {})
            if (previous.get("status"), previous.get("reason")) != (status, reason):  # a change, not a repeat
                _record(db, at=now, kind="study", subject=name, status=status, note=reason if note is None else note)
            if name in self._studies:
                self._studies[name] = {**self._studies[name], "status": status, "reason": reason, "changed_at": now}

    def studies(self) -> list[dict[str, Any]]:
        return sorted((dict(r) for r in self._studies.values()), key=lambda r: r["position"])

    def study(self, name: str) -> dict[str, Any] | None:
        row = self._studies.get(name)
        return dict(row) if row is not None else None

    # membership
    def membership(self, institution: str) -> dict[str, Any] | None:
        return self._membership.get(institution)

    def memberships(self) -> list[dict[str, Any]]:
        return sorted(self._membership.values(), key=lambda r: r["institution"])

    def set_membership(self, institution: str, *, status: str, reason: str = "",
                       changed_by: str = "") -> dict[str, Any]:
        assert status in MEMBERSHIP_STATUSES, status
        row: dict[str, Any] = {"institution": institution, "status": status, "reason": reason,
                               "changed_by": changed_by, "changed_at": time.time()}
        with self._tx() as db:
            db.execute("INSERT INTO membership VALUES (:institution, :status, :reason, :changed_by, :changed_at) "
                       "ON CONFLICT(institution) DO UPDATE SET status=excluded.status, reason=excluded.reason, "
                       "changed_by=excluded.changed_by, changed_at=excluded.changed_at", row)
            _record(db, at=float(row["changed_at"]), kind="membership", subject=institution, status=status, note=reason,
                    changed_by=changed_by)
            self._membership[institution] = row
        return row

    # history
    def history(self, *, kind: str = "", subject: str = "", limit: int = MAX_HISTORY_ROWS) -> list[dict[str, Any]]:
        """Status changes, newest first: of one kind ('study', 'membership') and one
        subject (a study's or an institution's name) when given."""
        where, args = [], []
        for column, value in (("kind", kind), ("subject", subject)):
            if value:
                where.append(f"{column}=?")
                args.append(value)
        sql = ("SELECT at, kind, subject, status, note, changed_by FROM history"
               + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id DESC LIMIT ?")
        return self._rows(sql, (*args, max(0, min(limit, MAX_HISTORY_ROWS))))

    # declines
    def record_decline(self, *, study: str, institution: str, reason: str, message: str) -> None:
        # Bounded here whatever the caller checked: one row per (study, institution), of
        # at most MAX_DECLINE_MESSAGE characters. Stored as sent; shown escaped (_display).
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO declines VALUES (?, ?, ?, ?, ?)",
                       (study, institution[:128], reason[:64], message[:MAX_DECLINE_MESSAGE], time.time()))

    def declines(self, study: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM declines WHERE study=? ORDER BY institution", (study,))

    # model registry
    def publish(self, *, study: str, version: int, sha256: str, published_by: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO publications VALUES (?, ?, ?, ?, ?)",
                       (study, version, sha256, published_by, time.time()))

    def publications(self, study: str = "") -> list[dict[str, Any]]:
        if study:
            return self._rows("SELECT * FROM publications WHERE study=? ORDER BY version", (study,))
        return self._rows("SELECT * FROM publications ORDER BY study, version")

    def publication(self, *, study: str, version: int) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM publications WHERE study=? AND version=?", (study, version))
        return rows[0] if rows else None


def _record(db: sqlite3.Connection, *, at: float, kind: str, subject: str, status: str, note: str = "",
            changed_by: str = "") -> None:
    """One history row, in the caller's transaction (with the change it records)."""
    db.execute("INSERT INTO history (at, kind, subject, status, note, changed_by) VALUES (?, ?, ?, ?, ?, ?)",
               (at, kind, subject[:128], status, note[:MAX_DECLINE_MESSAGE], changed_by[:128]))
