"""Tensor streams: chunking round trips for any dtype, shape and chunk size."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcollab.wire import (
    TensorStreamDecoder,
    all_finite,
    iter_chunks,
    iter_stream,
    manifest_nbytes,
    manifest_of,
    stream_sha256,
    tensors_from_stream,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

tensor_sets = st.lists(
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 7), min_size=0, max_size=3)),
    min_size=1, max_size=6,
).map(lambda specs: {
    f"t{i}": torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(dtype)
    for i, (dtype, shape) in enumerate(specs)
})


@settings(max_examples=150, deadline=None)
@given(tensors=tensor_sets, chunk_bytes=st.integers(1, 300))
def test_chunks_round_trip(tensors: dict[str, torch.Tensor], chunk_bytes: int) -> None:
    chunks = list(iter_chunks(list(tensors.values()), chunk_bytes=chunk_bytes))
    manifest = manifest_of(tensors)
    assert sum(len(c.data) for c in chunks) == manifest_nbytes(manifest)
    assert all(len(c.data) == chunk_bytes for c in chunks[:-1])
    offsets = [c.offset for c in chunks]
    assert offsets == sorted(offsets) and (not chunks or offsets[0] == 0)
    for c in chunks:
        assert hashlib.sha256(c.data).digest() == c.sha256
    back = tensors_from_stream(manifest, [c.data for c in chunks])
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t)
    whole = b"".join(c.data for c in chunks)
    assert stream_sha256(list(tensors.values())) == hashlib.sha256(whole).digest()


@settings(max_examples=100, deadline=None)
@given(tensors=tensor_sets, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_decoder_gives_whole_elements_whatever_the_piece_boundaries(
    tensors: dict[str, torch.Tensor], cuts: list[int]
) -> None:
    stream = b"".join(bytes(p) for p in iter_stream(list(tensors.values()), piece_bytes=64))
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    decoder = TensorStreamDecoder(manifest_of(tensors))
    flat = [t.reshape(-1) for t in tensors.values()]
    seen = [0] * len(flat)
    for a, b in zip(bounds, bounds[1:], strict=False):
        for piece in decoder.feed(stream[a:b]):
            assert piece.start == seen[piece.index], "pieces of a tensor arrive in order, without gaps"
            assert torch.equal(piece.values, flat[piece.index][piece.start : piece.start + len(piece.values)])
            seen[piece.index] += len(piece.values)
    assert decoder.complete
    assert seen == [f.numel() for f in flat]


def test_decoder_refuses_a_stream_longer_than_its_manifest() -> None:
    decoder = TensorStreamDecoder(manifest_of({"w": torch.zeros(2)}))
    with pytest.raises(ValueError, match="longer than its manifest"):
        decoder.feed(bytes(12))


def test_non_float_tensors_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="cannot be averaged"):
        manifest_of({"steps": torch.zeros(3, dtype=torch.int64)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_sees_every_nan_and_inf_and_no_false_alarm_on_overflowing_sums(dtype: torch.dtype) -> None:
    top = torch.finfo(dtype).max
    big = torch.full((1000,), top, dtype=dtype)  # finite values whose sum overflows any accumulator
    assert all_finite(big)
    assert all_finite(torch.zeros(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = torch.ones(4097, dtype=dtype)
        values[4096] = bad
        assert not all_finite(values)
        big[17] = bad
        assert not all_finite(big)
        big[17] = top
    assert all_finite(torch.tensor([top, -top], dtype=dtype))  # a sum that is exactly finite
    assert all_finite(torch.arange(10, dtype=torch.int64).to(torch.uint32))
