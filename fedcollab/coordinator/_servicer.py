"""gRPC servicer: thin. It translates requests to the round engine and the engine's
`Rejected` errors to google.rpc.Status; an unexpected error in one call becomes
INTERNAL for that call only."""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from fedcollab.coordinator._auth import RateLimiter, caller_of, check_not_revoked
from fedcollab.coordinator._checkpoints import read_pieces
from fedcollab.coordinator._consortium import Consortium
from fedcollab.coordinator._engine import RoundEngine
from fedcollab.coordinator._registry import published_model
from fedcollab.errors import Rejected
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import to_grpc_status

if TYPE_CHECKING:
    from fedcollab.coordinator._studies import Studies

log = logging.getLogger("fedcollab.coordinator")
F = TypeVar("F", bound=Callable[..., Any])
_REASON = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
# Chunk digests kept for downloads: 32 bytes each, ~8 models of 1B parameters in 4 MiB chunks.
_MAX_CACHED_DIGESTS = 8192


def translated(method: F) -> F:
    """A unary handler whose `Rejected` becomes its status; anything else INTERNAL for
    this call only."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Rejected as e:
            context.abort_with_status(to_grpc_status(e))
        except Exception:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, "internal error at the coordinator")

    return wrapper  # type: ignore[return-value]


def _revoked_instead(context: grpc.ServicerContext, e: Rejected) -> Rejected:
    """CERTIFICATE_REVOKED when that is why the call's round let it go."""
    try:
        check_not_revoked(context)
    except Rejected as revoked:
        return revoked
    return e


class _OneStudy:
    """The studies of a servicer built on one engine (tests, the fuzz harness)."""

    def __init__(self, engine: RoundEngine) -> None:
        self.engine, self.name, self.is_default, self.default = engine, engine.study.name, True, self

    def for_session(self, session_id: str) -> RoundEngine:
        return self.engine

    def for_join(self, name: str) -> _OneStudy:
        if name and name != self.name:
            raise Rejected(code=grpc.StatusCode.NOT_FOUND, reason="STUDY_UNKNOWN", message=f"no study {name!r}")
        return self

    def runs(self) -> list[_OneStudy]:
        return [self]

    def status(self, name: str) -> str:
        return "finished" if self.engine.finished else "running"


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """Under mutual TLS the interceptor (_auth.py) has already verified the caller: Join
    takes the institution's name from its certificate, and every call that names a
    session must come from the institution that owns it. Calls go to the study whose
    session they name; a suspended (or, with require_approval, not yet approved)
    institution is refused before anything else."""

    def __init__(self, *, studies: Studies | None = None, consortium: Consortium | None = None,
                 engine: RoundEngine | None = None, require_approval: bool = False,
                 join_rate: float = 1.0, join_burst: int = 10) -> None:
        if studies is None:
            assert engine is not None, "give studies (a coordinator's) or one engine"
        self._studies: Any = studies if studies is not None else _OneStudy(engine)  # type: ignore[arg-type]
        self._consortium = consortium
        self._require_approval = require_approval
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

    def _check_owner(self, context: grpc.ServicerContext, session_id: str) -> RoundEngine:
        """The engine of the session's study, once the caller is known to own it. No
        membership lookup per call: only a member gets a session, and suspending one
        drops its sessions (its next Join hears why)."""
        engine = self._studies.for_session(session_id)
        caller = caller_of(context)
        if caller is None:
            return engine  # plaintext rehearsal: no identity to check against
        if engine.touch(session_id) != caller.name:
            raise Rejected(code=grpc.StatusCode.PERMISSION_DENIED, reason="SESSION_NOT_YOURS",
                           message=f"this session belongs to another institution, not to {caller.name!r}")
        return engine

    def _check_member(self, name: str, *, joining: bool = False) -> None:
        """Refuses a suspended institution, and a pending one. Joining with
        require_approval off, a newcomer is recorded approved; with it on, pending."""
        if self._consortium is None:
            return
        row = self._consortium.membership(name)
        if row is None:
            if not joining:
                return
            row = self._consortium.set_membership(name, status="pending" if self._require_approval else "approved",
                                                  reason="first join", changed_by="coordinator")
        if row["status"] == "suspended":
            raise Rejected(code=grpc.StatusCode.PERMISSION_DENIED, reason="INSTITUTION_SUSPENDED",
                           message=f"{name} is suspended from this federation"
                                   + (f" ({row['reason']})" if row["reason"] else "")
                                   + ": ask its operator to approve it again",
                           metadata={"institution": name})
        if row["status"] == "pending":
            raise Rejected(code=grpc.StatusCode.PERMISSION_DENIED, reason="INSTITUTION_NOT_APPROVED",
                           message=f"{name} is not approved yet: the operator approves it with "
                                   f"`fedcollab institutions approve {name}`; retry then",
                           metadata={"institution": name, "retry_after_seconds": "30"})

    def _name_of(self, context: grpc.ServicerContext, claimed: str) -> str:
        caller = caller_of(context)
        if caller is None:
            return claimed  # plaintext: the claimed name is all there is
        if claimed and claimed != caller.name:
            raise Rejected(code=grpc.StatusCode.PERMISSION_DENIED, reason="IDENTITY_MISMATCH",
                           message=f"the certificate is {caller.name!r}'s; it cannot act as {claimed!r}")
        return caller.name

    @translated
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
        self._check_member(name, joining=True)
        engine = self._studies.for_join(request.study).engine
        session_id, study = engine.join(institution=name, num_train_examples=request.num_train_examples,
                                        serial=caller.serial if caller is not None else 0)
        return pb.JoinResponse(
            session_id=session_id,
            study=study,
            heartbeat_interval_seconds=engine.heartbeat_s,
            chunk_bytes=engine.chunk_bytes,
            max_chunk_bytes=engine.max_chunk_bytes,
            lineage_public_key=engine.lineage_public_key,
        )

    @translated
    def PollTask(self, request: pb.PollTaskRequest, context: grpc.ServicerContext) -> pb.PollTaskResponse:
        wait = request.wait_seconds
        remaining = context.time_remaining()
        if remaining is not None:  # answer before the caller's deadline, with a margin
            wait = min(wait, max(remaining - 0.5, 0.0)) if wait > 0 else max(remaining - 0.5, 0.0)
        engine = self._check_owner(context, request.session_id)
        task = engine.poll(session_id=request.session_id, wait_s=wait, is_active=context.is_active)
        return pb.PollTaskResponse(task=task)

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadModelResponse]:
        try:
            engine = self._check_owner(context, request.session_id)
            model = engine.model_for_download(session_id=request.session_id, sha256=request.sha256)
            if not 0 <= request.offset <= model.size_bytes:
                raise Rejected(code=grpc.StatusCode.OUT_OF_RANGE, reason="OFFSET_OUT_OF_RANGE",
                               message=f"offset {request.offset} outside 0..{model.size_bytes}")
        except Rejected as e:
            context.abort_with_status(to_grpc_status(e))
        offset = request.offset
        for data in read_pieces(model.path, offset=offset, piece_bytes=engine.chunk_bytes):
            yield pb.DownloadModelResponse(
                chunk=tensor_pb2.Chunk(offset=offset, data=data, sha256=self._chunk_digest(model.sha256, offset, data)),
                total_bytes=model.size_bytes,
            )
            offset += len(data)
            engine.count_bytes_out(len(data))

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UploadUpdateRequest], context: grpc.ServicerContext
    ) -> pb.UploadUpdateResponse:
        upload = None
        engine: RoundEngine | None = None
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="HEADER_MISSING",
                               message="an upload starts with exactly one header message")
            engine = self._check_owner(context, first.header.session_id)
            upload = engine.start_upload(header=first.header)
            for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="UNEXPECTED_HEADER",
                                   message="only chunks may follow the header")
                # The stream may outlast a revocation (checked when it opened): each
                # chunk, and the update before it counts, ask again (a stat() while the
                # CRL file is unchanged).
                check_not_revoked(context)
                engine.accept_chunk(upload, message.chunk)
            check_not_revoked(context)
            engine.finish_upload(upload)
            return pb.UploadUpdateResponse(bytes_received=upload.receiver.received)
        except Rejected as e:
            if e.reason in ("ROUND_CLOSED", "PARTICIPATION_ENDED"):
                e = _revoked_instead(context, e)  # the reload took it out of the round first
            if upload is not None and engine is not None:
                engine.abort_upload(upload, reason=e.reason)
            elif e.reason == "UPLOAD_STALLED":
                self._stalled_before_header(context)
            context.abort_with_status(to_grpc_status(e))
        except grpc.RpcError:
            # The institution went away mid-stream: its partial update is dropped.
            if upload is not None and engine is not None:
                engine.abort_upload(upload, reason="UPLOAD_INTERRUPTED")
            context.abort(grpc.StatusCode.CANCELLED, "upload interrupted")
        except Exception:
            log.exception("UploadUpdate failed")
            if upload is not None and engine is not None:
                engine.abort_upload(upload, reason="INTERNAL")
            context.abort(grpc.StatusCode.INTERNAL, "internal error at the coordinator")
        raise AssertionError("unreachable")  # abort raises

    def _stalled_before_header(self, context: grpc.ServicerContext) -> None:
        """An upload opened and sent no header in time. Under mutual TLS the caller is
        known: the round that waits for its update stops waiting. Only when one study
        does: with several, the stream named none, and failing the others would cut off
        updates still being trained. Over plaintext the stream names no one; the
        round's deadline stays the bound there."""
        caller = caller_of(context)
        if caller is None:
            return
        waiting = [run.engine for run in self._studies.runs() if run.engine.waits_for_upload(caller.name)]
        if len(waiting) == 1:
            waiting[0].fail_waiting_upload(institution=caller.name, reason="UPLOAD_STALLED")

    @translated
    def ReportEvaluation(
        self, request: pb.ReportEvaluationRequest, context: grpc.ServicerContext
    ) -> pb.ReportEvaluationResponse:
        engine = self._check_owner(context, request.session_id)
        engine.report_evaluation(request=request)
        return pb.ReportEvaluationResponse()

    @translated
    def DeclineTask(self, request: pb.DeclineTaskRequest, context: grpc.ServicerContext) -> pb.DeclineTaskResponse:
        engine = self._check_owner(context, request.session_id)
        engine.decline(request=request)
        return pb.DeclineTaskResponse()

    @translated
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        engine = self._check_owner(context, request.session_id)
        return pb.HeartbeatResponse(lease_seconds=engine.heartbeat(session_id=request.session_id))

    @translated
    def SecAggPoll(self, request: pb.SecAggPollRequest, context: grpc.ServicerContext) -> pb.SecAggPollResponse:
        engine = self._check_owner(context, request.session_id)
        return engine.secagg_poll(request=request, is_active=context.is_active)

    @translated
    def SecAggSubmit(self, request: pb.SecAggSubmitRequest, context: grpc.ServicerContext) -> pb.SecAggSubmitResponse:
        engine = self._check_owner(context, request.session_id)
        engine.secagg_submit(request=request)
        return pb.SecAggSubmitResponse()

    # ----------------------------------------------------------------- studies
    @translated
    def ListStudies(self, request: pb.ListOpenStudiesRequest, context: grpc.ServicerContext
                    ) -> pb.ListOpenStudiesResponse:
        name = self._name_of(context, "")
        if name:
            self._check_member(name)
        offers = []
        for run in self._studies.runs():
            status = self._studies.status(run.name)
            if status not in ("queued", "running", "paused"):
                continue
            study = run.engine.study
            offers.append(pb.StudyOffer(
                study=run.engine.study_info, status=status, local_epochs=study.train.local_epochs,
                strategy=study.strategy.name, secure_aggregation=study.secure_aggregation is not None,
                central_dp=study.central_dp is not None,
                is_default=run.is_default,
            ))
        return pb.ListOpenStudiesResponse(studies=offers)

    @translated
    def DeclineStudy(self, request: pb.DeclineStudyRequest, context: grpc.ServicerContext) -> pb.DeclineStudyResponse:
        name = self._name_of(context, request.institution)
        if not name:
            raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="INSTITUTION_MISSING",
                           message="name the institution that declines (over plaintext there is no certificate)")
        self._check_member(name)
        run = self._studies.get(request.study)
        if not _REASON.fullmatch(request.reason):
            raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_REASON",
                           message="a decline's reason is UPPER_SNAKE, at most 64 characters (e.g. STUDY_NOT_ACCEPTED)")
        if self._consortium is not None:
            self._consortium.record_decline(study=run.name, institution=name, reason=request.reason,
                                            message=request.message[:1024])
        log.info("%s declined study %s: %s %s", name, run.name, request.reason, request.message[:200])
        return pb.DeclineStudyResponse()

    # ----------------------------------------------------------------- model registry
    def _registry_caller(self, context: grpc.ServicerContext) -> None:
        name = self._name_of(context, "")
        if name:
            self._check_member(name)
        if self._consortium is None:
            raise Rejected(code=grpc.StatusCode.UNIMPLEMENTED, reason="NO_REGISTRY",
                           message="this coordinator keeps no model registry")

    @translated
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        self._registry_caller(context)
        assert self._consortium is not None
        if request.study:
            self._studies.get(request.study)
        models = []
        for row in self._consortium.publications(request.study):
            run = self._studies.get(row["study"])
            models.append(published_model(run, version=row["version"], consortium=self._consortium)[0])
        return pb.ListModelsResponse(models=models)

    def PullModel(self, request: pb.PullModelRequest, context: grpc.ServicerContext) -> Iterator[pb.PullModelResponse]:
        try:
            self._registry_caller(context)
            assert self._consortium is not None
            run = self._studies.get(request.study)
            info, model = published_model(run, version=request.version, consortium=self._consortium)
            if not 0 <= request.offset <= model.size_bytes:
                raise Rejected(code=grpc.StatusCode.OUT_OF_RANGE, reason="OFFSET_OUT_OF_RANGE",
                               message=f"offset {request.offset} outside 0..{model.size_bytes}")
        except Rejected as e:
            context.abort_with_status(to_grpc_status(e))
        yield pb.PullModelResponse(model=info)
        offset = request.offset
        for data in read_pieces(model.path, offset=offset, piece_bytes=run.engine.chunk_bytes):
            yield pb.PullModelResponse(chunk=tensor_pb2.Chunk(
                offset=offset, data=data, sha256=self._chunk_digest(model.sha256, offset, data)))
            offset += len(data)
            run.engine.count_bytes_out(len(data))
