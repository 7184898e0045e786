"""Model cards: what a pulled model version is, where it came from, and how to check it.

A card is a JSON file next to the model (`study-v3.safetensors` ->
`study-v3.card.json`). It holds the version and SHA-256 of the safetensors file, the
model's kind and params (enough to rebuild it), the round's metrics and reported
privacy, and the version's signed lineage record. Only the lineage record is signed:
`verify_model_file` checks the file against the card and the record against its
signature, so a card can be trusted for the version and SHA-256 it names, not for the
unsigned fields (metrics, contributors, privacy, model params) beyond what loading the
file with strict names and shapes catches.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedcollab._fileio import atomic_write, file_sha256
from fedcollab.errors import FedcollabError
from fedcollab.lineage import LineageError, key_fingerprint, raw_public_key, verify_record

CARD_FORMAT = "fedcollab.model-card/1"
CARD_SUFFIX = ".card.json"
_SHA = re.compile(r"[0-9a-f]{64}")
_LINEAGE_KEYS = ("public_key", "record", "signature")
_PRIVACY_NUMBERS = ("epsilon", "delta", "budget_epsilon")
_SIGNATURE_BYTES = 64
_PUBLIC_KEY_BYTES = 32


class CardError(FedcollabError):
    """A model card is malformed, missing, or does not match its model file.

    `reason` is UPPER_SNAKE and stable: CARD_INVALID (a field is wrong; the message
    names it), CARD_MISSING (no card file), MODEL_MISMATCH (the file's size or SHA-256
    is not the card's), LINEAGE_MISMATCH (the signed record names another version,
    file, study or federation), or a LineageError's reason (LINEAGE_INVALID,
    LINEAGE_KEY_INVALID, ...) when the signature does not verify."""

    def __init__(self, message: str, *, reason: str = "CARD_INVALID") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """One pulled model version. Construction validates every field (CardError naming
    each one at fault); `to_json` and `from_json` round-trip exactly."""

    federation: str
    study: str
    version: int  # the committed model version
    sha256: str  # 64 lowercase hex digits: SHA-256 of the safetensors file
    size_bytes: int  # of the safetensors file
    model: dict[str, Any]  # {"kind": str, "params": dict}: ModelConfig's fields, for build_model_to_load
    rounds: int  # rounds committed up to this version
    contributors: list[str]  # institutions whose updates made this version
    metrics: dict[str, float] = field(default_factory=dict)  # of the round that produced it; finite only
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # institution -> epsilon, delta, budget_epsilon
    central_dp: dict[str, Any] | None = None  # the central DP release of the lineage record, if any
    lineage: dict[str, str]  # base64 "record", "signature" (Ed25519) and "public_key" (32 raw bytes)
    published_at: str  # ISO 8601 UTC: when the coordinator committed it
    pulled_at: str  # ISO 8601 UTC: when this copy was pulled
    format: str = CARD_FORMAT

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        problems = _problems(values)
        if problems:
            raise CardError("invalid model card: " + "; ".join(problems))
        # Own copies, normalised: a frozen card does not change behind its back.
        object.__setattr__(self, "model", {"kind": self.model["kind"], "params": copy.deepcopy(self.model["params"])})
        object.__setattr__(self, "contributors", list(self.contributors))
        object.__setattr__(self, "metrics", {k: float(v) for k, v in self.metrics.items()})
        object.__setattr__(self, "privacy", copy.deepcopy(self.privacy))
        object.__setattr__(self, "central_dp", copy.deepcopy(self.central_dp))
        object.__setattr__(self, "lineage", {k: self.lineage[k] for k in _LINEAGE_KEYS})

    @property
    def kind(self) -> str:
        return str(self.model["kind"])

    @property
    def params(self) -> dict[str, Any]:
        return copy.deepcopy(self.model["params"])

    def lineage_bytes(self) -> tuple[bytes, bytes, bytes]:
        """(record bytes, signature, raw public key), decoded."""
        return tuple(base64.b64decode(self.lineage[k], validate=True)  # type: ignore[return-value]
                     for k in ("record", "signature", "public_key"))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str) -> ModelCard:
        """The card in `text`; CardError naming `source` and every field at fault."""

        def no_constants(name: str) -> Any:
            raise ValueError(f"{name} is not valid JSON")

        try:
            data = json.loads(text, parse_constant=no_constants)
        except (UnicodeDecodeError, ValueError) as e:
            raise CardError(f"{source}: not a model card: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise CardError(f"{source}: not a model card: a JSON {type(data).__name__}, expected an object")
        if data.get("format") != CARD_FORMAT:
            hint = " (written by a newer fedcollab? upgrade this one)" if str(data.get("format", "")).startswith(
                "fedcollab.model-card/") else ""
            raise CardError(f"{source}: format is {data.get('format')!r}, expected {CARD_FORMAT!r}{hint}")
        names = {f.name for f in dataclasses.fields(cls)}
        problems = [f"{name} is missing" for name in sorted(names - set(data))]
        unknown = sorted(set(data) - names)
        if unknown:
            problems.append(f"unknown field(s) {unknown}")
        problems += _problems({k: v for k, v in data.items() if k in names})
        if problems:
            raise CardError(f"{source}: invalid model card: " + "; ".join(problems)
                            + ". Pull the model again to get a fresh card (`fedcollab model pull`)")
        return cls(**data)


def lineage_field(*, record: bytes, signature: bytes, public_key: bytes | Ed25519PublicKey) -> dict[str, str]:
    """ModelCard.lineage from the signed record's bytes, its signature and the key."""
    return {"record": base64.b64encode(bytes(record)).decode("ascii"),
            "signature": base64.b64encode(bytes(signature)).decode("ascii"),
            "public_key": base64.b64encode(raw_public_key(public_key)).decode("ascii")}


def card_path_for(model_file: Path) -> Path:
    """`<dir>/study-v3.safetensors` -> `<dir>/study-v3.card.json`."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.stem + CARD_SUFFIX)


def write_card(card: ModelCard, path: Path) -> None:
    """Atomically: a reader sees the old card or the new one, never half of one."""
    atomic_write(Path(path), (card.to_json() + "\n").encode("utf-8"))


def read_card(path: Path) -> ModelCard:
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise CardError(f"{path}: no model card there; `fedcollab model pull` writes it next to the model "
                        f"(<model>{CARD_SUFFIX})", reason="CARD_MISSING") from None
    except OSError as e:
        raise CardError(f"{path}: cannot read the model card ({e.strerror})", reason="CARD_MISSING") from None
    return ModelCard.from_json(text, source=str(path))


def verify_model_file(*, model_file: Path, card: ModelCard,
                      public_key: bytes | Ed25519PublicKey | None = None) -> None:
    """The file is the card's model and the card's lineage record is signed for it.

    Checks the file's size and SHA-256 against the card, then the record's Ed25519
    signature (with `public_key`, the coordinator's key the partner pinned, when given;
    else with the card's own key, which proves integrity but not origin), and that the
    record names this version, SHA-256, study and federation. CardError otherwise."""
    model_file = Path(model_file)
    try:
        size = model_file.stat().st_size
    except OSError as e:
        raise CardError(f"{model_file}: cannot read the model file ({e.strerror})", reason="MODEL_MISMATCH") from None
    if size != card.size_bytes:
        raise CardError(f"{model_file} is {size} bytes, its card says {card.size_bytes} (v{card.version} of "
                        f"{card.study}): the file was changed, truncated or belongs to another card; pull the "
                        "model again (`fedcollab model pull`)", reason="MODEL_MISMATCH")
    _check(what=str(model_file), sha256=file_sha256(model_file), size_bytes=size, card=card, public_key=public_key)


def verify_model_bytes(*, data: bytes, card: ModelCard, public_key: bytes | Ed25519PublicKey | None = None,
                       source: str = "the model") -> None:
    """verify_model_file for a file already read: check the very bytes that get loaded."""
    _check(what=source, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), card=card,
           public_key=public_key)


def _check(*, what: str, sha256: str, size_bytes: int, card: ModelCard,
           public_key: bytes | Ed25519PublicKey | None) -> None:
    again = "pull the model again (`fedcollab model pull`)"
    if size_bytes != card.size_bytes or sha256 != card.sha256:
        raise CardError(f"{what} has SHA-256 {sha256[:16]}.. ({size_bytes} bytes), its card says "
                        f"{card.sha256[:16]}.. ({card.size_bytes} bytes) for v{card.version} of {card.study}: the "
                        f"file was changed or belongs to another card; {again}", reason="MODEL_MISMATCH")
    record, signature, card_key = card.lineage_bytes()
    try:
        key = card_key if public_key is None else raw_public_key(public_key)
    except LineageError as e:
        raise CardError(f"the pinned lineage public key is unusable: {e.message}", reason=e.reason) from None
    try:
        signed = verify_record(record_bytes=record, signature=signature, public_key=key)
    except LineageError as e:
        mismatch = "" if key == card_key else (
            f" The card carries key {key_fingerprint(card_key)}, not the pinned {key_fingerprint(key)}: the "
            "model was signed by another coordinator, or the pinned key is not this federation's.")
        raise CardError(f"{what}: its lineage record does not verify: {e.message}.{mismatch} Do not use this "
                        f"model; {again}, and ask the coordinator's operator if it persists",
                        reason=e.reason) from None
    expected = {"version": card.version, "model_sha256": card.sha256, "study": card.study,
                "federation": card.federation}
    wrong = [f"{name} {signed[name]!r} (the card says {value!r})" for name, value in expected.items()
             if signed[name] != value]
    if wrong:
        raise CardError(f"{what}: its signed lineage record is another model's: it names {', '.join(wrong)}; the "
                        f"card was edited or mixed up with another version's. Do not use this model; {again}",
                        reason="LINEAGE_MISMATCH")


# ------------------------------------------------------------------ validation
def _problems(values: Mapping[str, Any]) -> list[str]:
    """Every problem with the fields present in `values`, each naming its field."""
    problems: list[str] = []
    for name, check in _CHECKS.items():
        if name in values:
            problem = check(values[name])
            if problem:
                problems.append(f"{name} {problem}")
    return problems


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else f"must be a non-empty string, got {v!r}"


def _count(minimum: int) -> Any:
    def check(v: Any) -> str | None:
        return None if _is_int(v) and v >= minimum else f"must be an integer >= {minimum}, got {v!r}"
    return check


def _format(v: Any) -> str | None:
    return None if v == CARD_FORMAT else f"must be {CARD_FORMAT!r}, got {v!r}"


def _sha(v: Any) -> str | None:
    return None if isinstance(v, str) and _SHA.fullmatch(v) else f"must be 64 lowercase hex digits, got {v!r}"


def _json_value(v: Any) -> bool:
    if v is None or isinstance(v, (bool, str, int)):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(_json_value(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _json_value(x) for k, x in v.items())
    return False


def _model(v: Any) -> str | None:
    if not isinstance(v, dict) or set(v) != {"kind", "params"}:
        got = sorted(v) if isinstance(v, dict) else type(v).__name__
        return f"must be an object with exactly kind and params (as in the study's [study.model]), got {got}"
    if not isinstance(v["kind"], str) or not v["kind"]:
        return f"kind must be a model kind such as 'mlp', got {v['kind']!r}"
    if not isinstance(v["params"], dict) or not _json_value(v["params"]):
        return f"params must be an object of JSON values (finite numbers), got {v['params']!r}"
    return None


def _contributors(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(c, str) and c for c in v):
        return f"must be a list of institution names, got {v!r}"
    if len(set(v)) != len(v):
        return f"names an institution twice: {v!r}"
    return None


def _metrics(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"must be an object of name -> number, got {type(v).__name__}"
    bad = sorted(str(k) for k, x in v.items() if not isinstance(k, str) or not _is_number(x) or not math.isfinite(x))
    return f"must hold finite numbers only (leave the others out); not: {bad}" if bad else None


def _privacy(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"must be an object of institution -> reported spend, got {type(v).__name__}"
    for name, spend in v.items():
        if not isinstance(spend, dict) or not _json_value(spend):
            return f"[{name!r}] must be an object of JSON values, got {spend!r}"
        bad = [k for k in _PRIVACY_NUMBERS if not (_is_number(spend.get(k)) and 0 <= spend[k] < math.inf)]
        if bad:
            return f"[{name!r}] needs {', '.join(_PRIVACY_NUMBERS)} as finite numbers >= 0; wrong or missing: {bad}"
    return None


def _central_dp(v: Any) -> str | None:
    if v is None or (isinstance(v, dict) and _json_value(v)):
        return None
    return f"must be null or an object of JSON values, got {v!r}"


def _lineage(v: Any) -> str | None:
    if not isinstance(v, dict) or set(v) != set(_LINEAGE_KEYS):
        got = sorted(v) if isinstance(v, dict) else type(v).__name__
        return f"must be an object with exactly {list(_LINEAGE_KEYS)} (base64), got {got}"
    sizes = {"record": None, "signature": _SIGNATURE_BYTES, "public_key": _PUBLIC_KEY_BYTES}
    for key, size in sizes.items():
        try:
            raw = base64.b64decode(v[key], validate=True) if isinstance(v[key], str) else None
        except (binascii.Error, ValueError):
            raw = None
        if raw is None:
            return f"{key} must be base64 text, got {str(v[key])[:40]!r}"
        if not raw or (size is not None and len(raw) != size):
            return f"{key} is {len(raw)} bytes, expected {size or 'at least 1'}"
    return None


def _utc_time(v: Any) -> str | None:
    try:
        when = datetime.fromisoformat(v) if isinstance(v, str) else None
    except ValueError:
        when = None
    if when is None or when.utcoffset() != timedelta(0):
        return f"must be an ISO 8601 time in UTC such as '2025-01-02T03:04:05Z', got {v!r}"
    return None


_CHECKS: dict[str, Any] = {
    "format": _format, "federation": _text, "study": _text, "version": _count(0), "sha256": _sha,
    "size_bytes": _count(1), "model": _model, "rounds": _count(0), "contributors": _contributors,
    "metrics": _metrics, "privacy": _privacy, "central_dp": _central_dp, "lineage": _lineage,
    "published_at": _utc_time, "pulled_at": _utc_time,
}
