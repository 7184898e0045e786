"""`fedcollab lineage verify`: check a coordinator's whole chain of model versions.

The source of truth is the `lineage` table of the coordinator's SQLite (written in the
same transaction as each version), read here read-only, next to the `models` table and
the model files. For every version from 0 on: its record is there, its signature
verifies, it names its own version, its parent is the previous record's model, the
models table and the model file on disk have the SHA-256 it signs, and the readable
copy in lineage/ (if any) holds the same bytes.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedcollab.lineage._errors import LineageError
from fedcollab.lineage._files import DB_FILE, coordinator_state_dir, file_sha256, read_record_file, record_path
from fedcollab.lineage._keys import PUBLIC_KEY_FILE, key_fingerprint, load_public_key, raw_public_key
from fedcollab.lineage._record import verify_record


@dataclass(frozen=True)
class ChainReport:
    """The outcome of `verify_chain`. `problem` is the first broken link, `problems`
    every one found (in version order); `warnings` do not break the chain."""

    ok: bool
    state_dir: Path
    versions: list[int]  # the versions checked: 0 to the latest committed one
    first_broken_version: int | None
    problem: str | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    key_fingerprint: str = ""

    @property
    def latest_version(self) -> int | None:
        return self.versions[-1] if self.versions else None


def verify_chain(directory: Path, *, public_key: Path | bytes | Ed25519PublicKey | None = None) -> ChainReport:
    """Check the lineage of the coordinator state in `directory` (a state folder, or a
    simulation run folder with coordinator/ in it). `public_key` pins the key the
    records must verify with (a PEM file, raw bytes or a key); without it, the state's
    own lineage-public-key.pem is used, which proves integrity but not origin."""
    state = coordinator_state_dir(Path(directory))
    warnings: list[str] = []
    stored_key = state / PUBLIC_KEY_FILE
    if public_key is None:
        if not stored_key.is_file():
            raise LineageError(f"{stored_key}: no lineage public key in the state; pass the coordinator's key "
                               "with --public-key", reason="LINEAGE_KEY_MISSING")
        key = raw_public_key(load_public_key(stored_key))
    else:
        key = raw_public_key(load_public_key(public_key) if isinstance(public_key, (str, Path)) else public_key)
        if stored_key.is_file():
            try:
                stored = raw_public_key(load_public_key(stored_key))
            except LineageError as e:
                warnings.append(f"{PUBLIC_KEY_FILE}: {e.message}")
            else:
                if stored != key:
                    warnings.append(f"{PUBLIC_KEY_FILE} in the state is {key_fingerprint(stored)}, "
                                    f"not the pinned {key_fingerprint(key)}")

    records, models = _read_state(state)
    if not records and not models:
        raise LineageError(f"{state}: no model has been committed yet: nothing to verify", reason="LINEAGE_EMPTY")
    latest = max([*records, *models])
    problems: list[tuple[int, str]] = []
    previous_sha: str | None = None  # the model SHA-256 of the previous version, as its record signs it
    missing: list[int] = []

    def flush_missing() -> None:
        if missing:
            span = f"v{missing[0]}" if len(missing) == 1 else f"v{missing[0]}..v{missing[-1]}"
            why = ("committed before lineage was recorded, or rows deleted" if missing[0] == 0
                   else "its row was deleted, or it was committed without one")
            problems.append((missing[0], f"{span}: no lineage record ({why})"))
            missing.clear()

    for v in range(latest + 1):
        model = models.get(v)
        if v not in records:
            missing.append(v)
            previous_sha = model["sha256"] if model else None
            continue
        flush_missing()
        found = _check_version(state, v, records[v], model, key, previous_sha)
        problems.extend((v, p) for p in found.problems)
        warnings.extend(found.warnings)
        previous_sha = found.model_sha256 or (model["sha256"] if model else None)
    flush_missing()

    problems.sort(key=lambda p: p[0])  # stable: within a version, in the order checked
    return ChainReport(
        ok=not problems, state_dir=state, versions=list(range(latest + 1)),
        first_broken_version=problems[0][0] if problems else None, problem=problems[0][1] if problems else None,
        problems=[p for _, p in problems], warnings=warnings, key_fingerprint=key_fingerprint(key),
    )


@dataclass
class _Found:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    model_sha256: str | None = None


def _check_version(state: Path, v: int, row: tuple[bytes, bytes], model: dict[str, Any] | None, key: bytes,
                   previous_sha: str | None) -> _Found:
    out = _Found()
    record_bytes, signature = row
    try:
        record = verify_record(record_bytes=record_bytes, signature=signature, public_key=key)
    except LineageError as e:
        if "does not verify" in e.message:
            out.problems.append(f"v{v}: signature does not verify (record edited, or signed by another key?)")
        else:
            out.problems.append(f"v{v}: {e.message}")
        _check_copy(state, v, row, out)
        return out
    sha = record["model_sha256"]
    out.model_sha256 = sha
    if record["version"] != v:
        out.problems.append(f"v{v}: the record stored as v{v} is signed for v{record['version']}")
    parent = record["parent_sha256"]
    if v == 0 and parent is not None:
        out.problems.append(f"v0: parent {parent[:12]}.. should be null")
    elif v > 0 and previous_sha is not None and parent != previous_sha:
        shown = f"{parent[:12]}.." if parent else "null"
        out.problems.append(f"v{v}: parent {shown} is not v{v - 1}'s model {previous_sha[:12]}..")
    if model is None:
        out.problems.append(f"v{v}: not in the models table")
    elif model["sha256"] != sha:
        out.problems.append(f"v{v}: the models table has SHA-256 {model['sha256'][:16]}.., the record signs "
                            f"{sha[:16]}..")
    path = _model_file(state, v, model)
    if path is None or not path.is_file():
        where = path.relative_to(state) if path is not None else f"models/v{v:06d}-*.safetensors"
        out.problems.append(f"v{v}: model file missing: {where}")
    else:
        actual = file_sha256(path)
        if actual != sha:
            out.problems.append(f"v{v}: model file changed: its SHA-256 is {actual[:16]}.. not {sha[:16]}..")
    _check_copy(state, v, row, out)
    return out


def _check_copy(state: Path, v: int, row: tuple[bytes, bytes], out: _Found) -> None:
    """The readable copy in lineage/, if there, holds the row's bytes."""
    copy = record_path(state, v)
    if not copy.is_file():
        out.warnings.append(f"v{v}: no readable copy {copy.relative_to(state)} (the SQLite row is authoritative)")
        return
    try:
        same = read_record_file(copy) == (bytes(row[0]), bytes(row[1]))
    except LineageError:
        same = False
    if not same:
        out.problems.append(f"v{v}: {copy.relative_to(state)} differs from the signed record in {DB_FILE}")


def _model_file(state: Path, v: int, model: dict[str, Any] | None) -> Path | None:
    """The model file in this state's models/ folder (the stored path may be relative
    to wherever the coordinator ran, or the folder may have moved since)."""
    if model is not None:
        return state / "models" / Path(model["path"]).name
    found = sorted((state / "models").glob(f"v{v:06d}-*.safetensors"))
    return found[0] if found else None


def _read_state(state: Path) -> tuple[dict[int, tuple[bytes, bytes]], dict[int, dict[str, Any]]]:
    """(lineage rows, models rows) by version, read without writing anything."""
    uri = (state / DB_FILE).resolve().as_uri() + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as e:
        raise LineageError(f"{state / DB_FILE}: cannot open: {e}", reason="LINEAGE_NO_STATE") from None
    try:
        db.row_factory = sqlite3.Row
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        records: dict[int, tuple[bytes, bytes]] = {}
        if "lineage" in tables:  # absent in state written before lineage was recorded
            records = {int(r["version"]): (bytes(r["record"]), bytes(r["signature"]))
                       for r in db.execute("SELECT version, record, signature FROM lineage")}
        models = {int(r["version"]): dict(r) for r in db.execute("SELECT version, sha256, path FROM models")}
    except sqlite3.Error as e:
        raise LineageError(f"{state / DB_FILE}: cannot read: {e}", reason="LINEAGE_NO_STATE") from None
    finally:
        db.close()
    return records, models
