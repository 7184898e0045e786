"""The facade: encode an update, size it, and pick the decoder for a study's method."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedcollab.compression._base import UpdateDecoder
from fedcollab.compression._cast import CastDecoder, cast_nbytes, encode_cast
from fedcollab.compression._int8 import Int8Decoder, encode_int8, int8_nbytes
from fedcollab.compression._topk import TopkDecoder, encode_topk, topk_nbytes
from fedcollab.config import CompressionConfig
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import spec_numel

_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def encode_update(tensors: Sequence[torch.Tensor], *, compression: CompressionConfig) -> list[torch.Tensor]:
    """The encoded update as tensors whose raw bytes, concatenated, are the stream to
    send (fedcollab.wire.iter_chunks / stream_sha256 take them as they are). The
    tensors are the update in manifest order; "none" returns them unchanged."""
    method = compression.method
    if method == "none":
        return list(tensors)
    if method in _HALF:
        return encode_cast(tensors, dtype=_HALF[method])
    if method == "int8":
        return encode_int8(tensors, block=compression.block_elements)
    return encode_topk(tensors, fraction=compression.topk_fraction)


def encoded_nbytes(manifest: tensor_pb2.ModelManifest, *, compression: CompressionConfig) -> int:
    """The exact length of an update's encoded stream: what the header's total_bytes must say."""
    method = compression.method
    if method in ("none", *_HALF):
        return cast_nbytes(manifest, dtype=_HALF.get(method))
    if method == "int8":
        return sum(int8_nbytes(spec_numel(s), block=compression.block_elements) for s in manifest.tensors)
    return topk_nbytes(manifest, fraction=compression.topk_fraction)


def update_decoder(manifest: tensor_pb2.ModelManifest, *, compression: CompressionConfig) -> UpdateDecoder:
    method = compression.method
    if method in ("none", *_HALF):
        return CastDecoder(manifest=manifest, dtype=_HALF.get(method))
    if method == "int8":
        return Int8Decoder(manifest=manifest, block=compression.block_elements)
    return TopkDecoder(manifest=manifest, fraction=compression.topk_fraction)
