"""A study's compression on the wire (fedcollab.v1.Compression), both ways, and the
coordinator's check that an upload is encoded the study's way."""

from __future__ import annotations

from pydantic import ValidationError

from fedcollab.compression._errors import EncodingError
from fedcollab.config import CompressionConfig
from fedcollab.v1 import coordinator_service_pb2 as pb

_TO_WIRE = {
    "none": pb.COMPRESSION_METHOD_NONE,
    "fp16": pb.COMPRESSION_METHOD_FP16,
    "bf16": pb.COMPRESSION_METHOD_BF16,
    "int8": pb.COMPRESSION_METHOD_INT8,
    "topk": pb.COMPRESSION_METHOD_TOPK,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}
_FROM_WIRE[pb.COMPRESSION_METHOD_UNSPECIFIED] = "none"  # peers that predate compression


def compression_to_proto(config: CompressionConfig) -> pb.Compression:
    """Only the settings of the chosen method are set, so equal encodings are equal messages."""
    message = pb.Compression(method=_TO_WIRE[config.method])
    if config.method == "int8":
        message.block_elements = config.block_elements
    elif config.method == "topk":
        message.topk_fraction = config.topk_fraction
    return message


def compression_from_proto(message: pb.Compression) -> CompressionConfig:
    """The encoding a task asks for; EncodingError (ENCODING_INVALID) if it names an
    unknown method or settings out of range."""
    method = _FROM_WIRE.get(message.method)
    if method is None:
        raise EncodingError("ENCODING_INVALID", f"unknown compression method {message.method}: this fedcollab is "
                            "older than its peer's; upgrade it", method=message.method)
    settings: dict[str, object] = {"method": method}
    if method == "int8":
        settings["block_elements"] = message.block_elements
    elif method == "topk":
        settings["topk_fraction"] = message.topk_fraction
    try:
        return CompressionConfig.model_validate(settings)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'compression'}: {err['msg']}" for err in e.errors())
        raise EncodingError("ENCODING_INVALID", f"invalid compression settings: {problems}") from None


def describe(message: pb.Compression) -> str:
    method = _FROM_WIRE.get(message.method, f"unknown method {message.method}")
    if message.block_elements:
        method += f" (block_elements={message.block_elements})"
    if message.topk_fraction:
        method += f" (topk_fraction={message.topk_fraction:g})"
    return method


def check_encoding(got: pb.Compression, *, expected: CompressionConfig) -> None:
    """The header's encoding must be exactly the study's (ENCODING_MISMATCH)."""
    normalized = pb.Compression()
    normalized.CopyFrom(got)
    if normalized.method == pb.COMPRESSION_METHOD_UNSPECIFIED:
        normalized.method = pb.COMPRESSION_METHOD_NONE
    want = compression_to_proto(expected)
    if normalized != want:
        raise EncodingError("ENCODING_MISMATCH", f"the update is encoded as {describe(got)}, the study sends "
                            f"updates as {describe(want)}: encode it as the task's `compression` says",
                            got=describe(got), expected=describe(want))
