"""The institution daemon: connect out, poll, download, train, upload, evaluate, and
reconnect with backoff while the coordinator is away.

No model is used before its lineage record verifies with the coordinator's key (given
at Join, or pinned in the config) and names that model's version and SHA-256."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from google.protobuf import json_format
from safetensors.torch import load_file

from fedcollab import models
from fedcollab._faults import crash_point
from fedcollab._names import NAME, STUDY_NAME
from fedcollab._struct import integral
from fedcollab.compression import EncodingError, compression_from_proto
from fedcollab.config import InstitutionConfig
from fedcollab.errors import ConfigError, FedcollabError, RemoteError
from fedcollab.institution._backoff import Backoff
from fedcollab.institution._client import CoordinatorClient
from fedcollab.institution._data import load_local_data
from fedcollab.institution._data_check import DECLINE_REASON, DataSummary, data_problems, decline_message, summarize
from fedcollab.institution._error_feedback import with_error_feedback
from fedcollab.institution._kept_update import KeptUnavailable, KeptUpdates, OtherShape
from fedcollab.institution._notices import Notices
from fedcollab.institution._policy import check_task
from fedcollab.institution._protection import protection_note
from fedcollab.institution._secure import send_secure
from fedcollab.institution._trainer import (
    EvalResult,
    SyntheticTrainer,
    TorchTrainer,
    Trainer,
    pick_device,
)
from fedcollab.lineage import (
    LineageError,
    check_model,
    file_sha256,
    key_fingerprint,
    load_public_key,
    raw_public_key,
)
from fedcollab.privacy import (
    BudgetExhausted,
    InstitutionPrivacy,
    PrivacyError,
    RoundPrivacy,
    validate_model,
)
from fedcollab.privacy._dataset import dataset_key
from fedcollab.privacy._ledger import PrivacyLedger
from fedcollab.privacy._ledger_migrate import open_site_ledger
from fedcollab.secagg import SecAggError
from fedcollab.transport import channel_credentials_from
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.wire import stream_sha256, torch_dtype

log = logging.getLogger("fedcollab.institution")

# Refusals of who this institution is: retrying would only repeat them.
_FATAL = {
    "IDENTITY_MISMATCH": "Set institution.name to the name in this institution's certificate.",
    "CERTIFICATE_REVOKED": "Ask the federation operator for a new certificate (fedcollab pki request, then sign).",
    "CERTIFICATE_IDENTITY_INVALID": "Use a certificate issued by `fedcollab pki sign` for this institution.",
    "NO_CLIENT_CERTIFICATE": "Configure [tls] with this institution's certificate and key.",
    "INSTITUTION_ONLY": "This certificate is not an institution's; use the one issued for this institution.",
}

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

    # joined | trained | uploaded | declined | evaluated | rejected | refused | disconnected | failed | finished
    kind: str
    round: int = 0
    detail: str = ""
    study: str = ""  # once joined: the study's name and its planned rounds (a progress bar's total)
    total_rounds: int = 0


class InstitutionDaemon:
    """One institution. `credentials` are the gRPC channel credentials (TLS); None
    connects in plaintext, logged as a warning. When not given, `config.tls` is used.

    With `privacy`, every round trains with DP-SGD, and its spend is written to the
    institution's ledger, together with the update kept on disk, before the upload
    starts. The row names the round and the base model it trained from; when the
    coordinator asks again for that round on that base (a retried attempt after a failed
    quorum, a pause, a suspension or a coordinator restart; or this daemon's own restart
    mid-upload), the same update is re-sent instead of training again: releasing it twice
    reveals nothing new, so nothing is spent twice. Only a new round or a new base spends."""

    # How failures that repeat are told; InstitutionAgent shares its own with its daemons.
    notices: Notices | None = None

    def __init__(
        self,
        *,
        config: InstitutionConfig,
        trainer: Trainer,
        num_train_examples: int,
        credentials: grpc.ChannelCredentials | None = None,
        poll_wait_s: float = 10.0,
        on_event: Callable[[DaemonEvent], None] | None = None,
        privacy: InstitutionPrivacy | None = None,
        study: str = "",
        expect_name: str = "",
        data: DataSummary | None = None,
    ) -> None:
        """`study`: the study to join (empty: the coordinator's default study).
        `expect_name`: for the default study, the name it must answer with (empty: any).
        `data`: the trainer's data, checked against each study's model before a task
        trains (None: not checked, e.g. the synthetic trainer's)."""
        self.config = config
        self._join_study = study
        self._expect_name = expect_name
        self._policy = config.policy
        self._last_train_s: float | None = None  # this study's last round, for policy.max_train_seconds
        self.name = config.institution.name
        self._trainer = trainer
        self._num_train = num_train_examples
        self._data = data
        if credentials is None and config.tls is not None:
            credentials = channel_credentials_from(config.tls)
        self._client = CoordinatorClient(address=config.institution.coordinator, credentials=credentials,
                                         max_reconnect_backoff_s=config.reconnect.max_backoff_s)
        self._cache_dir = Path(config.institution.state_dir) / "models"
        self._kept = KeptUpdates(state_dir=Path(config.institution.state_dir))
        self.privacy = privacy
        self._poll_wait = poll_wait_s
        self._on_event = on_event
        self._session: str | None = None
        self._study: pb.StudyInfo | None = None
        self._protection_said: str | None = None  # the study whose first update had its protection said
        self._heartbeat_s = 2.0
        self._model: torch.nn.Module | None = None
        self._lineage_key: bytes | None = None  # the coordinator's, from Join
        self._pinned_key: bytes | None = None
        if config.institution.lineage_public_key is not None:
            try:
                self._pinned_key = raw_public_key(load_public_key(config.institution.lineage_public_key))
            except LineageError as e:
                raise ConfigError(f"institution.lineage_public_key: {e.message}") from None

    @property
    def num_train_examples(self) -> int:
        return self._num_train

    # --------------------------------------------------------------- main loop
    def run(self, *, stop: threading.Event | None = None) -> bool:
        """Serve the study until it is finished (True) or `stop` is set (False)."""
        stop = stop or threading.Event()
        rc = self.config.reconnect
        backoff = Backoff(initial_s=rc.initial_backoff_s, max_s=rc.max_backoff_s)
        notices = self.notices or Notices(logger=log, name=self.name)
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
                    notices.cleared()
                    if task.kind == pb.TASK_KIND_FINISHED:
                        # No version will be asked for again: a partial download (a
                        # daemon killed mid-download) would otherwise stay for good.
                        for part in self._cache_dir.glob("*.part"):
                            part.unlink(missing_ok=True)
                        self._kept.drop()  # no round of this study will be asked for again
                        self._emit("finished")
                        log.info("%s: study finished", self.name)
                        return True
                    if task.kind == pb.TASK_KIND_TRAIN:
                        self._train(task)
                    elif task.kind == pb.TASK_KIND_EVALUATE:
                        self._evaluate(task)
                except LineageError as e:
                    # A coordinator or a model this institution does not trust: refuse it, go on.
                    delay = backoff.next_delay()
                    self._emit("refused", detail=f"{e.reason}: {e.message}")
                    log.error("%s: %s: %s; polling again in %.1fs", self.name, e.reason, e.message, delay)
                    stop.wait(delay)
                except RemoteError as e:
                    if e.reason in _FATAL:
                        # Retrying cannot help: the certificate or its configuration is wrong.
                        self._emit("refused", detail=f"{e.reason}: {e.message}")
                        raise FedcollabError(f"{self.name}: the coordinator refuses this institution: {e.reason}: "
                                             f"{e.message}. {_FATAL[e.reason]}") from None
                    if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "RATE_LIMITED":
                        delay = max(backoff.next_delay(), 2.0)
                        log.info("%s: rate limited; retrying in %.1fs", self.name, delay)
                        stop.wait(delay)
                    elif e.reason == "SESSION_UNKNOWN":
                        log.info("%s: session no longer known (coordinator restarted?); joining again", self.name)
                        self._session = None
                    elif e.code in _TRANSIENT:
                        delay = backoff.next_delay()
                        self._emit("disconnected", detail=f"{e.code.name}: {e.message}")
                        notices.failed(e.code.name, f"coordinator unreachable ({e.code.name}: {e.message})",
                                       retry_s=delay)
                        stop.wait(delay)
                    elif self._session is None or e.code == grpc.StatusCode.PERMISSION_DENIED:
                        # Who this institution is was refused (INSTITUTION_SUSPENDED, _NOT_APPROVED):
                        # the operator may change that, so wait with backoff, and say it once.
                        delay = backoff.next_delay()
                        self._emit("rejected", detail=f"{e.reason}: {e.message}")
                        notices.failed(e.reason or e.code.name, str(e), retry_s=delay)
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
        while True:
            # Before the first Join there is no session and no interval yet: look again
            # soon. Waiting the 2 s default instead put the first beat up to 2 s after the
            # Join, and a lease of under 2 s then expired while round 1 trained.
            if halt.wait(self._heartbeat_s if self._session is not None else 0.05) or stop.is_set():
                return
            session = self._session
            if session is None:
                continue
            try:
                # A beat the coordinator is slow to answer must not hold up the next ones:
                # it gives up after a few intervals (the lease is several of them).
                self._client.heartbeat(session_id=session, timeout_s=max(1.0, 3 * self._heartbeat_s))
            except RemoteError as e:
                log.debug("%s: heartbeat failed: %s", self.name, e)

    def _join(self) -> None:
        response = self._client.join(institution=self.name, num_train_examples=self._num_train,
                                     study=self._join_study)
        self._check_study_name(response.study.name)
        self._lineage_key = self._checked_lineage_key(bytes(response.lineage_public_key))
        if self._study is not None and response.study.SerializeToString() != self._study.SerializeToString():
            self._model = None  # another study: rebuild the model
        self._session, self._study = response.session_id, response.study
        self._heartbeat_s = max(0.05, response.heartbeat_interval_seconds or 2.0)
        self._emit("joined")
        log.info("%s: joined study %r", self.name, response.study.name)

    def expect_study(self, name: str) -> None:
        """The default study's name as the site accepted it: a Join answered for another is refused."""
        self._expect_name = name

    def _check_study_name(self, name: str) -> None:
        """The study's name keys its spend in the site's ledger: it must be the one this
        daemon was started for (the one the site's policy accepted), and a name at all."""
        expected = self._join_study or self._expect_name
        if expected and name != expected:
            raise LineageError(f"asked to join study {expected!r}, the coordinator answered for {name[:80]!r}: "
                               "not joining", reason="STUDY_MISMATCH")
        if not (STUDY_NAME if self._join_study else NAME).fullmatch(name):
            raise LineageError(f"the coordinator named its study {name[:80]!r}, which is no study name: not joining",
                               reason="STUDY_NAME_INVALID")

    def _checked_lineage_key(self, key: bytes) -> bytes:
        if len(key) != 32:
            raise LineageError(f"the coordinator sent no usable lineage public key ({len(key)} bytes), so its models "
                               "cannot be verified: not joining", reason="LINEAGE_KEY_MISSING")
        if self._pinned_key is not None and key != self._pinned_key:
            raise LineageError(f"the coordinator's lineage key {key_fingerprint(key)} is not the pinned "
                               f"{key_fingerprint(self._pinned_key)} (institution.lineage_public_key): not joining",
                               reason="LINEAGE_KEY_MISMATCH")
        if self._lineage_key is not None and key != self._lineage_key:
            log.warning("%s: the coordinator's lineage key changed from %s to %s; pin one with "
                        "institution.lineage_public_key to refuse such a change", self.name,
                        key_fingerprint(self._lineage_key), key_fingerprint(key))
        return key

    # --------------------------------------------------------------- tasks
    def _verified(self, ref: pb.ModelRef) -> dict[str, object]:
        """The model's lineage record, once it verifies and names this version and SHA-256."""
        if self._lineage_key is None:
            raise LineageError("no lineage key from the coordinator yet", reason="LINEAGE_KEY_MISSING")
        try:
            return check_model(record_bytes=ref.lineage_record, signature=ref.lineage_signature,
                               public_key=self._lineage_key, version=ref.version, sha256=ref.sha256)
        except LineageError as e:
            raise LineageError(f"refused model v{ref.version} ({ref.sha256[:12]}..): {e.message}",
                               reason=e.reason) from None

    def _load_model(self, ref: pb.ModelRef) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        record = self._verified(ref)  # before the download: a refused model is not even fetched
        path = self._client.download(session_id=self._session or "", model=ref, cache_dir=self._cache_dir)
        # A cached file is hashed again (the file used must be the file signed); one this
        # call just downloaded was hashed as it arrived and matched ref.sha256.
        fresh = self._client.just_verified == path and ref.sha256 == record["model_sha256"]
        actual = ref.sha256 if fresh else file_sha256(path)
        if actual != record["model_sha256"]:
            path.unlink(missing_ok=True)
            raise LineageError(f"refused model v{ref.version}: the file's SHA-256 is {actual[:16]}.., its signed "
                               f"record says {str(record['model_sha256'])[:16]}..")
        evict_cache(self._cache_dir, keep=path)
        assert self._study is not None
        state = load_file(str(path))
        if self._model is None:
            spec = self._study.model
            try:
                params = integral(json_format.MessageToDict(spec.params))
                model = models.build_model_to_load(kind=spec.kind, params=params, state_names=state)
            except (ValueError, ImportError) as e:
                # The coordinator built this model, so it is this machine that cannot, e.g. a
                # lora_transformer whose frozen base hashes otherwise here: refused, and declined at once.
                raise LineageError(f"refused model v{ref.version}: cannot build the study's {spec.kind!r} model "
                                   f"here: {e}", reason="MODEL_BUILD_FAILED") from None
            if self.privacy is not None:
                validate_model(model)
            self._model = model
        self._model.load_state_dict(state, strict=True)
        return self._model, state

    def _train(self, task: pb.Task) -> None:
        assert self._study is not None
        study = self._study.name
        allowed = check_task(self._policy, task, last_train_seconds=self._last_train_s)
        if not allowed.accept:  # the site's limits hold whatever the coordinator asks
            self._decline(task, allowed.reason, allowed.message)
            return
        if problem := self._data_problem():  # before spending: data the model cannot take is declined
            self._decline(task, DECLINE_REASON, problem)
            return
        try:  # before training or spending: an encoding this daemon cannot produce is declined
            compression_from_proto(task.compression)
        except EncodingError as e:
            self._decline(task, "COMPRESSION_UNSUPPORTED", e.message)
            return
        rp: RoundPrivacy | None = None
        if self.privacy is not None:
            if self._resend_recorded(task):
                return
            try:
                rp = self.privacy.plan(study=study, total_rounds=int(self._study.total_rounds),
                                       round_number=task.round, nonce=task.nonce,
                                       epochs=int(task.train.local_epochs), batch_size=int(task.train.batch_size),
                                       base_sha256=task.model.sha256)
            except BudgetExhausted as e:
                self._decline(task, "BUDGET_EXHAUSTED", str(e), spent=e.spent)
                return
            except PrivacyError as e:
                self._decline(task, "PRIVACY_SETTINGS_INVALID", str(e))
                return
        try:
            model, base = self._load_model(task.model)
        except PrivacyError as e:
            self._decline(task, "MODEL_NOT_PRIVATE_TRAINABLE", str(e))
            return
        except LineageError as e:
            try:  # tell the coordinator at once rather than at the round's deadline
                self._decline(task, e.reason, e.message)
            except RemoteError as declined:
                log.warning("%s: could not decline round %d: %s", self.name, task.round, declined)
            raise
        started = time.monotonic()
        result = self._trainer.train(model=model, plan=task.train, round_number=task.round, privacy=rp)
        self._last_train_s = time.monotonic() - started
        crash_point("institution.trained")
        self._emit("trained", task.round, f"{result.metrics}")
        local = model.state_dict()
        deltas = []
        for spec in task.manifest.tensors:
            if spec.name not in local:
                raise RemoteError(code=grpc.StatusCode.FAILED_PRECONDITION, reason="MANIFEST_UNKNOWN_TENSOR",
                                  message=f"the task names tensor {spec.name!r} that the model does not have")
            delta = local[spec.name].detach().to("cpu") - base[spec.name]
            deltas.append(delta.to(torch_dtype(spec.dtype)).contiguous())
        deltas = with_error_feedback(state_dir=Path(self.config.institution.state_dir), study=study, task=task,
                                     deltas=deltas)  # top-k: the residual of earlier rounds in, the unsent kept
        spend = None
        if rp is not None:
            assert self.privacy is not None
            self._kept.keep(task, deltas, num_examples=result.num_examples, metrics=result.metrics)
            try:
                entry = self.privacy.record(rp, update_sha256=stream_sha256(deltas).hex())  # durable before it leaves
            except BudgetExhausted as e:
                # Another study spent the rest of the site's budget while this one trained:
                # nothing was recorded, so nothing may leave.
                self._kept.drop()
                self._decline(task, "BUDGET_EXHAUSTED", str(e), spent=e.spent)
                return
            spend = _spend_message(rp, entry.epsilon)
        self._send(task, deltas, num_examples=result.num_examples, metrics=result.metrics, privacy=spend)

    def _send(self, task: pb.Task, deltas: list[torch.Tensor], *, num_examples: int, metrics: dict[str, float],
              privacy: pb.PrivacySpend | None, resent: bool = False) -> None:
        self._say_protection(task)
        started = time.monotonic()
        if task.HasField("secure_aggregation"):
            try:
                sent = send_secure(client=self._client, session_id=self._session or "", name=self.name, task=task,
                                   deltas=deltas, num_examples=num_examples, metrics=metrics, privacy=privacy,
                                   wait_s=self._poll_wait, tls=self.config.tls)
            except SecAggError as e:
                # The coordinator asked for a step this institution must not take: leave the round.
                self._emit("refused", task.round, f"{e.reason}: {e.message}")
                log.error("%s: round %d: secure aggregation: %s: %s", self.name, task.round, e.reason, e.message)
                with contextlib.suppress(RemoteError):
                    self._decline(task, e.reason, e.message)
                return
        else:
            sent = self._client.upload(session_id=self._session or "", task=task, deltas=deltas,
                                       num_examples=num_examples, metrics=metrics, privacy=privacy).bytes_received
        # The kept update stays (until the next one replaces it): if this attempt fails
        # at the coordinator, the retry of this round on this base is answered with it.
        # One line per round: what an operator watching the site's log wants to see move.
        spent = (f"epsilon {privacy.epsilon:.3f} of {privacy.budget_epsilon:.3f} spent in this study"
                 if privacy is not None and privacy.epsilon > 0 else "no DP-SGD")
        how = "masked update sent (secure aggregation)" if task.HasField("secure_aggregation") else "uploaded"
        detail = f"{num_examples} examples, {spent}, {how} {_size(sent)} in {time.monotonic() - started:.2f}s"
        log.info("%s: round %d: %s %s", self.name, task.round,
                 "re-sent the update already paid for, trained on" if resent else "trained on", detail)
        self._emit("uploaded", task.round, detail)

    def _say_protection(self, task: pb.Task) -> None:
        """Without DP-SGD here: once per study, before its first update leaves, what
        protects it (distributed DP) or that nothing does."""
        study = self._study.name if self._study is not None else ""
        if self.privacy is None and self._protection_said != study:
            self._protection_said = study
            level, message = protection_note(task)
            log.log(level, "%s: study %r: %s", self.name, study, message)

    # ------------------------------------------------------------ privacy
    def _decline(self, task: pb.Task, reason: str, message: str, *, spent: float | None = None) -> None:
        privacy = None
        if spent is not None and self.privacy is not None:
            c = self.privacy.config
            limit = self.privacy.study_limit(self._study.name) if self._study is not None else c.budget
            privacy = pb.PrivacySpend(epsilon=spent, delta=c.target_delta, budget_epsilon=limit,
                                      accountant=c.accountant, max_grad_norm=c.max_grad_norm)
        log.warning("%s: declined round %d: %s: %s", self.name, task.round, reason, message)
        self._client.decline(session_id=self._session or "", task=task, reason=reason, message=message,
                             privacy=privacy)
        self._emit("declined", task.round, f"{reason}: {message}")

    def _resend_recorded(self, task: pb.Task) -> bool:
        """True if this assignment (this round, on this base model) is already paid for in
        the ledger and its update was re-sent; training again would spend again."""
        assert self.privacy is not None and self._study is not None
        entry = self.privacy.recorded(study=self._study.name, round_number=task.round, nonce=task.nonce,
                                      base_sha256=task.model.sha256)
        if entry is None:
            return False
        try:
            kept = self._kept.load(task)
        except OtherShape:
            # The same round on the same base, asked for in another shape: the update
            # already released is the answer, and training again would spend again.
            self._decline(task, "TASK_CHANGED", f"round {task.round} on this base model was already trained and "
                          f"paid for (ledger row {entry.seq}); this attempt asks for other tensors, so the update "
                          "already released cannot answer it and none is trained again")
            return True
        except KeptUnavailable as e:
            log.warning("%s: round %d was already paid for (ledger row %d) but its update is gone (%s); "
                        "training again spends again", self.name, task.round, entry.seq, e)
            return False
        if stream_sha256(kept.deltas).hex() != entry.update_sha256:
            log.warning("%s: kept update for round %d does not match the ledger; training again", self.name, task.round)
            return False
        log.info("%s: round %d on this base model is already paid for (ledger row %d, epsilon %.3f); re-sending "
                 "the same update, spending nothing", self.name, task.round, entry.seq, entry.epsilon)
        self._emit("resent", task.round, f"ledger row {entry.seq}")
        c = self.privacy.config
        spend = pb.PrivacySpend(
            epsilon=entry.epsilon, delta=entry.delta, budget_epsilon=entry.budget_epsilon,
            noise_multiplier=entry.noise_multiplier, sample_rate=entry.sample_rate, steps=entry.steps,
            accountant=entry.accountant, max_grad_norm=c.max_grad_norm,
        )
        self._send(task, kept.deltas, num_examples=kept.num_examples, metrics=kept.metrics, privacy=spend,
                   resent=True)
        return True

    def _data_problem(self) -> str:
        """Why this site's data cannot train the study's model ('' if it can)."""
        if self._data is None or self._study is None:
            return ""
        spec = self._study.model
        problems = data_problems(data=self._data, kind=spec.kind,
                                 params=integral(json_format.MessageToDict(spec.params)))
        return decline_message(problems)

    def _evaluate(self, task: pb.Task) -> None:
        if problem := self._data_problem():
            # Reported as evaluating nothing (like a site without held-out data) rather
            # than failing in the model's forward pass at every round.
            log.warning("%s: round %d: not evaluating: %s", self.name, task.round, problem)
            result = EvalResult(0, 0.0, 0.0)
        else:
            model, _ = self._load_model(task.model)
            result = self._trainer.evaluate(model=model)
        self._client.report_evaluation(pb.ReportEvaluationRequest(
            session_id=self._session or "", round=task.round, nonce=task.nonce, model_sha256=task.model.sha256,
            num_examples=result.num_examples, loss=result.loss, accuracy=result.accuracy,
        ))
        self._emit("evaluated", task.round, f"loss={result.loss:.4f} accuracy={result.accuracy:.4f}")

    def _emit(self, kind: str, round_number: int = 0, detail: str = "") -> None:
        if self._on_event is not None:
            study = self._study
            self._on_event(DaemonEvent(kind, round_number, detail, study=study.name if study else "",
                                       total_rounds=int(study.total_rounds) if study else 0))


def _size(n: int) -> str:
    """Bytes for a log line: 812 B, 4.7 KiB, 19.1 MiB."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def evict_cache(cache_dir: Path, *, keep: Path) -> None:
    """Keeps the two newest versions: `keep` (the current base) and the one before it.
    Partial downloads go too: one is resumed only if the same version is asked for
    again, and once a newer version is in hand an older one never is (left behind by a
    daemon killed mid-download, each would hold up to a whole model's bytes for good)."""
    files = sorted(cache_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [f for f in files if f != keep][1:]:
        old.unlink(missing_ok=True)
    for part in cache_dir.glob("*.part"):
        part.unlink(missing_ok=True)


def daemon_from_config(
    config: InstitutionConfig,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    on_event: Callable[[DaemonEvent], None] | None = None,
    wrap_trainer: Callable[[Trainer], Trainer] | None = None,
    study: str = "",
    ledger: PrivacyLedger | None = None,
    expect_name: str = "",
) -> InstitutionDaemon:
    """The daemon as `fedcollab institution run` builds it: data, trainer and all.
    `wrap_trainer` lets a simulation put a poisoned institution's trainer around it.
    `ledger`: the site's privacy ledger, shared by the daemons of all its studies
    (InstitutionAgent); without it, the one at the top of config's state_dir."""
    trainer: Trainer
    privacy: InstitutionPrivacy | None = None
    data: DataSummary | None = None
    if config.institution.threads:
        torch.set_num_threads(config.institution.threads)
    cap = config.policy.max_gpu_memory_gb
    if cap is not None and pick_device(config.institution.device).type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), 0)
    if config.institution.trainer == "synthetic":
        trainer = SyntheticTrainer(seed=zlib.crc32(config.institution.name.encode()))
        num_train = 1
    else:
        assert config.data is not None  # enforced by InstitutionConfig
        train, val = load_local_data(config.data)
        state_dir = Path(config.institution.state_dir)
        mode = config.privacy.grad_sample_mode if config.privacy is not None else "auto"
        trainer = TorchTrainer(train=train, val=val, device=pick_device(config.institution.device),
                               seed=config.data.seed, grad_sample_mode=mode, cache_dir=state_dir)
        num_train = len(train)
        data = summarize(train, val)
        if config.privacy is not None:
            key = dataset_key(config.data)
            if ledger is None:
                ledger = open_site_ledger(state_dir, dataset=key, site_budget=config.privacy.budget)
            privacy = InstitutionPrivacy(config=config.privacy, ledger=ledger, num_examples=num_train, dataset=key,
                                         study_budgets=config.policy.budgets)
        # Without [privacy], the daemon says what protects the updates (distributed DP,
        # or nothing: a warning) at each study's first upload, when the study's task tells.
    if wrap_trainer is not None:
        trainer = wrap_trainer(trainer)
    return InstitutionDaemon(config=config, trainer=trainer, num_train_examples=num_train,
                             credentials=credentials, on_event=on_event, privacy=privacy, study=study,
                             expect_name=expect_name, data=data)


def _spend_message(rp: RoundPrivacy, epsilon: float) -> pb.PrivacySpend:
    """What the coordinator hears: the study's own spend (what its model discloses), as recorded."""
    return pb.PrivacySpend(
        epsilon=epsilon, delta=rp.delta, budget_epsilon=rp.budget, noise_multiplier=rp.noise_multiplier,
        sample_rate=rp.sample_rate, steps=rp.steps, accountant=rp.accountant, max_grad_norm=rp.max_grad_norm,
    )
