"""The wire format: tensors as dtype/shape/raw bytes, chunked and hashed."""

from fedcollab.wire._status import ERROR_DOMAIN, from_rpc_error, to_grpc_status
from fedcollab.wire._tensors import (
    TensorPiece,
    TensorStreamDecoder,
    all_finite,
    iter_chunks,
    iter_stream,
    manifest_nbytes,
    manifest_of,
    spec_nbytes,
    spec_numel,
    stream_sha256,
    tensors_from_stream,
    torch_dtype,
    wire_dtype,
)

__all__ = [
    "ERROR_DOMAIN",
    "TensorPiece",
    "TensorStreamDecoder",
    "all_finite",
    "from_rpc_error",
    "iter_chunks",
    "iter_stream",
    "manifest_nbytes",
    "manifest_of",
    "spec_nbytes",
    "spec_numel",
    "stream_sha256",
    "tensors_from_stream",
    "to_grpc_status",
    "torch_dtype",
    "wire_dtype",
]
