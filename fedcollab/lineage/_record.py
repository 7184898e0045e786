"""Lineage records: what one committed model version is made of, as canonical JSON
signed with the coordinator's Ed25519 key.

A record names the version, its parent's and its own SHA-256, every contribution
(institution, the SHA-256 of its update, its example count and reported DP spend),
the aggregator and its settings, the central DP release if any, and the code version.
The signed bytes are `canonical_bytes(record)`: sorted keys, no whitespace, no NaN or
infinity (non-finite floats are written as the strings "inf", "-inf", "nan").
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcollab.lineage._errors import LineageError
from fedcollab.lineage._keys import public_key_of

SCHEMA = "fedcollab.lineage/1"
SIGNATURE_BYTES = 64
_SHA = re.compile(r"[0-9a-f]{64}")  # fullmatch: `match` with `$` lets "<sha>\n" through
_CONTRIBUTION_KEYS = {"institution", "update_sha256", "num_examples", "privacy"}
# key -> accepted types; None means null is allowed.
_FIELDS: dict[str, tuple[Any, ...]] = {
    "schema": (str,), "version": (int,), "round": (int,), "federation": (str,), "study": (str,),
    "parent_sha256": (str, None), "model_sha256": (str,), "contributions": (list,), "aggregator": (dict,),
    "central_dp": (dict, None), "code_version": (str,), "created_at": (str,),
}
_OPTIONAL_FIELDS: dict[str, tuple[Any, ...]] = {"signed_at_restart": (bool,)}


def build_record(
    *,
    version: int,
    round: int,  # noqa: A002 - the record's field is called round
    study: str,
    federation: str,
    parent_sha256: str | None,
    model_sha256: str,
    contributions: Sequence[Mapping[str, Any]],
    aggregator: Mapping[str, Any],
    central_dp: Mapping[str, Any] | None,
    code_version: str,
    created_at: datetime | str | None = None,
    signed_at_restart: bool = False,
) -> dict[str, Any]:
    """The record of one model version, ready for `canonical_bytes`.

    `contributions` are dicts with institution, update_sha256 (hex), num_examples and
    optionally privacy (the institution's reported spend); they are sorted by
    institution. `aggregator` has at least a name ("initial", "fedavg", "dp-fedavg").
    `signed_at_restart` marks a record signed after its version was committed (state
    written before lineage was recorded): it attests less than one signed at commit.
    """
    if version < 0:
        raise ValueError(f"version must be >= 0, got {version}")
    if (version == 0) != (parent_sha256 is None):
        raise ValueError(f"v{version}: parent_sha256 is null for v0 and only for v0 (got {parent_sha256!r})")
    for name, sha in (("model_sha256", model_sha256), ("parent_sha256", parent_sha256)):
        if sha is not None and not _SHA.fullmatch(sha):
            raise ValueError(f"{name} must be 64 lowercase hex digits, got {sha!r}")
    if not isinstance(aggregator.get("name"), str) or not aggregator["name"]:
        raise ValueError(f"aggregator needs a name, e.g. {{'name': 'fedavg'}}; got {dict(aggregator)!r}")
    entries = []
    for c in contributions:
        unknown = set(c) - _CONTRIBUTION_KEYS
        if unknown:
            raise ValueError(f"contribution keys are {sorted(_CONTRIBUTION_KEYS)}; unknown: {sorted(unknown)}")
        if not _SHA.fullmatch(str(c.get("update_sha256", ""))):
            raise ValueError(f"{c.get('institution')!r}: update_sha256 must be 64 lowercase hex digits")
        if int(c.get("num_examples", -1)) < 0:
            raise ValueError(f"{c.get('institution')!r}: num_examples must be >= 0")
        entries.append({"institution": str(c["institution"]), "update_sha256": str(c["update_sha256"]),
                        "num_examples": int(c["num_examples"]),
                        "privacy": dict(c["privacy"]) if c.get("privacy") else None})
    entries.sort(key=lambda e: str(e["institution"]))
    if len({e["institution"] for e in entries}) != len(entries):
        raise ValueError("an institution contributes at most once to a version")
    if created_at is None:
        created_at = datetime.now(UTC)
    if isinstance(created_at, datetime):
        created_at = created_at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    record: dict[str, Any] = {
        "schema": SCHEMA, "version": int(version), "round": int(round), "federation": federation, "study": study,
        "parent_sha256": parent_sha256, "model_sha256": model_sha256, "contributions": entries,
        "aggregator": dict(aggregator), "central_dp": dict(central_dp) if central_dp is not None else None,
        "code_version": code_version, "created_at": created_at,
    }
    if signed_at_restart:
        record["signed_at_restart"] = True
    return _plain(record)


def _plain(value: Any) -> Any:
    """JSON-safe and canonical: numpy scalars become Python numbers, non-finite floats
    become "inf" / "-inf" / "nan", tuples become lists."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        if math.isfinite(f):
            return f
        return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"lineage record keys are strings, got {k!r}")
            out[k] = _plain(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise ValueError(f"a lineage record holds JSON values only, not {type(value).__name__}: {value!r}")


def canonical_bytes(record: Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, ASCII, finite numbers."""
    return json.dumps(_plain(record), sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def sign_record(record_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The 64-byte Ed25519 signature of `record_bytes`."""
    return key.sign(bytes(record_bytes))


def verify_record(*, record_bytes: bytes, signature: bytes, public_key: bytes | Ed25519PublicKey) -> dict[str, Any]:
    """The record, once its signature verifies and it is well formed; LineageError
    (reason LINEAGE_MISSING or LINEAGE_INVALID) saying what is wrong otherwise."""
    if not record_bytes:
        raise LineageError("no lineage record: the model comes without one", reason="LINEAGE_MISSING")
    if len(signature) != SIGNATURE_BYTES:
        raise LineageError(f"the lineage signature is {len(signature)} bytes; an Ed25519 signature is "
                           f"{SIGNATURE_BYTES}", reason="LINEAGE_MISSING" if not signature else "LINEAGE_INVALID")
    try:
        key = public_key_of(public_key)
    except ValueError as e:
        raise LineageError(f"unusable lineage public key: {e}", reason="LINEAGE_KEY_INVALID") from None
    try:
        key.verify(bytes(signature), bytes(record_bytes))
    except InvalidSignature:
        raise LineageError("the lineage signature does not verify with the coordinator's key "
                           "(record edited, or signed by another key)") from None
    return parse_record(record_bytes)


def parse_record(record_bytes: bytes) -> dict[str, Any]:
    """The record in `record_bytes`, checked for form only (not for its signature)."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid in a lineage record")

    try:
        record = json.loads(bytes(record_bytes).decode("ascii"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError) as e:
        raise LineageError(f"malformed lineage record: not canonical JSON ({e})") from None
    if not isinstance(record, dict):
        raise LineageError("malformed lineage record: not a JSON object")
    if record.get("schema") != SCHEMA:
        raise LineageError(f"malformed lineage record: schema {record.get('schema')!r}, expected {SCHEMA!r}")
    problems = []
    for key, types in {**_FIELDS, **_OPTIONAL_FIELDS}.items():
        if key not in record:
            if key in _FIELDS:
                problems.append(f"{key} is missing")
            continue
        value = record[key]
        if not any(value is None if t is None else (isinstance(value, t) and not (t is int and isinstance(value, bool)))
                   for t in types):
            problems.append(f"{key} is {type(value).__name__}")
    unknown = set(record) - set(_FIELDS) - set(_OPTIONAL_FIELDS)
    if unknown:
        problems.append(f"unknown keys {sorted(unknown)}")
    if not problems:
        if record["version"] < 0:
            problems.append(f"version is {record['version']}")
        for key in ("model_sha256", "parent_sha256"):
            if record[key] is not None and not _SHA.fullmatch(record[key]):
                problems.append(f"{key} is not a SHA-256")
        for c in record["contributions"]:
            if not isinstance(c, dict) or set(c) != _CONTRIBUTION_KEYS:
                problems.append(f"contribution {c!r} does not have exactly the keys {sorted(_CONTRIBUTION_KEYS)}")
                break
    if problems:
        raise LineageError("malformed lineage record: " + "; ".join(problems))
    if canonical_bytes(record) != bytes(record_bytes):
        raise LineageError("malformed lineage record: not in canonical form")
    return record


def check_model(
    *, record_bytes: bytes, signature: bytes, public_key: bytes | Ed25519PublicKey, version: int, sha256: str
) -> dict[str, Any]:
    """What an institution runs before using a model it was handed as (version,
    sha256): the record verifies and names exactly that version and SHA-256."""
    record = verify_record(record_bytes=record_bytes, signature=signature, public_key=public_key)
    if record["version"] != version:
        raise LineageError(f"the lineage record is v{record['version']}'s, the model is handed out as v{version}")
    if record["model_sha256"] != sha256:
        raise LineageError(f"v{version}: the lineage record signs model {record['model_sha256'][:16]}.., "
                           f"the model handed out is {sha256[:16]}..")
    return record
