"""gRPC servicer: thin. It translates requests to the round engine and the engine's
`Rejected` errors to google.rpc.Status; an unexpected error in one call becomes
INTERNAL for that call only."""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from fedcollab.coordinator._auth import RateLimiter, caller_of
from fedcollab.coordinator._checkpoints import read_pieces
from fedcollab.coordinator._engine import RoundEngine
from fedcollab.errors import Rejected
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import to_grpc_status

log = logging.getLogger("fedcollab.coordinator")
F = TypeVar("F", bound=Callable[..., Any])
# Chunk digests kept for downloads: 32 bytes each, ~8 models of 1B parameters in 4 MiB chunks.
_MAX_CACHED_DIGESTS = 8192


def _translated(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: CoordinatorServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Rejected as e:
            context.abort_with_status(to_grpc_status(e))
        except Exception:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error at the coordinator")

    return wrapper  # type: ignore[return-value]


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """Under mutual TLS the interceptor (_auth.py) has already verified the caller: Join
    takes the institution's name from its certificate, and every call that names a
    session must come from the institution that owns it."""

    def __init__(self, *, engine: RoundEngine, join_rate: float = 1.0, join_burst: int = 10) -> None:
        self._engine = engine
        self._joins = RateLimiter(rate=join_rate, burst=join_burst)
        self._digests: dict[tuple[str, int, int], bytes] = {}
        self._digests_lock = threading.Lock()

    def _chunk_digest(self, model_sha256: str, offset: int, data: bytes) -> bytes:
        """Every institution downloads the same chunks of a version: each chunk's SHA-256
        is computed once (models are immutable, named by their hash). The whole file's
        hash, checked by the institution, still covers every byte it receives."""
        key = (model_sha256, offset, len(data))
        digest = self._digests.get(key)
        if digest is None:
            digest = hashlib.sha256(data).digest()
            with self._digests_lock:
                if len(self._digests) > _MAX_CACHED_DIGESTS:
                    self._digests.clear()
                self._digests[key] = digest
        return digest

    def _check_owner(self, context: grpc.ServicerContext, session_id: str) -> None:
        caller = caller_of(context)
        if caller is None:
            return  # plaintext rehearsal: no identity to check against
        owner = self._engine.touch(session_id)
        if owner != caller.name:
            raise Rejected(code=grpc.StatusCode.PERMISSION_DENIED, reason="SESSION_NOT_YOURS",
                           message=f"this session belongs to another institution, not to {caller.name!r}")

    @_translated
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        caller = caller_of(context)
        name = request.institution
        if caller is not None:
            if name and name != caller.name:
                raise Rejected(code=grpc.StatusCode.PERMISSION_DENIED, reason="IDENTITY_MISMATCH",
                               message=f"the certificate is {caller.name!r}'s; it cannot join as {name!r}")
            name = caller.name
        # Per certificate under mTLS; over plaintext the claimed name is all there is.
        key = caller.name if caller is not None else f"name:{name}"
        if not self._joins.allow(key):
            raise Rejected(code=grpc.StatusCode.RESOURCE_EXHAUSTED, reason="RATE_LIMITED",
                           message="too many Join calls: back off and retry in a few seconds",
                           metadata={"retry_after_seconds": "2"})
        session_id, study = self._engine.join(institution=name, num_train_examples=request.num_train_examples)
        return pb.JoinResponse(
            session_id=session_id,
            study=study,
            heartbeat_interval_seconds=self._engine.heartbeat_s,
            chunk_bytes=self._engine.chunk_bytes,
            max_chunk_bytes=self._engine.max_chunk_bytes,
            lineage_public_key=self._engine.lineage_public_key,
        )

    @_translated
    def PollTask(self, request: pb.PollTaskRequest, context: grpc.ServicerContext) -> pb.PollTaskResponse:
        wait = request.wait_seconds
        remaining = context.time_remaining()
        if remaining is not None:  # answer before the caller's deadline, with a margin
            wait = min(wait, max(remaining - 0.5, 0.0)) if wait > 0 else max(remaining - 0.5, 0.0)
        self._check_owner(context, request.session_id)
        task = self._engine.poll(session_id=request.session_id, wait_s=wait, is_active=context.is_active)
        return pb.PollTaskResponse(task=task)

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadModelResponse]:
        try:
            self._check_owner(context, request.session_id)
            model = self._engine.model_for_download(session_id=request.session_id, sha256=request.sha256)
            if not 0 <= request.offset <= model.size_bytes:
                raise Rejected(code=grpc.StatusCode.OUT_OF_RANGE, reason="OFFSET_OUT_OF_RANGE",
                               message=f"offset {request.offset} outside 0..{model.size_bytes}")
        except Rejected as e:
            context.abort_with_status(to_grpc_status(e))
        offset = request.offset
        for data in read_pieces(model.path, offset=offset, piece_bytes=self._engine.chunk_bytes):
            yield pb.DownloadModelResponse(
                chunk=tensor_pb2.Chunk(offset=offset, data=data, sha256=self._chunk_digest(model.sha256, offset, data)),
                total_bytes=model.size_bytes,
            )
            offset += len(data)
            self._engine.count_bytes_out(len(data))

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UploadUpdateRequest], context: grpc.ServicerContext
    ) -> pb.UploadUpdateResponse:
        upload = None
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="HEADER_MISSING",
                               message="an upload starts with exactly one header message")
            self._check_owner(context, first.header.session_id)
            upload = self._engine.start_upload(header=first.header)
            for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="UNEXPECTED_HEADER",
                                   message="only chunks may follow the header")
                self._engine.accept_chunk(upload, message.chunk)
            self._engine.finish_upload(upload)
            return pb.UploadUpdateResponse(bytes_received=upload.receiver.received)
        except Rejected as e:
            if upload is not None:
                self._engine.abort_upload(upload, reason=e.reason)
            context.abort_with_status(to_grpc_status(e))
        except grpc.RpcError:
            # The institution went away mid-stream: its partial update is dropped.
            if upload is not None:
                self._engine.abort_upload(upload, reason="UPLOAD_INTERRUPTED")
            context.abort(grpc.StatusCode.CANCELLED, "upload interrupted")
        except Exception:
            log.exception("UploadUpdate failed")
            if upload is not None:
                self._engine.abort_upload(upload, reason="INTERNAL")
            context.abort(grpc.StatusCode.INTERNAL, "internal error at the coordinator")
        raise AssertionError("unreachable")  # abort raises

    @_translated
    def ReportEvaluation(
        self, request: pb.ReportEvaluationRequest, context: grpc.ServicerContext
    ) -> pb.ReportEvaluationResponse:
        self._check_owner(context, request.session_id)
        self._engine.report_evaluation(request=request)
        return pb.ReportEvaluationResponse()

    @_translated
    def DeclineTask(self, request: pb.DeclineTaskRequest, context: grpc.ServicerContext) -> pb.DeclineTaskResponse:
        self._check_owner(context, request.session_id)
        self._engine.decline(request=request)
        return pb.DeclineTaskResponse()

    @_translated
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        self._check_owner(context, request.session_id)
        return pb.HeartbeatResponse(lease_seconds=self._engine.heartbeat(session_id=request.session_id))

    @_translated
    def SecAggPoll(self, request: pb.SecAggPollRequest, context: grpc.ServicerContext) -> pb.SecAggPollResponse:
        self._check_owner(context, request.session_id)
        return self._engine.secagg_poll(request=request, is_active=context.is_active)

    @_translated
    def SecAggSubmit(self, request: pb.SecAggSubmitRequest, context: grpc.ServicerContext) -> pb.SecAggSubmitResponse:
        self._check_owner(context, request.session_id)
        self._engine.secagg_submit(request=request)
        return pb.SecAggSubmitResponse()
