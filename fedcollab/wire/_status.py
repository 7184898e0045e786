"""google.rpc.Status with one ErrorInfo (AIP-193), both ways."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from fedcollab.errors import Rejected, RemoteError

ERROR_DOMAIN = "fedcollab.dev"


def to_grpc_status(error: Rejected) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
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
