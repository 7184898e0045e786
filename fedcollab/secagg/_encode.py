"""An update, as the institution uploads it under secure aggregation: clipped,
quantized, noised (with distributed DP) and masked, chunk by chunk.

The whole masked vector is built in memory (4 bytes per parameter) because the
upload's header carries its SHA-256 before the first chunk, and a retried upload must
send the same bytes. Each step works on one chunk of `chunk_elems` elements at a
time, vectorized; the float update is never copied whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedcollab.secagg._client import InstitutionSecAgg, SecAggError
from fedcollab.secagg._quantize import Quantizer
from fedcollab.v1 import tensor_pb2

MASKED_TENSOR = "secagg.masked"
_MAX_ROUNDINGS = 50


@dataclass(frozen=True)
class NoisePlan:
    """Distributed DP, as the round's SecAggParams give it."""

    clip_norm: float
    l2_bound: float  # integer units: conditional rounding retries above it
    institution_variance: float  # Skellam variance this institution adds (integer units)


def masked_manifest(dim: int) -> tensor_pb2.ModelManifest:
    """The manifest of a masked upload: one uint32 tensor of every element of the model."""
    return tensor_pb2.ModelManifest(tensors=[
        tensor_pb2.TensorSpec(name=MASKED_TENSOR, dtype=tensor_pb2.TENSOR_DTYPE_UINT32, shape=[dim])])


def _chunks(tensors: Sequence[torch.Tensor], chunk_elems: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float64 values) over the update flattened in manifest order."""
    start = 0
    for t in tensors:
        flat = t.detach().reshape(-1)
        for a in range(0, flat.numel(), chunk_elems):
            piece = flat[a:a + chunk_elems].to(torch.float64).numpy()
            yield start + a, piece
        start += flat.numel()


def weight_ratio(*, num_examples: int, max_weight: float) -> float:
    """min(n, max_weight) / max_weight, in (0, 1]: the weight an update is masked with.
    Scaled to at most 1, a weighted update stays inside the clipping range, so the
    quantizer that fits the uniform sum fits this one too (Flower multiplies by
    n / max_weight without a cap, which overflows when n exceeds it)."""
    if not max_weight > 0:
        raise SecAggError("SECAGG_BAD_PARAMS", "max_weight must be positive")
    return min(max(int(num_examples), 1), max_weight) / max_weight


def encode_masked(tensors: Sequence[torch.Tensor], *, quantizer: Quantizer, clipping_range: float,
                  noise: NoisePlan | None, secagg: InstitutionSecAgg, rng: np.random.Generator,
                  chunk_elems: int = 1 << 20, weight: float | None = None) -> np.ndarray:
    """The masked update (uint32 mod 2^bits), ready to upload. With `weight` (a
    weight_ratio), the clipped update is multiplied by it and the weight itself
    follows as one more element."""
    dim = sum(t.numel() for t in tensors)
    if weight is not None and (noise is not None or not 0 < weight <= 1):
        raise SecAggError("SECAGG_BAD_PARAMS", "a weight is in (0, 1], and never combined with distributed DP")
    out = np.empty(dim + (weight is not None), dtype=np.uint32)
    if noise is None:
        for start, v in _chunks(tensors, chunk_elems):
            clipped = np.clip(v, -clipping_range, clipping_range)
            out[start:start + len(v)] = quantizer.encode(clipped * weight if weight is not None else clipped, rng=rng)
        if weight is not None:
            out[dim:] = quantizer.encode(np.array([weight]), rng=rng)
    else:
        _encode_private(tensors, out, quantizer=quantizer, noise=noise, rng=rng, chunk_elems=chunk_elems)
    dim = len(out)
    for start in range(0, dim, chunk_elems):
        out[start:start + chunk_elems] = secagg.mask(out[start:start + chunk_elems], start=start)
    return out


def _encode_private(tensors: Sequence[torch.Tensor], out: np.ndarray, *, quantizer: Quantizer, noise: NoisePlan,
                    rng: np.random.Generator, chunk_elems: int) -> None:
    """Clip to L2 norm clip_norm, scale, round conditionally (the rounded norm must stay
    within l2_bound, the sensitivity the accounting assumes), add Skellam noise."""
    from fedcollab.secagg._ddp import conditional_rounding_accepts, skellam_noise  # only needed here

    squares = sum(float(np.dot(v, v)) for _, v in _chunks(tensors, chunk_elems))
    norm = math.sqrt(squares)
    factor = quantizer.scale * (min(1.0, noise.clip_norm / norm) if norm > 0 else 1.0)
    for _ in range(_MAX_ROUNDINGS):
        rounded_squares = 0.0
        for start, v in _chunks(tensors, chunk_elems):
            ints = quantizer.round(v * factor, rng=rng)
            as_float = ints.astype(np.float64)  # int64 squares would overflow
            rounded_squares += float(np.dot(as_float, as_float))
            out[start:start + len(v)] = quantizer.wrap(ints)
        if conditional_rounding_accepts(squared_norm=rounded_squares, bound=noise.l2_bound):
            break
    else:
        raise SecAggError("SECAGG_ROUNDING_FAILED", f"{_MAX_ROUNDINGS} roundings of the update all exceeded the "
                                                    f"L2 bound {noise.l2_bound:.4g}; the round's parameters are wrong")
    if noise.institution_variance > 0:
        for start in range(0, len(out), chunk_elems):
            piece = out[start:start + chunk_elems]
            piece += quantizer.wrap(skellam_noise(variance=noise.institution_variance, size=len(piece), rng=rng))
            if quantizer.bits < 32:
                piece &= np.uint32((1 << quantizer.bits) - 1)
