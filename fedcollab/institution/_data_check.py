"""Does this site's data fit the study's model? Checked before any task trains (and so
before any privacy is spent): data that does not fit is declined with DATA_INCOMPATIBLE
and a message naming what is wrong, not trained on until Opacus gives up.

What a model takes is read from its config dataclass (fedcollab.models.model_config):
MLPConfig.in_features, CNNConfig.input_shape, TransformerConfig.seq_len and
token_features, and every kind's num_classes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedcollab import models
from fedcollab.data import ArrayDataset

DECLINE_REASON = "DATA_INCOMPATIBLE"
MAX_MESSAGE = 1024  # the coordinator refuses longer decline messages


@dataclass(frozen=True)
class DataSummary:
    """What the check needs of the site's data, computed once at start (one pass)."""

    num_examples: int
    feature_shape: tuple[int, ...]  # one example's shape: x.shape[1:]
    feature_dtype: str  # as loaded (float32 for every loader)
    nonfinite_examples: int  # examples with a NaN or infinite feature
    label_min: int
    label_max: int  # label_min > label_max when there are no examples


def summarize(*datasets: ArrayDataset) -> DataSummary:
    """The summary of these splits together (the train and the held-out split)."""
    shapes = {tuple(d.x.shape[1:]) for d in datasets if len(d)}
    dtypes = {str(d.x.dtype) for d in datasets if len(d)}
    labels = [d.y for d in datasets if len(d)]
    return DataSummary(
        num_examples=sum(len(d) for d in datasets),
        # Splits of one array share a shape; the first stands for them.
        feature_shape=next(iter(sorted(shapes)), ()),
        feature_dtype=next(iter(sorted(dtypes)), "float32"),
        nonfinite_examples=sum(_nonfinite_rows(d.x) for d in datasets if len(d)),
        label_min=min((int(y.min()) for y in labels), default=0),
        label_max=max((int(y.max()) for y in labels), default=-1),
    )


def data_problems(*, data: DataSummary, kind: str, params: Mapping[str, object]) -> list[str]:
    """Every reason this data cannot train model (kind, params); empty when it can.
    A (kind, params) that does not build is left to the build, which refuses it with
    its own reason (MODEL_BUILD_FAILED)."""
    try:
        config = models.model_config(kind=kind, params=params)
    except (ValueError, TypeError):
        return []
    problems = []
    if data.nonfinite_examples:
        problems.append(f"{data.nonfinite_examples} of the site's {data.num_examples} examples have NaN or "
                        "infinite features; remove or impute them")
    problems.extend(_input_problems(kind, config, data))
    num_classes = getattr(config, "num_classes", None)
    if isinstance(num_classes, int) and data.label_min <= data.label_max and (
            data.label_min < 0 or data.label_max >= num_classes):
        problems.append(f"the site's labels are {data.label_min}..{data.label_max} but the study's model {kind} "
                        f"has {num_classes} classes (labels 0..{num_classes - 1})")
    return problems


def decline_message(problems: list[str]) -> str:
    """The problems as one decline message, within what the coordinator accepts."""
    text = "; ".join(problems)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _input_problems(kind: str, config: object, data: DataSummary) -> list[str]:
    shape = data.feature_shape
    if isinstance(config, models.BlobConfig):
        return [f"the study's model {kind} has no forward pass and cannot train on data "
                "(it is for benchmarks with institution.trainer = \"synthetic\")"]
    if isinstance(config, models.MLPConfig):  # flattens each example
        features = math.prod(shape)
        if not shape:
            return [f"the site's x is 1-D (one number per example); the study's model {kind} takes "
                    f"{config.in_features} features: x must have shape (n, {config.in_features})"]
        if features != config.in_features:
            per = f" ({' x '.join(map(str, shape))} per example)" if len(shape) > 1 else ""
            return [f"the site's data has {features} features{per}; the study's model {kind} takes "
                    f"{config.in_features}"]
        return []
    if isinstance(config, models.CNNConfig):
        if shape != config.input_shape:
            return [f"the site's examples have shape {_shape(shape)}; the study's model {kind} takes images of "
                    f"shape {_shape(config.input_shape)} (channels, height, width)"]
        return []
    if isinstance(config, models.TransformerConfig):  # lora_transformer's config is one too
        if config.vocab_size > 0:
            return [f"the study's model {kind} takes integer token ids (vocab_size {config.vocab_size}); the "
                    f"site's data loads as {data.feature_dtype} features"]
        flat = config.seq_len * config.token_features
        tokens = len(shape) == 2 and shape[1] == config.token_features and 1 <= shape[0] <= config.seq_len
        if shape != (flat,) and not tokens:
            return [f"the site's examples have shape {_shape(shape)}; the study's model {kind} takes ({flat},) "
                    f"flat features or (T, {config.token_features}) tokens with T <= {config.seq_len}"]
    return []


def _nonfinite_rows(x: np.ndarray, *, chunk: int = 4096) -> int:
    """Examples with a non-finite feature, a chunk at a time (no copy of all of x)."""
    if not np.issubdtype(x.dtype, np.floating):
        return 0
    flat = x.reshape(len(x), -1)
    return int(sum((~np.isfinite(flat[i : i + chunk])).any(axis=1).sum() for i in range(0, len(flat), chunk)))


def _shape(shape: tuple[int, ...]) -> str:
    return f"({shape[0]},)" if len(shape) == 1 else f"({', '.join(map(str, shape))})"
