"""The institution daemon: connect out, poll, download, train, upload, evaluate, and
reconnect with backoff while the coordinator is away."""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from google.protobuf import json_format
from safetensors.torch import load_file

from fedcollab import models
from fedcollab.config import InstitutionConfig
from fedcollab.errors import RemoteError
from fedcollab.institution._backoff import Backoff
from fedcollab.institution._client import CoordinatorClient
from fedcollab.institution._data import load_local_data
from fedcollab.institution._trainer import SyntheticTrainer, TorchTrainer, Trainer, pick_device
from fedcollab.transport import channel_credentials_from
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.wire import torch_dtype

log = logging.getLogger("fedcollab.institution")

# Codes after which the coordinator may come back: wait and retry.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
}


@dataclass(frozen=True)
class DaemonEvent:
    """What the daemon just did, for observers (progress displays, tests)."""

    kind: str  # joined | trained | uploaded | evaluated | rejected | disconnected | finished
    round: int = 0
    detail: str = ""


class InstitutionDaemon:
    """One institution. `credentials` are the gRPC channel credentials (TLS); None
    connects in plaintext, logged as a warning. When not given, `config.tls` is used."""

    def __init__(
        self,
        *,
        config: InstitutionConfig,
        trainer: Trainer,
        num_train_examples: int,
        credentials: grpc.ChannelCredentials | None = None,
        poll_wait_s: float = 10.0,
        on_event: Callable[[DaemonEvent], None] | None = None,
    ) -> None:
        self.config = config
        self.name = config.institution.name
        self._trainer = trainer
        self._num_train = num_train_examples
        if credentials is None and config.tls is not None:
            credentials = channel_credentials_from(config.tls)
        self._client = CoordinatorClient(address=config.institution.coordinator, credentials=credentials)
        self._cache_dir = Path(config.institution.state_dir) / "models"
        self._poll_wait = poll_wait_s
        self._on_event = on_event
        self._session: str | None = None
        self._study: pb.StudyInfo | None = None
        self._heartbeat_s = 2.0
        self._model: torch.nn.Module | None = None


    @property
    def num_train_examples(self) -> int:
        return self._num_train

    # --------------------------------------------------------------- main loop
    def run(self, *, stop: threading.Event | None = None) -> bool:
        """Serve the study until it is finished (True) or `stop` is set (False)."""
        stop = stop or threading.Event()
        rc = self.config.reconnect
        backoff = Backoff(initial_s=rc.initial_backoff_s, max_s=rc.max_backoff_s)
        halt = threading.Event()  # ends the heartbeat thread with this call
        beat = threading.Thread(target=self._heartbeats, args=(stop, halt), name=f"heartbeat-{self.name}",
                                daemon=True)
        beat.start()
        try:
            while not stop.is_set():
                try:
                    if self._session is None:
                        self._join()
                    task = self._client.poll(session_id=self._session or "", wait_s=self._poll_wait)
                    backoff.reset()
                    if task.kind == pb.TASK_KIND_FINISHED:
                        self._emit("finished")
                        log.info("%s: study finished", self.name)
                        return True
                    if task.kind == pb.TASK_KIND_TRAIN:
                        self._train(task)
                    elif task.kind == pb.TASK_KIND_EVALUATE:
                        self._evaluate(task)
                except RemoteError as e:
                    if e.reason == "SESSION_UNKNOWN":
                        log.info("%s: session no longer known (coordinator restarted?); joining again", self.name)
                        self._session = None
                    elif e.code in _TRANSIENT:
                        delay = backoff.next_delay()
                        self._emit("disconnected", detail=f"{e.code.name}: {e.message}")
                        log.info("%s: coordinator unreachable (%s); retrying in %.1fs", self.name, e.code.name, delay)
                        stop.wait(delay)
                    else:
                        # The coordinator refused this step (e.g. ROUND_CLOSED): poll on.
                        self._emit("rejected", detail=f"{e.reason}: {e.message}")
                        log.warning("%s: %s", self.name, e)
                        stop.wait(0.2)
                except Exception as e:  # a failed task must not end the daemon
                    delay = backoff.next_delay()
                    self._emit("failed", detail=f"{type(e).__name__}: {e}")
                    log.exception("%s: task failed; polling again in %.1fs", self.name, delay)
                    stop.wait(delay)
            return False
        finally:
            halt.set()
            beat.join(timeout=5)
            self._client.close()

    def _heartbeats(self, stop: threading.Event, halt: threading.Event) -> None:
        while not halt.wait(self._heartbeat_s) and not stop.is_set():
            session = self._session
            if session is None:
                continue
            try:
                self._client.heartbeat(session_id=session)
            except RemoteError as e:
                log.debug("%s: heartbeat failed: %s", self.name, e)

    def _join(self) -> None:
        response = self._client.join(institution=self.name, num_train_examples=self._num_train)
        if self._study is not None and response.study.SerializeToString() != self._study.SerializeToString():
            self._model = None  # another study: rebuild the model
        self._session, self._study = response.session_id, response.study
        self._heartbeat_s = max(0.05, response.heartbeat_interval_seconds or 2.0)
        self._emit("joined")
        log.info("%s: joined study %r", self.name, response.study.name)

    # --------------------------------------------------------------- tasks
    def _load_model(self, ref: pb.ModelRef) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        path = self._client.download(session_id=self._session or "", model=ref, cache_dir=self._cache_dir)
        self._evict_cache(keep=path)
        assert self._study is not None
        if self._model is None:
            spec = self._study.model
            self._model = models.build_model(kind=spec.kind, params=_integral(json_format.MessageToDict(spec.params)))
        state = load_file(str(path))
        self._model.load_state_dict(state, strict=True)
        return self._model, state

    def _train(self, task: pb.Task) -> None:
        model, base = self._load_model(task.model)
        result = self._trainer.train(model=model, plan=task.train, round_number=task.round)
        self._emit("trained", task.round, f"{result.metrics}")
        local = model.state_dict()
        deltas = []
        for spec in task.manifest.tensors:
            if spec.name not in local:
                raise RemoteError(code=grpc.StatusCode.FAILED_PRECONDITION, reason="MANIFEST_UNKNOWN_TENSOR",
                                  message=f"the task names tensor {spec.name!r} that the model does not have")
            delta = local[spec.name].detach().to("cpu") - base[spec.name]
            deltas.append(delta.to(torch_dtype(spec.dtype)).contiguous())
        self._client.upload(session_id=self._session or "", task=task, deltas=deltas,
                            num_examples=result.num_examples, metrics=result.metrics)
        self._emit("uploaded", task.round)

    def _evaluate(self, task: pb.Task) -> None:
        model, _ = self._load_model(task.model)
        result = self._trainer.evaluate(model=model)
        self._client.report_evaluation(pb.ReportEvaluationRequest(
            session_id=self._session or "", round=task.round, nonce=task.nonce, model_sha256=task.model.sha256,
            num_examples=result.num_examples, loss=result.loss, accuracy=result.accuracy,
        ))
        self._emit("evaluated", task.round, f"loss={result.loss:.4f} accuracy={result.accuracy:.4f}")

    def _evict_cache(self, *, keep: Path) -> None:
        """Keep the two newest versions: the current base and the one before it."""
        files = sorted(self._cache_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in [f for f in files if f != keep][1:]:
            old.unlink(missing_ok=True)

    def _emit(self, kind: str, round_number: int = 0, detail: str = "") -> None:
        if self._on_event is not None:
            self._on_event(DaemonEvent(kind, round_number, detail))


def daemon_from_config(
    config: InstitutionConfig,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    on_event: Callable[[DaemonEvent], None] | None = None,
) -> InstitutionDaemon:
    """The daemon as `fedcollab institution run` builds it: data, trainer and all."""
    trainer: Trainer
    if config.institution.threads:
        torch.set_num_threads(config.institution.threads)
    if config.institution.trainer == "synthetic":
        trainer = SyntheticTrainer(seed=zlib.crc32(config.institution.name.encode()))
        num_train = 1
    else:
        assert config.data is not None  # enforced by InstitutionConfig
        train, val = load_local_data(config.data)
        trainer = TorchTrainer(train=train, val=val, device=pick_device(config.institution.device),
                               seed=config.data.seed)
        num_train = len(train)
    return InstitutionDaemon(config=config, trainer=trainer, num_train_examples=num_train,
                             credentials=credentials, on_event=on_event)


def _integral(value: object) -> object:
    """protobuf Struct stores every number as a double; give integers back their type."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value
