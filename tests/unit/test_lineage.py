"""Signed lineage: records, signatures, keys, and the chain check of a state folder."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcollab.coordinator import ModelVersion, Store
from fedcollab.errors import FedcollabError
from fedcollab.lineage import (
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    LineageError,
    build_record,
    canonical_bytes,
    check_model,
    key_fingerprint,
    load_or_create_signing_key,
    load_public_key,
    parse_record,
    raw_public_key,
    read_record_file,
    record_path,
    sign_record,
    verify_chain,
    verify_record,
    write_record_file,
)

SHA_A, SHA_B, SHA_U = "a" * 64, "b" * 64, "c" * 64


def record(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        version=1, round=1, study="s", federation="f", parent_sha256=SHA_A, model_sha256=SHA_B,
        contributions=[{"institution": "lab-b", "update_sha256": SHA_U, "num_examples": 7},
                       {"institution": "lab-a", "update_sha256": SHA_U, "num_examples": 3,
                        "privacy": {"epsilon": 0.5, "delta": 1e-5}}],
        aggregator={"name": "fedavg", "weighting": "num_examples"}, central_dp=None, code_version="0.1.0",
        created_at="2025-01-02T03:04:05.000000Z",
    )
    values.update(overrides)
    return build_record(**values)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_or_create_signing_key(tmp_path_factory.mktemp("key"))


# --------------------------------------------------------------------- records
def test_sign_and_verify_round_trip(key: Any) -> None:
    rec = record()
    data = canonical_bytes(rec)
    signature = sign_record(data, key)
    assert len(signature) == 64
    assert verify_record(record_bytes=data, signature=signature, public_key=raw_public_key(key)) == rec
    assert verify_record(record_bytes=data, signature=signature, public_key=key.public_key()) == rec
    assert [c["institution"] for c in rec["contributions"]] == ["lab-a", "lab-b"], "sorted by institution"
    assert rec["contributions"][1]["privacy"] is None


@pytest.mark.parametrize("where", ["record", "signature"])
@pytest.mark.parametrize("position", [0, 17, -1])
def test_a_flipped_byte_fails(key: Any, where: str, position: int) -> None:
    data = canonical_bytes(record())
    signature = sign_record(data, key)
    target = bytearray(data if where == "record" else signature)
    target[position] ^= 0x01
    if where == "record":
        data = bytes(target)
    else:
        signature = bytes(target)
    with pytest.raises(LineageError, match="does not verify") as e:
        verify_record(record_bytes=data, signature=signature, public_key=raw_public_key(key))
    assert isinstance(e.value, FedcollabError) and e.value.reason == "LINEAGE_INVALID"


def test_another_key_fails(key: Any, tmp_path: Path) -> None:
    data = canonical_bytes(record())
    other = load_or_create_signing_key(tmp_path)
    with pytest.raises(LineageError, match="does not verify"):
        verify_record(record_bytes=data, signature=sign_record(data, other), public_key=raw_public_key(key))


@pytest.mark.parametrize("record_bytes, signature, reason", [
    (b"", b"", "LINEAGE_MISSING"),
    (b"{}", b"", "LINEAGE_MISSING"),
    (b"{}", b"x" * 63, "LINEAGE_INVALID"),
], ids=["nothing", "no-signature", "short-signature"])
def test_missing_or_short_parts_are_refused(key: Any, record_bytes: bytes, signature: bytes, reason: str) -> None:
    with pytest.raises(LineageError) as e:
        verify_record(record_bytes=record_bytes, signature=signature, public_key=raw_public_key(key))
    assert e.value.reason == reason


def test_canonical_bytes_are_stable() -> None:
    rec = record()
    shuffled = dict(reversed(list(rec.items())))
    assert canonical_bytes(shuffled) == canonical_bytes(rec)
    assert canonical_bytes(json.loads(canonical_bytes(rec))) == canonical_bytes(rec)
    # Golden value: any change to the encoding breaks every signature already made.
    assert canonical_bytes(rec) == GOLDEN.replace(b"A", b"a" * 64).replace(b"B", b"b" * 64).replace(b"U", b"c" * 64)


GOLDEN = (
    b'{"aggregator":{"name":"fedavg","weighting":"num_examples"},"central_dp":null,"code_version":"0.1.0",'
    b'"contributions":[{"institution":"lab-a","num_examples":3,"privacy":{"delta":1e-05,"epsilon":0.5},'
    b'"update_sha256":"U"},{"institution":"lab-b","num_examples":7,"privacy":null,"update_sha256":"U"}],'
    b'"created_at":"2025-01-02T03:04:05.000000Z","federation":"f","model_sha256":"B","parent_sha256":"A",'
    b'"round":1,"schema":"fedcollab.lineage/1","study":"s","version":1}'
)


def test_non_finite_and_numpy_numbers_are_canonical() -> None:
    rec = record(aggregator={"name": "dp-fedavg", "clip_norm": np.float32(0.5), "noise_multiplier": 0},
                 central_dp={"epsilon": float("inf"), "delta": np.float64(1e-5), "other": float("nan"),
                             "low": float("-inf"), "steps": np.int64(3)})
    data = canonical_bytes(rec)
    assert b'"epsilon":"inf"' in data and b'"other":"nan"' in data and b'"low":"-inf"' in data
    assert b'"clip_norm":0.5' in data and b'"steps":3' in data
    assert parse_record(data)["central_dp"]["epsilon"] == "inf"


def test_non_canonical_bytes_are_refused_even_when_signed(key: Any) -> None:
    data = json.dumps(record(), indent=1).encode()
    with pytest.raises(LineageError, match="canonical"):
        verify_record(record_bytes=data, signature=sign_record(data, key), public_key=raw_public_key(key))


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("model_sha256"), "model_sha256 is missing"),
    (lambda r: r.update(version="1"), "version is str"),
    (lambda r: r.update(version=True), "version is bool"),
    (lambda r: r.update(schema="other/9"), "schema 'other/9'"),
    (lambda r: r.update(extra=1), "unknown keys"),
    (lambda r: r.update(model_sha256="xyz"), "not a SHA-256"),
    (lambda r: r["contributions"][0].pop("privacy"), "exactly the keys"),
], ids=["missing-key", "string-version", "bool-version", "schema", "unknown-key", "bad-sha", "contribution"])
def test_malformed_records_are_refused_with_the_reason(key: Any, edit: Any, message: str) -> None:
    rec = record()
    edit(rec)
    data = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(LineageError, match=message):
        verify_record(record_bytes=data, signature=sign_record(data, key), public_key=raw_public_key(key))


@pytest.mark.parametrize("overrides, message", [
    ({"version": 0}, "null for v0 and only for v0"),
    ({"parent_sha256": None}, "null for v0 and only for v0"),
    ({"model_sha256": "ABC"}, "64 lowercase hex"),
    ({"aggregator": {}}, "aggregator needs a name"),
    ({"contributions": [{"institution": "a", "update_sha256": SHA_U, "num_examples": 1, "weight": 2}]}, "unknown"),
    ({"contributions": [{"institution": "a", "update_sha256": SHA_U, "num_examples": 1}] * 2}, "at most once"),
    ({"central_dp": {"x": object()}}, "JSON values only"),
], ids=["v0-with-parent", "no-parent", "bad-sha", "no-aggregator", "unknown-key", "twice", "not-json"])
def test_build_record_rejects_bad_values(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        record(**overrides)


def test_check_model_wants_the_version_and_sha_handed_out(key: Any) -> None:
    data = canonical_bytes(record())
    signature = sign_record(data, key)
    pk = raw_public_key(key)
    assert check_model(record_bytes=data, signature=signature, public_key=pk, version=1, sha256=SHA_B)["version"] == 1
    with pytest.raises(LineageError, match="v1's, the model is handed out as v2"):
        check_model(record_bytes=data, signature=signature, public_key=pk, version=2, sha256=SHA_B)
    with pytest.raises(LineageError, match="signs model bbbb"):
        check_model(record_bytes=data, signature=signature, public_key=pk, version=1, sha256=SHA_A)


# --------------------------------------------------------------------- keys
def test_signing_key_is_created_once_private_and_published(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path)
    path = tmp_path / SIGNING_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = load_or_create_signing_key(tmp_path)
    assert raw_public_key(again) == raw_public_key(key)
    assert raw_public_key(load_public_key(tmp_path / PUBLIC_KEY_FILE)) == raw_public_key(key)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / PUBLIC_KEY_FILE).unlink()
    load_or_create_signing_key(tmp_path)
    assert (tmp_path / PUBLIC_KEY_FILE).is_file(), "the public key is written again when missing"
    fp = key_fingerprint(key)
    assert fp.startswith("ed25519:") and len(fp) == len("ed25519:") + 16 and fp == key_fingerprint(key.public_key())


def test_a_key_file_of_another_kind_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / SIGNING_KEY_FILE).write_bytes(pem)
    with pytest.raises(LineageError, match="must be Ed25519"):
        load_or_create_signing_key(tmp_path)
    (tmp_path / "garbage.pem").write_text("not a key")
    with pytest.raises(LineageError, match="cannot load"):
        load_public_key(tmp_path / "garbage.pem")


# --------------------------------------------------------------------- the chain
def _model_file(state: Path, version: int, content: bytes) -> ModelVersion:
    sha = hashlib.sha256(content).hexdigest()
    path = state / "models" / f"v{version:06d}-{sha[:16]}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return ModelVersion(version=version, sha256=sha, path=path, size_bytes=len(content))


def build_chain(state: Path, *, versions: int = 4) -> list[ModelVersion]:
    """A state folder as a coordinator leaves it: models, SQLite rows, records and their copies."""
    key = load_or_create_signing_key(state)
    store = Store(state / "coordinator.sqlite")
    models: list[ModelVersion] = []
    for v in range(versions):
        model = _model_file(state, v, f"model {v}".encode())
        rec = record(version=v, round=v, parent_sha256=models[-1].sha256 if models else None,
                     model_sha256=model.sha256, contributions=[] if v == 0 else record()["contributions"])
        data = canonical_bytes(rec)
        signed = (data, sign_record(data, key))
        if v == 0:
            store.add_initial_model(model, lineage=signed)
        else:
            store.open_round(round_number=v, attempt=1, base_version=v - 1, participants=[])
            store.commit_round(round_number=v, attempt=1, model=model, parent=v - 1, metrics={}, lineage=signed)
        write_record_file(state, version=v, record_bytes=data, signature=signed[1])
        models.append(model)
    store.close()
    return models


def _sql(state: Path, sql: str, args: tuple = ()) -> None:
    db = sqlite3.connect(state / "coordinator.sqlite")
    with db:
        db.execute(sql, args)
    db.close()


def _resign(state: Path, at: int, **changes: Any) -> None:
    """Replace a record by a validly signed one with `changes`: a coordinator that lies."""
    key = load_or_create_signing_key(state)
    db = sqlite3.connect(state / "coordinator.sqlite")
    rec = json.loads(db.execute("SELECT record FROM lineage WHERE version=?", (at,)).fetchone()[0])
    db.close()
    rec.update(changes)
    data = canonical_bytes(rec)
    signature = sign_record(data, key)
    _sql(state, "UPDATE lineage SET record=?, signature=? WHERE version=?", (data, signature, at))
    write_record_file(state, version=at, record_bytes=data, signature=signature)


def test_an_intact_chain_verifies(tmp_path: Path) -> None:
    state = tmp_path / "coordinator"
    build_chain(state)
    report = verify_chain(state)
    assert report.ok, report.problems
    assert report.versions == [0, 1, 2, 3] and report.latest_version == 3
    assert report.first_broken_version is None and report.problem is None and report.warnings == []
    assert report.key_fingerprint == key_fingerprint(load_public_key(state / PUBLIC_KEY_FILE))
    # a simulation run folder holds the state in coordinator/
    assert verify_chain(tmp_path).ok
    assert verify_chain(tmp_path, public_key=state / PUBLIC_KEY_FILE).ok


def _break_record(state: Path, models: list[ModelVersion]) -> None:
    db = sqlite3.connect(state / "coordinator.sqlite")
    data = db.execute("SELECT record FROM lineage WHERE version=2").fetchone()[0]
    db.close()
    edited = data.replace(b'"num_examples":7', b'"num_examples":9')
    _sql(state, "UPDATE lineage SET record=? WHERE version=2", (edited,))


def _break_parent(state: Path, models: list[ModelVersion]) -> None:
    _resign(state, 3, parent_sha256=models[1].sha256)


def _change_model(state: Path, models: list[ModelVersion]) -> None:
    models[1].path.write_bytes(b"model 1, retrained")


def _remove_model(state: Path, models: list[ModelVersion]) -> None:
    models[2].path.unlink()


def _delete_row(state: Path, models: list[ModelVersion]) -> None:
    _sql(state, "DELETE FROM lineage WHERE version=2")


def _swap_rows(state: Path, models: list[ModelVersion]) -> None:
    _resign(state, 3, version=2)


def _edit_copy(state: Path, models: list[ModelVersion]) -> None:
    path = record_path(state, 1)
    document = json.loads(path.read_text())
    document["signature_b64"] = base64.b64encode(b"\0" * 64).decode()
    path.write_text(json.dumps(document))


def _models_table(state: Path, models: list[ModelVersion]) -> None:
    _sql(state, "UPDATE models SET sha256=? WHERE version=1", ("f" * 64,))


CASES = [
    (_break_record, 2, "v2: signature does not verify (record edited"),
    (_break_parent, 3, "v3: parent {m1} is not v2's model {m2}"),
    (_change_model, 1, "v1: model file changed: its SHA-256 is {new} not {m1}"),
    (_remove_model, 2, "v2: model file missing: models/v000002-"),
    (_delete_row, 2, "v2: no lineage record"),
    (_swap_rows, 3, "v3: the record stored as v3 is signed for v2"),
    (_edit_copy, 1, "v1: lineage/v000001.json differs from the signed record in coordinator.sqlite"),
    (_models_table, 1, "v1: the models table has SHA-256 ffffffffffffffff.., the record signs {m1}"),
]


@pytest.mark.parametrize("tamper, version, problem", CASES,
                         ids=["edited-record", "parent-link", "changed-model", "missing-model", "gap",
                              "wrong-version", "edited-copy", "models-table"])
def test_a_broken_link_is_named(tmp_path: Path, tamper: Any, version: int, problem: str) -> None:
    models = build_chain(tmp_path)
    tamper(tmp_path, models)
    report = verify_chain(tmp_path)
    assert not report.ok
    assert report.first_broken_version == version, report.problems
    new = hashlib.sha256(b"model 1, retrained").hexdigest()[:16] + ".."
    expected = problem.format(m1=models[1].sha256[:12] + "..", m2=models[2].sha256[:12] + "..", new=new)
    if "models table" in problem or "model file changed" in problem:
        expected = problem.format(m1=models[1].sha256[:16] + "..", new=new)
    assert report.problem is not None and report.problem.startswith(expected), report.problem


def test_a_missing_readable_copy_is_a_warning_only(tmp_path: Path) -> None:
    build_chain(tmp_path)
    record_path(tmp_path, 2).unlink()
    report = verify_chain(tmp_path)
    assert report.ok
    assert report.warnings == ["v2: no readable copy lineage/v000002.json (the SQLite row is authoritative)"]


def test_a_pinned_key_other_than_the_signer_breaks_v0(tmp_path: Path) -> None:
    build_chain(tmp_path / "state")
    load_or_create_signing_key(tmp_path / "other")
    report = verify_chain(tmp_path / "state", public_key=tmp_path / "other" / PUBLIC_KEY_FILE)
    assert not report.ok and report.first_broken_version == 0
    assert report.problem is not None and report.problem.startswith("v0: signature does not verify")
    assert len(report.problems) == 4, "every record is reported"
    assert any("not the pinned" in w for w in report.warnings)


def test_state_from_before_lineage_reports_the_gap(tmp_path: Path) -> None:
    build_chain(tmp_path)
    _sql(tmp_path, "DELETE FROM lineage WHERE version < 3")
    report = verify_chain(tmp_path)
    assert not report.ok and report.first_broken_version == 0
    assert report.problem == "v0..v2: no lineage record (committed before lineage was recorded, or rows deleted)"
    assert report.problems == [report.problem], "v3 links to v2's model as the models table has it"


def test_no_state_and_no_models_are_errors(tmp_path: Path) -> None:
    with pytest.raises(LineageError, match="no coordinator state here"):
        verify_chain(tmp_path)
    load_or_create_signing_key(tmp_path)
    Store(tmp_path / "coordinator.sqlite").close()
    with pytest.raises(LineageError, match="no model has been committed yet"):
        verify_chain(tmp_path)


def test_verify_chain_writes_nothing(tmp_path: Path) -> None:
    """Read-only: SQLite may add its -wal/-shm companions to read a WAL database, nothing else changes."""
    build_chain(tmp_path)

    def files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(("-wal", "-shm"))}

    before = files()
    verify_chain(tmp_path)
    assert files() == before


# --------------------------------------------------------------------- the store
def test_a_version_is_never_committed_without_its_record(tmp_path: Path, key: Any) -> None:
    """The record goes in the commit's transaction: if it cannot be stored, neither is the model."""
    models = build_chain(tmp_path, versions=2)
    store = Store(tmp_path / "coordinator.sqlite")
    model = _model_file(tmp_path, 2, b"model 2")
    data = canonical_bytes(record(version=2, parent_sha256=models[1].sha256, model_sha256=model.sha256))
    store.add_lineage(version=2, record=data, signature=sign_record(data, key))  # the row is taken already
    store.open_round(round_number=2, attempt=1, base_version=1, participants=[])
    with pytest.raises(sqlite3.IntegrityError):
        store.commit_round(round_number=2, attempt=1, model=model, parent=1, metrics={},
                           lineage=(data, sign_record(data, key)))
    assert [m.version for m in store.models()] == [0, 1]
    assert [r["status"] for r in store.rounds()] == ["committed", "open"]
    assert [v for v, _, _ in store.lineage()] == [0, 1, 2]
    assert [v for v, _, _ in store.lineage(1)] == [1, 2]
    assert store.lineage_of(7) is None
    assert read_record_file(record_path(tmp_path, 1)) == store.lineage_of(1)
    store.close()
