"""What one example is for each model kind, and the checks that turn a request's
numbers into a batch the model takes (or a Rejected that says what to send instead).

Both front ends share these checks: gRPC sends a flat row-major buffer and a shape,
HTTP/JSON sends nested lists, one per example."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from torch import nn

from fedcollab.errors import FedcollabError, Rejected
from fedcollab.models import CNNConfig, MLPConfig, TransformerConfig

_CNN_SIDE = 28  # SmallCNN's fixed input height and width
_MAX_DEPTH = 4  # lists in lists in one example: 3 for an image, and one spare for a clear message


class ServingError(FedcollabError):
    """A model cannot be served: a kind without a prediction (blob), a card whose model
    does not fit the file, an address that cannot be bound."""


@dataclass(frozen=True)
class InputSpec:
    """One example as a model takes it. `shape` leaves out the batch dimension."""

    tokens: bool  # int64 token ids; else float32 features
    shape: tuple[int, ...]
    max_length: int = 0  # sequence models: 1..max_length tokens (shape[0] == max_length); 0: fixed shape
    vocab_size: int = 0  # token ids are in [0, vocab_size)
    flat_features: int = 0  # also accepted as one flat list of this many floats (continuous transformer)
    squeeze_channel: bool = False  # a single-channel image may come without its channel dimension
    description: str = ""

    def model_shape(self, example: tuple[int, ...]) -> tuple[int, ...] | None:
        """The shape the model takes for an example sent with shape `example`; None
        when that shape is not accepted."""
        if example == self.shape:
            return example
        if (self.max_length and len(example) == len(self.shape) and 1 <= example[0] <= self.max_length
                and example[1:] == self.shape[1:]):
            return example
        if self.flat_features and example == (self.flat_features,):
            return self.shape
        if self.squeeze_channel and example == self.shape[1:]:
            return self.shape
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tokens" if self.tokens else "float", "shape": list(self.shape),
                "max_length": self.max_length, "vocab_size": self.vocab_size, "description": self.description}


def input_spec(model: nn.Module, *, kind: str) -> InputSpec:
    """The input of a built model, from its config; ServingError for a kind that has
    no prediction to serve."""
    config = getattr(model, "config", None)
    if isinstance(config, MLPConfig):
        f = config.in_features
        return InputSpec(tokens=False, shape=(f,), description=f"{f} float features per example, as a flat list")
    if isinstance(config, CNNConfig):
        c, side = config.in_channels, _CNN_SIDE
        also = f", or {side}x{side} nested lists (rows, columns) as it has one channel" if c == 1 else ""
        return InputSpec(tokens=False, shape=(c, side, side), squeeze_channel=c == 1,
                         description=f"one {c}x{side}x{side} float image per example, as nested lists "
                                     f"(channels, rows, columns){also}")
    if isinstance(config, TransformerConfig):  # and LoraTransformerConfig, its subclass
        t = config.seq_len
        if config.vocab_size > 0:
            return InputSpec(tokens=True, shape=(t,), max_length=t, vocab_size=config.vocab_size,
                             description=f"1 to {t} integer token ids in [0, {config.vocab_size}) per example; "
                                         "examples of different lengths may share a request")
        d = config.token_features
        return InputSpec(tokens=False, shape=(t, d), max_length=t, flat_features=t * d,
                         description=f"1 to {t} tokens of {d} floats per example, as nested lists "
                                     f"(tokens, features), or a flat list of {t * d} floats")
    raise ServingError(f"model kind {kind!r} has no prediction to serve (it only moves parameters in "
                       "benchmarks); serve a study whose model is mlp, cnn, transformer or lora_transformer")


def _reject(reason: str, message: str, **metadata: object) -> Rejected:
    return Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason=reason, message=message, metadata=metadata)


def _dims(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _check_values(spec: InputSpec, batch: np.ndarray, *, rows: Sequence[int] | None = None) -> None:
    """Finite floats, or token ids within the vocabulary. `rows` numbers the batch's
    examples as the request did (HTTP instances); else they are counted from 0."""

    def where(bad: np.ndarray) -> str:
        index = [int(i) for i in np.argwhere(bad)[0]]
        example = f"instance {rows[index[0]]}" if rows is not None else f"example {index[0]}"
        return f"{example}, position {index[1:]}" if index[1:] else example

    if spec.tokens:
        bad = (batch < 0) | (batch >= spec.vocab_size)
        if bad.any():
            raise _reject("TOKEN_OUT_OF_RANGE", f"{where(bad)}: token id {int(batch[bad][0])} is outside the "
                          f"vocabulary [0, {spec.vocab_size}); tokenize with the study's vocabulary",
                          vocab_size=spec.vocab_size)
        return
    bad = ~np.isfinite(batch)
    if bad.any():
        raise _reject("INPUT_NOT_FINITE", f"{where(bad)}: value {float(batch[bad][0])} is not finite (NaN, "
                      "Infinity, or beyond float32's range); replace missing values before predicting")


def _check_batch_size(size: int, max_batch: int) -> None:
    if size < 1:
        raise _reject("EMPTY_BATCH", "the batch has no examples; send at least one")
    if size > max_batch:
        raise _reject("BATCH_TOO_LARGE", f"the batch has {size} examples, this server takes at most {max_batch} per "
                      "request; split it into several requests", max_batch=max_batch, got=size)


def batch_from_buffer(spec: InputSpec, *, shape: Sequence[int], values: Sequence[float], tokens: Sequence[int],
                      max_batch: int) -> np.ndarray:
    """A gRPC PredictRequest's batch: (B, *example) float32 or int64."""
    kind, field, other = ("token ids", "tokens", "values") if spec.tokens else ("float features", "values", "tokens")
    data, wrong = (tokens, values) if spec.tokens else (values, tokens)
    if len(wrong):
        raise _reject("INPUT_TYPE", f"this model takes {kind} in `{field}`, and `{other}` was set; "
                      f"send the examples in `{field}` and leave `{other}` empty")
    if not shape:
        raise _reject("INPUT_SHAPE", f"`shape` is empty; send [batch, {', '.join(map(str, spec.shape))}]",
                      expected=_dims(spec.shape))
    if any(d < 0 for d in shape):
        raise _reject("INPUT_SHAPE", f"shape {_dims(shape)} has a negative dimension")
    _check_batch_size(shape[0], max_batch)
    example = tuple(int(d) for d in shape[1:])
    target = spec.model_shape(example)
    if target is None:
        raise _reject("INPUT_SHAPE", f"expected shape [batch, {', '.join(map(str, spec.shape))}] "
                      f"({spec.description}), got {_dims(shape)}; reshape the examples to match",
                      expected=_dims(spec.shape), got=_dims(shape))
    count = math.prod(shape)
    if len(data) != count:
        raise _reject("INPUT_SHAPE", f"shape {_dims(shape)} has {count} elements, got {len(data)} `{field}`; "
                      "send product(shape) of them, row-major", expected=count, got=len(data))
    batch = np.asarray(data, dtype=np.int64 if spec.tokens else np.float32).reshape(shape[0], *target)
    _check_values(spec, batch)
    return batch


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _nested_shape(value: Any, *, tokens: bool, depth: int = 1) -> tuple[int, ...]:
    """The shape of nested lists of numbers; _Bad if they are ragged, deeper than any
    model's example, or hold anything else (strings, booleans, null; floats where token
    ids go)."""
    if depth > _MAX_DEPTH:
        raise _Bad("INPUT_SHAPE", f"nests lists more than {_MAX_DEPTH} deep")
    if not isinstance(value, list):
        raise _Bad("INPUT_SHAPE", f"is {_json_type(value)}, not a list")
    if not value:
        raise _Bad("INPUT_SHAPE", "has an empty list")
    if not any(isinstance(v, list) for v in value):
        ok = (int,) if tokens else (int, float)
        bad = [v for v in value if type(v) not in ok][:1]  # type(True) is bool: refused too
        if bad:
            wanted = "integer token ids" if tokens else "numbers"
            raise _Bad("INPUT_TYPE", f"holds {_json_type(bad[0])} {str(bad[0])[:20]!r}; it takes {wanted} only")
        return (len(value),)
    inner = {_nested_shape(v, tokens=tokens, depth=depth + 1) for v in value}
    if len(inner) != 1:
        raise _Bad("INPUT_SHAPE", f"is ragged: its lists have shapes {sorted(inner)[:4]}; make them rectangular")
    return (len(value), *inner.pop())


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", str: "a string", type(None): "null", dict: "an object", int: "an integer",
             float: "a number", list: "a list"}
    return names.get(type(value), type(value).__name__)


def batches_from_instances(spec: InputSpec, instances: Any, *, max_batch: int) -> list[tuple[list[int], np.ndarray]]:
    """An HTTP request's examples, grouped by shape: [(their indices, (n, *shape) batch)].
    Examples of different lengths (token sequences) are run as separate batches."""
    if not isinstance(instances, list):
        raise _reject("INPUT_FORMAT", f"\"instances\" is {_json_type(instances)}; send "
                      "{\"instances\": [example, ...]} with one example per entry")
    _check_batch_size(len(instances), max_batch)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, instance in enumerate(instances):
        try:
            example = _nested_shape(instance, tokens=spec.tokens)
        except _Bad as e:
            raise _reject(e.reason, f"instance {i} {e.detail}; each instance is {spec.description}",
                          instance=i) from None
        target = spec.model_shape(example)
        if target is None:
            raise _reject("INPUT_SHAPE", f"instance {i} has shape {_dims(example)}, expected "
                          f"{_dims(spec.shape)}: {spec.description}", instance=i, expected=_dims(spec.shape),
                          got=_dims(example))
        groups.setdefault(target, []).append(i)
    out = []
    for target, indices in groups.items():
        try:
            with np.errstate(over="ignore"):  # beyond float32 becomes inf, which _check_values names
                batch = np.array([instances[i] for i in indices], dtype=np.int64 if spec.tokens else np.float32)
        except OverflowError:  # a JSON integer beyond int64 or float
            if spec.tokens:
                raise _reject("TOKEN_OUT_OF_RANGE", f"a token id is beyond int64; ids are in [0, {spec.vocab_size})",
                              vocab_size=spec.vocab_size) from None
            raise _reject("INPUT_NOT_FINITE", "a value is beyond float32's range; scale the features as the "
                          "study's data was") from None
        batch = batch.reshape(len(indices), *target)
        _check_values(spec, batch, rows=indices)
        out.append((indices, batch))
    return out
