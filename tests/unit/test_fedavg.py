"""Streaming FedAvg against a direct numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcollab.aggregation import StreamingFedAvg
from fedcollab.wire import TensorStreamDecoder, iter_stream, manifest_of


def _fold(agg: StreamingFedAvg, manifest, delta: dict[str, torch.Tensor], weight: float, piece: int) -> None:
    decoder = TensorStreamDecoder(manifest)
    pieces = [p for data in iter_stream(list(delta.values()), piece_bytes=piece) for p in decoder.feed(data)]
    agg.fold(pieces=pieces, weight=weight)
    agg.count(weight=weight)


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.integers(1, 5000), min_size=1, max_size=6), piece=st.integers(1, 97),
       seed=st.integers(0, 10_000))
def test_weighted_mean_matches_numpy(weights: list[int], piece: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = {"w": torch.from_numpy(rng.normal(size=(5, 3)).astype(np.float32)),
            "b": torch.from_numpy(rng.normal(size=(3,)).astype(np.float32)),
            "h": torch.from_numpy(rng.normal(size=(4,))).to(torch.float64)}
    manifest = manifest_of(base)
    deltas = [{k: torch.from_numpy(rng.normal(size=tuple(v.shape))).to(v.dtype) for k, v in base.items()}
              for _ in weights]
    agg = StreamingFedAvg(manifest=manifest)
    for d, w in zip(deltas, weights, strict=True):
        _fold(agg, manifest, d, float(w), piece)
    new = agg.apply(base)
    for k, b in base.items():
        expected = b.numpy().astype(np.float64) + sum(
            w * d[k].numpy().astype(np.float64) for d, w in zip(deltas, weights, strict=True)) / sum(weights)
        assert new[k].dtype == b.dtype
        np.testing.assert_allclose(new[k].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert agg.num_updates == len(weights) and agg.total_weight == sum(weights)


def test_half_precision_models_keep_their_dtype() -> None:
    base = {"w": torch.ones(4, dtype=torch.bfloat16)}
    agg = StreamingFedAvg(manifest=manifest_of(base))
    _fold(agg, manifest_of(base), {"w": torch.full((4,), 0.5, dtype=torch.bfloat16)}, 1.0, 3)
    out = agg.apply(base)["w"]
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.full((4,), 1.5, dtype=torch.bfloat16))


def test_nothing_aggregated_is_an_error() -> None:
    base = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="no update"):
        StreamingFedAvg(manifest=manifest_of(base)).apply(base)
