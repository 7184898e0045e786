"""Typed calls to the coordinator: chunked downloads into a hash-addressed cache and
chunked, hashed uploads. gRPC errors become `RemoteError` with the coordinator's reason."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import torch

from fedcollab import __version__
from fedcollab._faults import crash_point
from fedcollab._names import SHA256_HEX
from fedcollab.compression import compression_from_proto, compression_to_proto, encode_update
from fedcollab.config import CompressionConfig
from fedcollab.errors import RemoteError
from fedcollab.transport import create_channel
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import from_rpc_error, iter_chunks, manifest_of, stream_sha256

# Largest chunk a coordinator may be configured to send (config.ServerConfig.chunk_bytes).
_MAX_CHUNK = 64 * 1024 * 1024


class CoordinatorClient:
    def __init__(
        self, *, address: str, credentials: grpc.ChannelCredentials | None, rpc_timeout_s: float = 30.0,
        max_reconnect_backoff_s: float = 30.0,
    ) -> None:
        self._channel = create_channel(address, credentials=credentials, chunk_bytes=_MAX_CHUNK,
                                       max_reconnect_backoff_s=max_reconnect_backoff_s)
        self._stub = pb_grpc.CoordinatorServiceStub(self._channel)
        self._timeout = rpc_timeout_s
        self.chunk_bytes = 1024 * 1024  # until Join says the coordinator's
        # The file the last download() wrote and hashed as it arrived (None: from the cache).
        self.just_verified: Path | None = None

    def close(self) -> None:
        self._channel.close()

    def join(self, *, institution: str, num_train_examples: int, study: str = "") -> pb.JoinResponse:
        response = self._call(
            self._stub.Join,
            pb.JoinRequest(institution=institution, num_train_examples=num_train_examples, client_version=__version__,
                           study=study),
        )
        self.chunk_bytes = int(response.chunk_bytes) or self.chunk_bytes
        return response

    def poll(self, *, session_id: str, wait_s: float) -> pb.Task:
        request = pb.PollTaskRequest(session_id=session_id, wait_seconds=wait_s)
        return self._call(self._stub.PollTask, request, timeout=wait_s + self._timeout).task

    def heartbeat(self, *, session_id: str, timeout_s: float | None = None) -> float:
        return self._call(self._stub.Heartbeat, pb.HeartbeatRequest(session_id=session_id),
                          timeout=timeout_s).lease_seconds

    def report_evaluation(self, request: pb.ReportEvaluationRequest) -> None:
        self._call(self._stub.ReportEvaluation, request)

    def list_models(self, *, study: str = "") -> list[pb.PublishedModel]:
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest(study=study)).models)

    def pull_model(self, *, study: str, version: int, offset: int = 0) -> Iterator[pb.PullModelResponse]:
        """The published version's description, then its file from `offset`, in chunks."""
        try:
            yield from self._stub.PullModel(pb.PullModelRequest(study=study, version=version, offset=offset),
                                            timeout=self._timeout + 600)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def list_studies(self) -> list[pb.StudyOffer]:
        return list(self._call(self._stub.ListStudies, pb.ListOpenStudiesRequest()).studies)

    def decline_study(self, *, institution: str, study: str, reason: str, message: str) -> None:
        self._call(self._stub.DeclineStudy, pb.DeclineStudyRequest(study=study, institution=institution, reason=reason,
                                                                   message=message[:1024]))

    def decline(self, *, session_id: str, task: pb.Task, reason: str, message: str,
                privacy: pb.PrivacySpend | None = None) -> None:
        self._call(self._stub.DeclineTask, pb.DeclineTaskRequest(
            session_id=session_id, round=task.round, nonce=task.nonce, reason=reason, message=message[:1024],
            privacy=privacy,
        ))

    def download(self, *, session_id: str, model: pb.ModelRef, cache_dir: Path) -> Path:
        """The model's safetensors file, from the cache or downloaded (resuming a partial
        file), verified chunk by chunk and as a whole against its SHA-256."""
        # fullmatch: the name becomes a file name, and `match` with '$' lets a trailing newline in.
        if not SHA256_HEX.fullmatch(model.sha256):
            raise RemoteError(code=grpc.StatusCode.INVALID_ARGUMENT, reason="BAD_MODEL_REF",
                              message=f"the coordinator named a model by {model.sha256[:80]!r}, not a SHA-256")
        final = cache_dir / f"{model.sha256}.safetensors"
        self.just_verified = None
        if final.is_file():
            return final
        cache_dir.mkdir(parents=True, exist_ok=True)
        part = cache_dir / f"{model.sha256}.part"
        digest = hashlib.sha256()
        offset = 0
        if part.is_file():
            with part.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    offset += len(block)
        request = pb.DownloadModelRequest(session_id=session_id, sha256=model.sha256, offset=offset)
        try:
            with part.open("ab") as out:
                for response in self._stub.DownloadModel(request, timeout=self._timeout + model.size_bytes / 1e6):
                    chunk = response.chunk
                    if chunk.offset != offset or hashlib.sha256(chunk.data).digest() != chunk.sha256:
                        part.unlink(missing_ok=True)
                        raise RemoteError(code=grpc.StatusCode.DATA_LOSS, reason="CHUNK_HASH_MISMATCH",
                                          message=f"model chunk at offset {chunk.offset} is corrupt; "
                                                  "retrying from scratch")
                    out.write(chunk.data)
                    digest.update(chunk.data)
                    offset += len(chunk.data)
                    crash_point("institution.download_chunk")
                out.flush()
                os.fsync(out.fileno())
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        if digest.hexdigest() != model.sha256:
            part.unlink(missing_ok=True)
            raise RemoteError(code=grpc.StatusCode.DATA_LOSS, reason="MODEL_HASH_MISMATCH",
                              message=f"downloaded model does not match SHA-256 {model.sha256}")
        os.replace(part, final)
        self.just_verified = final
        return final

    def upload(
        self,
        *,
        session_id: str,
        task: pb.Task,
        deltas: Sequence[torch.Tensor],
        num_examples: int,
        metrics: dict[str, float],
        privacy: pb.PrivacySpend | None = None,
        manifest: tensor_pb2.ModelManifest | None = None,
        compression: CompressionConfig | None = None,
    ) -> pb.UploadUpdateResponse:
        """`manifest` overrides the one of the task's tensors (masked updates).
        `compression` overrides the task's (a TRAIN task says how its update travels);
        `deltas` are the update itself, encoded here."""
        names = [s.name for s in task.manifest.tensors]
        if compression is None:
            compression = compression_from_proto(task.compression)
        encoded = encode_update(deltas, compression=compression)
        header = pb.UpdateHeader(
            session_id=session_id,
            round=task.round,
            nonce=task.nonce,
            base_version=task.model.version,
            manifest=manifest if manifest is not None else manifest_of(dict(zip(names, deltas, strict=True))),
            total_bytes=sum(e.numel() * e.element_size() for e in encoded),
            sha256=stream_sha256(encoded),
            num_examples=num_examples,
            metrics=metrics,
            privacy=privacy,
            encoding=compression_to_proto(compression),
        )

        def requests() -> Iterator[pb.UploadUpdateRequest]:
            yield pb.UploadUpdateRequest(header=header)
            for chunk in iter_chunks(encoded, chunk_bytes=self.chunk_bytes):
                yield pb.UploadUpdateRequest(chunk=chunk)
                crash_point("institution.upload_chunk")

        size = header.total_bytes
        return self._call(self._stub.UploadUpdate, requests(), timeout=self._timeout + size / 1e6)

    def secagg_submit(self, *, session_id: str, task: pb.Task, keys: pb.PeerKeys | None = None,
                      shares: pb.ShareKeysPayload | None = None, unmask: pb.UnmaskPayload | None = None,
                      consistency: pb.ConsistencyPayload | None = None) -> None:
        self._call(self._stub.SecAggSubmit, pb.SecAggSubmitRequest(
            session_id=session_id, round=task.round, nonce=task.nonce, keys=keys, shares=shares, unmask=unmask,
            consistency=consistency))

    def secagg_wait(self, *, session_id: str, task: pb.Task, stage: pb.SecAggStage,
                    wait_s: float) -> pb.SecAggPollResponse:
        """Long-polls until the inputs of `stage` are ready; the coordinator's refusal
        (this institution dropped from the round) comes as RemoteError."""
        while True:
            request = pb.SecAggPollRequest(session_id=session_id, round=task.round, nonce=task.nonce, stage=stage,
                                           wait_seconds=wait_s)
            response = self._call(self._stub.SecAggPoll, request, timeout=wait_s + self._timeout)
            if response.ready:
                return response

    def _call(self, method, request, *, timeout: float | None = None):  # type: ignore[no-untyped-def]
        try:
            return method(request, timeout=timeout or self._timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
