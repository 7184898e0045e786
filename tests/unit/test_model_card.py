"""Model cards: the JSON round trip, a named field for every malformed card, and the
check of a model file against its card and signed lineage record."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcollab.lineage import build_record, canonical_bytes, raw_public_key, sign_record
from fedcollab.registry import (
    CARD_FORMAT,
    CardError,
    ModelCard,
    card_path_for,
    lineage_field,
    read_card,
    verify_model_file,
    write_card,
)

PARENT = "a" * 64
UPDATE = "c" * 64


def signed_card(model_file: Path, *, key: Ed25519PrivateKey, model: dict[str, Any] | None = None,
                study: str = "digits", federation: str = "demo", version: int = 3,
                record_overrides: dict[str, Any] | None = None, **card_overrides: Any) -> ModelCard:
    """A card for `model_file` whose lineage record `key` signs, as a coordinator would."""
    data = model_file.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    record = build_record(**{
        "version": version, "round": version, "study": study, "federation": federation, "parent_sha256": PARENT,
        "model_sha256": sha, "contributions": [
            {"institution": "hospital-a", "update_sha256": UPDATE, "num_examples": 120,
             "privacy": {"epsilon": 1.5, "delta": 1e-5, "budget_epsilon": 8.0}},
            {"institution": "lab-b", "update_sha256": UPDATE, "num_examples": 80}],
        "aggregator": {"name": "fedavg", "weighting": "num_examples"}, "central_dp": None,
        "code_version": "0.1.0", "created_at": "2025-01-02T03:04:05.000000Z", **(record_overrides or {})})
    record_bytes = canonical_bytes(record)
    values: dict[str, Any] = dict(
        federation=federation, study=study, version=version, sha256=sha, size_bytes=len(data),
        model=model or {"kind": "mlp", "params": {"in_features": 64, "hidden": [32], "num_classes": 10}},
        rounds=version, contributors=["hospital-a", "lab-b"],
        metrics={"eval_accuracy": 0.91, "train_loss": 0.3},
        privacy={"hospital-a": {"epsilon": 1.5, "delta": 1e-5, "budget_epsilon": 8.0, "accountant": "prv"}},
        central_dp=None,
        lineage=lineage_field(record=record_bytes, signature=sign_record(record_bytes, key),
                              public_key=key.public_key()),
        published_at="2025-01-02T03:04:05Z", pulled_at="2025-01-03T00:00:00+00:00",
    )
    values.update(card_overrides)
    return ModelCard(**values)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "digits-v3.safetensors"
    path.write_bytes(bytes(range(256)) * 4)  # verify_model_file reads bytes; it does not parse them
    return path


@pytest.fixture
def card(model_file: Path, key: Ed25519PrivateKey) -> ModelCard:
    return signed_card(model_file, key=key)


# ------------------------------------------------------------------ round trip
def test_json_round_trip_is_exact(card: ModelCard, tmp_path: Path) -> None:
    text = card.to_json()
    assert json.loads(text)["format"] == CARD_FORMAT
    assert list(json.loads(text)) == sorted(json.loads(text)), "keys are sorted"
    assert "\n  " in text, "indented by 2"
    again = ModelCard.from_json(text, source="mem")
    assert again == card and again.to_json() == text
    path = tmp_path / "cards" / "digits-v3.card.json"
    write_card(card, path)
    assert read_card(path) == card
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")], "atomic write leaves no temp file"


def test_card_path_sits_next_to_the_model() -> None:
    assert card_path_for(Path("/m/digits-v3.safetensors")) == Path("/m/digits-v3.card.json")
    assert card_path_for(Path("study.v2-v10.safetensors")) == Path("study.v2-v10.card.json")


def test_card_is_frozen_and_keeps_its_own_copies(card: ModelCard, model_file: Path, key: Any) -> None:
    with pytest.raises(AttributeError):
        card.version = 4  # type: ignore[misc]
    params = {"in_features": 64, "hidden": [32], "num_classes": 10}
    own = signed_card(model_file, key=key, model={"kind": "mlp", "params": params})
    params["hidden"].append(99)
    assert own.params["hidden"] == [32]
    assert card.kind == "mlp"


def test_missing_card_file_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(CardError, match="model pull") as e:
        read_card(tmp_path / "nope.card.json")
    assert e.value.reason == "CARD_MISSING"


# ------------------------------------------------------------------ malformed cards
def _mutated(card: ModelCard, change: Any) -> str:
    data = json.loads(card.to_json())
    change(data)
    return json.dumps(data)


MALFORMED: list[tuple[str, Any, str]] = [
    ("wrong format", lambda d: d.update(format="fedcollab.model-card/2"), "format"),
    ("version missing", lambda d: d.pop("version"), "version is missing"),
    ("version a string", lambda d: d.update(version="3"), "version"),
    ("version a boolean", lambda d: d.update(version=True), "version"),
    ("negative version", lambda d: d.update(version=-1), "version"),
    ("sha256 upper case", lambda d: d.update(sha256="A" * 64), "sha256"),
    ("sha256 short", lambda d: d.update(sha256="ab"), "sha256"),
    ("size_bytes zero", lambda d: d.update(size_bytes=0), "size_bytes"),
    ("model without params", lambda d: d.update(model={"kind": "mlp"}), "model"),
    ("model kind a number", lambda d: d.update(model={"kind": 3, "params": {}}), "model"),
    ("model params a list", lambda d: d.update(model={"kind": "mlp", "params": []}), "model"),
    ("rounds negative", lambda d: d.update(rounds=-2), "rounds"),
    ("contributors twice", lambda d: d.update(contributors=["a", "a"]), "contributors"),
    ("contributors a string", lambda d: d.update(contributors="a,b"), "contributors"),
    ("metric a string", lambda d: d.update(metrics={"eval_accuracy": "high"}), "metrics"),
    ("privacy without budget", lambda d: d.update(privacy={"lab": {"epsilon": 1.0, "delta": 1e-5}}), "privacy"),
    ("privacy negative epsilon", lambda d: d.update(
        privacy={"lab": {"epsilon": -1.0, "delta": 1e-5, "budget_epsilon": 2.0}}), "privacy"),
    ("central_dp a list", lambda d: d.update(central_dp=[1]), "central_dp"),
    ("lineage without key", lambda d: d["lineage"].pop("public_key"), "lineage"),
    ("lineage signature not base64", lambda d: d["lineage"].update(signature="not base64!"), "lineage"),
    ("lineage signature short", lambda d: d["lineage"].update(signature="AAAA"), "lineage"),
    ("lineage record empty", lambda d: d["lineage"].update(record=""), "lineage"),
    ("published_at not a time", lambda d: d.update(published_at="yesterday"), "published_at"),
    ("pulled_at not UTC", lambda d: d.update(pulled_at="2025-01-01T00:00:00+02:00"), "pulled_at"),
    ("pulled_at without zone", lambda d: d.update(pulled_at="2025-01-01T00:00:00"), "pulled_at"),
    ("unknown field", lambda d: d.update(signed_by="me"), "unknown field"),
]


@pytest.mark.parametrize(("change", "field"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_card_names_the_field(card: ModelCard, change: Any, field: str) -> None:
    with pytest.raises(CardError, match=rf"(: |; ){re.escape(field)}") as e:  # a problem starts with its field
        ModelCard.from_json(_mutated(card, change), source="/x/digits-v3.card.json")
    assert e.value.reason == "CARD_INVALID"
    assert "/x/digits-v3.card.json" in str(e.value), "the message names the file"


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", '"card"', '{"format": "fedcollab.model-card/1", "x": NaN}'],
                         ids=["empty", "truncated", "array", "string", "NaN"])
def test_not_a_card_at_all(text: str) -> None:
    with pytest.raises(CardError, match="card.json"):
        ModelCard.from_json(text, source="card.json")


def test_every_problem_is_reported_at_once(card: ModelCard) -> None:
    text = _mutated(card, lambda d: d.update(version="x", sha256="no", metrics={"loss": None}))
    with pytest.raises(CardError) as e:
        ModelCard.from_json(text, source="c")
    for field in ("version", "sha256", "metrics"):
        assert re.search(rf"(: |; ){field} ", str(e.value)), field


def test_construction_validates_too(card: ModelCard) -> None:
    values = card.to_dict()
    with pytest.raises(CardError, match="metrics"):
        ModelCard(**{**values, "metrics": {"train_loss": float("nan")}})
    with pytest.raises(TypeError):
        ModelCard(*values.values())  # keyword-only


# ------------------------------------------------------------------ verify_model_file
def test_a_good_file_verifies_with_the_card_key_and_the_pinned_one(
        model_file: Path, card: ModelCard, key: Ed25519PrivateKey) -> None:
    verify_model_file(model_file=model_file, card=card)
    verify_model_file(model_file=model_file, card=card, public_key=raw_public_key(key))
    verify_model_file(model_file=model_file, card=card, public_key=key.public_key())


def test_a_changed_file_is_refused(model_file: Path, card: ModelCard) -> None:
    data = bytearray(model_file.read_bytes())
    data[10] ^= 1  # same size, one bit off
    model_file.write_bytes(bytes(data))
    with pytest.raises(CardError, match="SHA-256.*pull the model again") as e:
        verify_model_file(model_file=model_file, card=card)
    assert e.value.reason == "MODEL_MISMATCH"
    model_file.write_bytes(bytes(data[:-1]))
    with pytest.raises(CardError, match="bytes, its card says") as e:
        verify_model_file(model_file=model_file, card=card)
    assert e.value.reason == "MODEL_MISMATCH"
    model_file.unlink()
    with pytest.raises(CardError, match="cannot read"):
        verify_model_file(model_file=model_file, card=card)


def test_a_bad_signature_is_refused(model_file: Path, card: ModelCard, key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    record, _, _ = card.lineage_bytes()
    forged = ModelCard(**{**card.to_dict(), "lineage": lineage_field(
        record=record, signature=sign_record(record, other), public_key=key.public_key())})
    with pytest.raises(CardError, match="does not verify") as e:
        verify_model_file(model_file=model_file, card=forged)
    assert e.value.reason == "LINEAGE_INVALID"


def test_a_card_signed_by_another_key_than_the_pinned_one_is_refused(
        model_file: Path, card: ModelCard, key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(CardError, match="not the pinned ed25519:") as e:
        verify_model_file(model_file=model_file, card=card, public_key=raw_public_key(other))
    assert e.value.reason == "LINEAGE_INVALID"
    with pytest.raises(CardError, match="pinned lineage public key is unusable"):
        verify_model_file(model_file=model_file, card=card, public_key=b"short")


@pytest.mark.parametrize(("overrides", "named"), [
    ({"record_overrides": {"version": 2, "round": 2}}, "version 2"),
    ({"record_overrides": {"model_sha256": "e" * 64}}, "model_sha256"),
    ({"record_overrides": {"study": "other"}}, "study 'other'"),
    ({"record_overrides": {"federation": "elsewhere"}}, "federation 'elsewhere'"),
], ids=["version", "sha256", "study", "federation"])
def test_a_record_of_another_model_is_refused(model_file: Path, key: Ed25519PrivateKey, overrides: dict[str, Any],
                                              named: str) -> None:
    card = signed_card(model_file, key=key, **overrides)  # validly signed, but for something else
    with pytest.raises(CardError, match=named) as e:
        verify_model_file(model_file=model_file, card=card)
    assert e.value.reason == "LINEAGE_MISMATCH"
