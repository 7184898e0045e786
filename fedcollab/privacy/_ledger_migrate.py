"""From per-study ledgers to the site's one ledger.

Before the budget was the site's, each study's daemon kept its own ledger: the default
study's at the top of the state folder, every other in `studies/<name>/`. Their spend
happened and must keep counting, so `open_site_ledger` moves them into the site's
ledger before anything trains:

1. an old ledger at the top is set aside first (WAL folded in, then renamed to
   `privacy-ledger.v1.sqlite`, with its head), freeing the name for the site's;
2. every old ledger is verified (its chain and head, as it was written): one that does
   not verify is refused, never imported, with how to fix it;
3. all their rows go into the site's ledger in one transaction, together with a meta
   key per source, so a crash imports all or nothing and a source is never counted
   twice; each row keeps its study, round, nonce, noise, rate, steps and time, and is
   attributed to the dataset this site's config names now (it was this site's data);
4. the per-study files are then renamed to `privacy-ledger.v1.sqlite` where they are,
   kept as evidence. Nothing is deleted.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcollab.privacy._accounting import History, compose
from fedcollab.privacy._budget import composed_epsilon
from fedcollab.privacy._ledger import (
    FORMAT_V1,
    GENESIS_HASH,
    LEDGER_FILENAME,
    LedgerError,
    PrivacyLedger,
    ledger_path,
    row_hash,
)

log = logging.getLogger(__name__)

V1_FILENAME = "privacy-ledger.v1.sqlite"
_V1_COLUMNS = ("seq", "created_at", "study", "round", "nonce", "epsilon", "delta", "noise_multiplier",
               "sample_rate", "steps", "accountant", "accountant_state", "budget_epsilon", "update_sha256",
               "prev_hash", "hash")


def open_site_ledger(state_dir: Path, *, dataset: str, site_budget: float) -> PrivacyLedger:
    """The site's ledger at the top of `state_dir`, with any older per-study ledgers of
    the folder migrated into it first (see the module's docstring)."""
    state_dir = Path(state_dir)
    top = ledger_path(state_dir)
    if _format_of(top) == FORMAT_V1:
        _set_aside(top, state_dir / V1_FILENAME)
    ledger = PrivacyLedger(top)
    try:
        migrate_into(ledger, state_dir=state_dir, dataset=dataset, site_budget=site_budget)
    except BaseException:
        ledger.close()
        raise
    return ledger


def migrate_into(ledger: PrivacyLedger, *, state_dir: Path, dataset: str, site_budget: float) -> int:
    """Imports every old ledger of `state_dir` not imported yet; the number of rows imported."""
    sources: list[tuple[Path, Path]] = []  # (where it is now, where it is kept once migrated)
    if (state_dir / V1_FILENAME).is_file():
        sources.append((state_dir / V1_FILENAME, state_dir / V1_FILENAME))
    for folder in sorted(p for p in (state_dir / "studies").glob("*") if p.is_dir()):
        for name in (V1_FILENAME, LEDGER_FILENAME):
            if (folder / name).is_file() and (name == V1_FILENAME or _format_of(folder / name) == FORMAT_V1):
                sources.append((folder / name, folder / V1_FILENAME))
                break
    pending, rows, meta = [], [], {}
    for now, kept in sources:
        key = "migrated:" + kept.relative_to(state_dir).as_posix()
        if ledger.meta(key) is None:
            old, head = _read_v1(now)
            rows += old
            meta[key] = head
        if now != kept:
            pending.append((now, kept))
    if rows:
        rows.sort(key=lambda r: r["created_at"])  # one chain in the order the spend happened
        _site_figures(ledger, rows, dataset=dataset, site_budget=site_budget)
        ledger.import_rows(rows, meta=meta)
        log.warning("%s: migrated %d row(s) of %d per-study privacy ledger(s) into the site's ledger, counted "
                    "against dataset %s; the old files are kept as %s", ledger.path, len(rows), len(meta), dataset,
                    V1_FILENAME)
    elif meta:
        ledger.import_rows([], meta=meta)  # empty old ledgers: remembered as migrated all the same
    for now, kept in pending:
        _set_aside(now, kept)
    return len(rows)


def _site_figures(ledger: PrivacyLedger, rows: Sequence[dict[str, Any]], *, dataset: str, site_budget: float) -> None:
    """Each imported row's site total: one history over the dataset's rows so far and the imported ones."""
    history: History = []
    for e in ledger.entries(dataset=dataset):
        history = compose(history, noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps)
    for r in rows:
        history = compose(history, noise_multiplier=r["noise_multiplier"], sample_rate=r["sample_rate"],
                          steps=r["steps"])
        site = composed_epsilon(history=history, delta=r["delta"], accountant=r["accountant"])
        r["site_epsilon"] = max(r["epsilon"], site)
        r["dataset"], r["site_budget_epsilon"] = dataset, site_budget


def _format_of(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM ledger_meta WHERE key='format'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None  # not ours to judge here: PrivacyLedger says what is wrong with it
    return None if row is None else str(row[0])


def _set_aside(path: Path, to: Path) -> None:
    """Fold the WAL into the file (a rename would leave committed rows behind in it), then rename file and head."""
    try:
        db = sqlite3.connect(str(path), isolation_level=None)
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.execute("PRAGMA journal_mode=DELETE")
        finally:
            db.close()
    except sqlite3.Error as e:
        raise LedgerError(f"{path}: cannot set the old ledger aside for migration ({e}); stop every daemon using "
                          "this state folder and try again") from None
    head = path.with_suffix(".head")
    if head.is_file():
        head.replace(to.with_suffix(".head"))
    path.replace(to)


def _read_v1(path: Path) -> tuple[list[dict[str, Any]], str]:
    """The rows of an old ledger, once its chain and head verify; (rows, head hash)."""
    def refuse(problem: str) -> LedgerError:
        return LedgerError(
            f"{path}: an old per-study privacy ledger that does not verify ({problem}), so it is not migrated and "
            "nothing trains. Restore it (with its .head file) from a backup; or, if you accept that the spend it "
            "recorded is no longer counted, move it out of the state folder")

    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            raw = db.execute(f"SELECT {', '.join(_V1_COLUMNS)} FROM ledger ORDER BY seq").fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise refuse(f"cannot read it: {e}") from None
    prev, rows = GENESIS_HASH, []
    for index, values in enumerate(raw, start=1):
        fields = dict(zip(_V1_COLUMNS, values, strict=True))
        if fields["seq"] != index or fields["prev_hash"] != prev or row_hash(prev, fields) != fields["hash"]:
            raise refuse(f"row {fields['seq']} does not chain")
        prev = fields["hash"]
        rows.append({
            "created_at": fields["created_at"], "study": fields["study"], "round": fields["round"],
            "nonce": fields["nonce"], "epsilon": fields["epsilon"], "delta": fields["delta"],
            "noise_multiplier": fields["noise_multiplier"], "sample_rate": fields["sample_rate"],
            "steps": fields["steps"], "accountant": fields["accountant"],
            "history": json.loads(fields["accountant_state"]), "budget_epsilon": fields["budget_epsilon"],
            "update_sha256": fields["update_sha256"],
        })
    head_file = path.with_suffix(".head")
    try:
        head = json.loads(head_file.read_text(encoding="utf-8")) if head_file.is_file() else None
    except (OSError, ValueError) as e:
        raise refuse(f"its head file cannot be read: {e}") from None
    if rows and (not isinstance(head, dict) or head.get("hash") not in (prev, raw[-2][-1] if len(raw) > 1
                                                                        else GENESIS_HASH)):
        raise refuse("its head file is missing or does not match its newest rows")
    return rows, prev
