"""Builds models by name from plain JSON-able parameters, with seeded initial weights."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from fedcollab.models._blob import Blob, BlobConfig
from fedcollab.models._cnn import CNNConfig, SmallCNN
from fedcollab.models._lora import LoraTransformer, LoraTransformerConfig
from fedcollab.models._mlp import MLP, MLPConfig
from fedcollab.models._transformer import TinyTransformer, TransformerConfig

MODEL_KINDS: tuple[str, ...] = ("mlp", "cnn", "blob", "transformer", "lora_transformer")

_BUILDERS: dict[str, tuple[type, type[nn.Module]]] = {
    "mlp": (MLPConfig, MLP),
    "cnn": (CNNConfig, SmallCNN),
    "blob": (BlobConfig, Blob),
    "transformer": (TransformerConfig, TinyTransformer),
    "lora_transformer": (LoraTransformerConfig, LoraTransformer),  # peft imported only when built
}


def build_model(
    *, kind: str, params: Mapping[str, object] | None = None, seed: int = 0
) -> nn.Module:
    """Same (kind, params, seed) always gives bit-identical initial weights."""
    config = model_config(kind=kind, params=params)
    # fork_rng keeps the caller's global RNG state untouched; devices=[] skips CUDA.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[kind][1](config)


def model_config(*, kind: str, params: Mapping[str, object] | None = None) -> object:
    """The checked config dataclass of (kind, params) (e.g. MLPConfig), without building
    the model: its fields say what the model takes (in_features, num_classes, ...)."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {', '.join(MODEL_KINDS)}")
    config_cls = _BUILDERS[kind][0]
    return config_cls(**_coerce_params(kind, config_cls, dict(params or {})))


def build_model_to_load(
    *, kind: str, params: Mapping[str, object] | None = None, state_names: Iterable[str]
) -> nn.Module:
    """The model of (kind, params), ready for `load_state_dict` of a state with these names.

    When the names cover every parameter and buffer, as for every kind whose whole state
    travels, the model is laid out on the meta device and given uninitialised memory:
    drawing initial weights that the load overwrites at once costs about 6 s for 1B
    parameters. A kind with weights outside its state (lora_transformer's frozen base,
    rebuilt from its own seed) is built for real."""
    with torch.device("meta"):
        shape = build_model(kind=kind, params=params)
    weights = {n for n, _ in shape.named_parameters()} | {n for n, _ in shape.named_buffers()}
    if weights == set(shape.state_dict()) and weights <= set(state_names):
        return shape.to_empty(device="cpu")
    return build_model(kind=kind, params=params)


def _coerce_params(kind: str, config_cls: type, params: dict[str, object]) -> dict[str, object]:
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}
    accepted = ", ".join(f"{name}: {_type_name(tp)}" for name, tp in fields.items())
    out: dict[str, object] = {}
    for name, value in params.items():
        if name not in fields:
            raise ValueError(f"unknown param {name!r} for model kind {kind!r}; accepted: {accepted}")
        coerced = _coerce(value, fields[name])
        if coerced is None:
            raise ValueError(
                f"param {name!r} for model kind {kind!r} must be {_type_name(fields[name])}, "
                f"got {value!r}; accepted: {accepted}"
            )
        out[name] = coerced
    missing = [
        name for f in dataclasses.fields(config_cls)
        if (name := f.name) not in out
        and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing param(s) {missing} for model kind {kind!r}; accepted: {accepted}")
    return out


def _coerce(value: object, tp: object) -> object | None:
    """Returns value converted to tp, or None when it does not fit."""
    # bool is an int subclass, but True as a layer width is surely a mistake.
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if tp is str:
        return value if isinstance(value, str) else None
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if typing.get_origin(tp) is tuple:  # tuple[int, ...]; JSON gives lists
        if not isinstance(value, (list, tuple)):
            return None
        items = [_coerce(v, typing.get_args(tp)[0]) for v in value]
        return None if any(i is None for i in items) else tuple(items)
    raise TypeError(f"no coercion for config field type {tp!r}")  # a bug here, not user input


def _type_name(tp: object) -> str:
    if typing.get_origin(tp) is tuple:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))
