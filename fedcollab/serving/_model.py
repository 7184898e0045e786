"""The served model: checked against its card, built, loaded, and run one batch at a time."""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from fedcollab.errors import Rejected
from fedcollab.lineage import key_fingerprint
from fedcollab.models import build_model_to_load
from fedcollab.registry import CardError, ModelCard, verify_model_bytes
from fedcollab.serving._inputs import InputSpec, ServingError, input_spec

log = logging.getLogger("fedcollab.serving")


class LoadedModel:
    """One model version ready to predict. `load` refuses a file that is not its
    card's; `predict` is safe to call from many threads (one batch runs at a time)."""

    def __init__(self, *, model: nn.Module, card: ModelCard, spec: InputSpec, num_classes: int,
                 key_fingerprint: str, key_pinned: bool) -> None:
        self.card = card
        self.spec = spec
        self.num_classes = num_classes
        self.key_fingerprint = key_fingerprint
        self.key_pinned = key_pinned
        self._model = model.eval()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, *, model_file: Path, card: ModelCard,
             public_key: bytes | Ed25519PublicKey | None = None) -> LoadedModel:
        """Reads the file once and checks those very bytes against the card and its
        signed lineage (CardError), then builds the card's model and loads them with
        strict names and shapes (ServingError)."""
        model_file = Path(model_file)
        try:
            data = model_file.read_bytes()
        except OSError as e:
            raise CardError(f"{model_file}: cannot read the model file ({e.strerror})",
                            reason="MODEL_MISMATCH") from None
        verify_model_bytes(data=data, card=card, public_key=public_key, source=str(model_file))
        try:
            state = load_safetensors(data)
        except (SafetensorError, ValueError) as e:
            raise ServingError(f"{model_file}: not a readable safetensors file ({e})") from None
        del data
        try:
            model = build_model_to_load(kind=card.kind, params=card.params, state_names=state)
        except (ValueError, TypeError, ImportError) as e:
            raise ServingError(f"{model_file}: its card's model (kind {card.kind!r}) cannot be built here: "
                               f"{e}") from None
        spec = input_spec(model, kind=card.kind)  # before loading: a blob is refused whatever its size
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ServingError(f"{model_file}: its tensors do not fit the model its card describes "
                               f"(kind {card.kind!r}, params {card.params}): {e}. Pull the model again; if it "
                               "persists, the card's model params are not the study's") from None
        for name, p in model.state_dict().items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise ServingError(f"{model_file}: tensor {name} holds NaN or infinite values; this version "
                                   "cannot give meaningful predictions, serve another one")
        num_classes = int(model.config.num_classes)  # type: ignore[union-attr,arg-type]
        pinned = public_key is not None
        fingerprint = key_fingerprint(public_key if pinned else card.lineage_bytes()[2])  # type: ignore[arg-type]
        log.info("loaded %s: v%d of %s, %s, %d classes", model_file, card.version, card.study, card.kind, num_classes)
        return cls(model=model, card=card, spec=spec, num_classes=num_classes, key_fingerprint=fingerprint,
                   key_pinned=pinned)

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels (B,) int64, probabilities (B, num_classes) float32) of a checked batch."""
        x = torch.from_numpy(np.ascontiguousarray(batch))
        try:
            with self._lock, torch.inference_mode():
                logits = self._model(x)  # (B, num_classes)
                probs = torch.softmax(logits.float(), dim=1)  # (B, num_classes)
        except ValueError as e:  # the model's own input check, should one be stricter than the spec
            raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="INPUT_SHAPE", message=str(e)) from None
        return probs.argmax(dim=1).numpy(), probs.numpy()

    def info(self, *, max_batch: int) -> dict[str, Any]:
        """What is served, as JSON (`GET /v1/model`); ModelInfo carries the same fields."""
        card = self.card
        institutions: list[dict[str, Any]] = [
            {"institution": name, "epsilon": float(p["epsilon"]), "delta": float(p["delta"]),
             "budget_epsilon": float(p["budget_epsilon"])} for name, p in sorted(card.privacy.items())]
        central = card.central_dp or {}
        central_eps, central_delta = central.get("epsilon"), central.get("delta")
        has_central = _finite(central_eps)
        privacy = {
            "institutions": institutions,
            "max_epsilon": max((p["epsilon"] for p in institutions), default=0.0),
            "central_dp": has_central,
            "central_epsilon": float(central_eps) if has_central else 0.0,  # type: ignore[arg-type]  # _finite checked
            "central_delta": float(central_delta) if has_central and _finite(central_delta) else 0.0,  # type: ignore[arg-type]
        }
        return {
            "federation": card.federation, "study": card.study, "version": card.version, "sha256": card.sha256,
            "kind": card.kind, "input": self.spec.to_dict(), "num_classes": self.num_classes, "rounds": card.rounds,
            "contributors": list(card.contributors), "metrics": dict(card.metrics), "privacy": privacy,
            "max_batch": max_batch, "published_at": card.published_at,
            "lineage_key_fingerprint": self.key_fingerprint, "lineage_key_pinned": self.key_pinned,
        }


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
