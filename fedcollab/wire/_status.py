"""google.rpc.Status with one ErrorInfo (AIP-193), both ways."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from fedcollab.errors import Rejected, RemoteError

ERROR_DOMAIN = "fedcollab.dev"

# A status travels in the trailers: its message as grpc-message (percent-encoded, so up
# to 3 bytes per byte) and again, with the ErrorInfo, in grpc-status-details-bin.
# Clients refuse trailers above gRPC's default 8 KiB (grpc.max_metadata_size) and
# report RESOURCE_EXHAUSTED instead of the status. Messages and metadata often quote
# what the caller sent (a name, a shape), so both are clipped to stay well below.
MAX_MESSAGE_BYTES = 1024
MAX_METADATA_VALUE_BYTES = 256
MAX_METADATA_ENTRIES = 8


def _clip(text: str, limit: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


def to_grpc_status(error: Rejected) -> grpc.Status:
    metadata = {
        _clip(k, 64): _clip(v, MAX_METADATA_VALUE_BYTES)
        for k, v in list(error.metadata.items())[:MAX_METADATA_ENTRIES]
    }
    info = error_details_pb2.ErrorInfo(reason=_clip(error.reason, 64), domain=ERROR_DOMAIN, metadata=metadata)
    status = status_pb2.Status(code=error.code.value[0], message=_clip(error.message, MAX_MESSAGE_BYTES))
    status.details.add().Pack(info)
    return rpc_status.to_status(status)


def from_rpc_error(error: grpc.RpcError) -> RemoteError:
    """The reason a call failed; transport failures get the reason "TRANSPORT"."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    reason = "TRANSPORT"
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        status = None
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                reason = info.reason
                break
    return RemoteError(code=code, reason=reason, message=message or "")
