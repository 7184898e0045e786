"""The round engine: who takes part, what each institution is asked to do, when a
round closes, and what gets committed. The gRPC servicer only translates to it.

Rounds: select online institutions -> TRAIN tasks -> uploads are verified and folded
into a streaming FedAvg -> close on all-done, deadline or stop -> commit if the quorum
of accepted updates holds -> EVALUATE tasks for the new model -> next round.
Failures of single institutions are recorded values, never exceptions that end a round.
Every committed version gets a lineage record signed with the state folder's Ed25519
key, stored with it in one transaction and handed out with every ModelRef.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import psutil
import torch
from google.protobuf import struct_pb2

from fedcollab import __version__, models
from fedcollab._faults import crash_point
from fedcollab._names import NAME
from fedcollab.aggregation._fedavg import AggregateOverflow
from fedcollab.compression import compression_to_proto
from fedcollab.config import FederationConfig, StudyConfig
from fedcollab.coordinator import _bounds
from fedcollab.coordinator._checkpoints import (
    ModelVersion,
    add_file_into,
    file_sha256,
    load_tensors,
    remove_orphans,
    stored_tensors,
    write_streaming,
)
from fedcollab.coordinator._masked_sum import MaskedSum
from fedcollab.coordinator._round_sum import NormOutOfBounds, RoundSum
from fedcollab.coordinator._secagg import ADVERTISE, CONSISTENCY, DONE, MASKED, SHARE, UNMASK, SecAggRound
from fedcollab.coordinator._store import Store
from fedcollab.coordinator._strategy import OptimizerStates, optimizer_for, robust_mean_deltas, robust_settings_for
from fedcollab.coordinator._upload import UploadReceiver, check_privacy_spend, spend_dict
from fedcollab.errors import ConfigError, Rejected
from fedcollab.lineage import (
    SIGNING_KEY_FILE,
    LineageError,
    build_record,
    canonical_bytes,
    check_model,
    load_or_create_signing_key,
    raw_public_key,
    record_path,
    sign_record,
    write_record_file,
)
from fedcollab.secagg import PeerVerifier, Quantizer, SecAggError, degree_for, threshold_for
from fedcollab.secagg._encode import masked_manifest
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import all_finite, spec_numel, wire_dtype

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedcollab.privacy import CentralDP
    from fedcollab.secagg._ddp import DistributedDPPlan

log = logging.getLogger("fedcollab.coordinator")

Evaluator = Callable[[Mapping[str, torch.Tensor]], dict[str, float]]
_REASON = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_OPEN = ("selected", "uploading")


@dataclass
class _Session:
    session_id: str
    institution: str
    last_seen: float
    serial: int = 0  # of the certificate it joined with (0: plaintext), dropped if revoked
    declared_examples: int = 0  # num_train_examples at Join: an update may claim no more


@dataclass
class _Participant:
    name: str
    nonce: str
    status: str = "selected"  # selected | uploading | done | declined | failed | vanished
    reason: str = ""
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    update_sha256: str = ""  # hex, of the accepted update


@dataclass
class _Round:
    number: int
    attempt: int
    base: ModelVersion
    participants: dict[str, _Participant]
    deadline: float
    total: RoundSum | MaskedSum
    opened: float
    closed: bool = False
    secagg: SecAggRound | None = None
    ddp: DistributedDPPlan | None = None


@dataclass(frozen=True)
class Upload:
    """An upload in progress: what the servicer hands back for each chunk."""

    receiver: UploadReceiver
    round: _Round
    institution: str
    weight: int = 0  # the example count it counts for, before the round's share cap


@dataclass
class _Evaluation:
    number: int
    model: ModelVersion
    nonces: dict[str, str]
    deadline: float
    reports: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    closed: bool = False


class _NotCommitted(Exception):
    """The round's aggregate cannot become a model version; the round fails."""


@dataclass(frozen=True)
class RoundResult:
    """What one round did; given to observers after its evaluation phase."""

    round: int
    attempt: int
    status: str  # committed | failed
    model_version: int | None
    participants: dict[str, dict[str, Any]]
    metrics: dict[str, float]
    reason: str = ""


class RoundEngine:
    def __init__(
        self,
        *,
        config: FederationConfig,
        store: Store,
        models_dir: Path,
        spool_dir: Path,
        evaluator: Evaluator | None = None,
        on_round: Callable[[RoundResult], None] | None = None,
        session_prefix: str = "",
        signing_key: Ed25519PrivateKey | None = None,
    ) -> None:
        """`session_prefix` starts every session id of this study (the coordinator routes
        calls of several studies by it); `signing_key` signs its lineage (default: the
        key in the state folder, created on first use)."""
        self._config = config
        self._session_prefix = session_prefix
        # Set: no new round opens (the operator paused the study); the round under way ends.
        self._paused = threading.Event()
        self._study = config.study
        self._store = store
        self._models_dir = models_dir
        self._spool_dir = spool_dir
        # Spools belong to rounds in flight; at start-up no round is (a killed coordinator
        # leaves its uploads' spools behind, and nothing else would remove them).
        if spool_dir.is_dir():
            for leftover in spool_dir.glob("*.upload"):
                leftover.unlink(missing_ok=True)
        self._evaluator = evaluator
        self._on_round = on_round
        # One lock, and conditions on it for who waits. `_cond` wakes the round driver,
        # the only thread that waits on it (quorum, round close, evaluation close): every
        # report, upload or decline notifies it. Long-polls (PollTask, SecAggPoll) wait on
        # their institution's condition in `_polls`, notified only by what can change
        # their answer (_tasks_changed). With one condition for all, each report woke
        # every waiting poller: ~200 wake-ups per report under 200 institutions.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._polls: dict[str, threading.Condition] = {}  # institution -> its long-polls' condition
        self._sessions: dict[str, _Session] = {}
        self._round: _Round | None = None
        self._eval: _Evaluation | None = None
        self._finished = False
        self._warned_workers = False  # said once that max_workers is too low for the institutions
        # Institutions that declined with BUDGET_EXHAUSTED: not selected again in this
        # study (they would only decline again).
        self._exhausted: set[str] = set()
        self._barred: dict[int, set[str]] = {}  # round -> institutions left out of its next attempts (_fail_round)
        self.failure: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        # Participations that ended "failed", by reason (uploads rejected, timeouts, ...),
        # since this process started: for the metrics endpoint.
        self.failures: collections.Counter[str] = collections.Counter()
        self.chunk_bytes = config.server.chunk_bytes
        self.max_chunk_bytes = config.server.chunk_bytes
        self.heartbeat_s = config.server.heartbeat_interval_s
        self.lease_s = config.server.heartbeat_interval_s * config.server.lease_intervals
        # Signed lineage: the state folder (models_dir's parent) keeps the signing key
        # and a readable copy of each record in lineage/.
        self._state_dir = models_dir.parent
        self._signing_key = signing_key if signing_key is not None else load_or_create_signing_key(self._state_dir)
        self.lineage_public_key: bytes = raw_public_key(self._signing_key)  # 32 raw bytes, sent at Join
        self._lineage: dict[int, tuple[bytes, bytes]] = {}  # version -> (record, signature), recent ones
        self._current = self._load_or_create_model()
        # Institution-level DP (DP-FedAvg): clip norm and accounting, resumed from the
        # committed rounds. Imported here: it loads Opacus' accountants, which a
        # coordinator without central DP has no need for.
        self._central_dp: CentralDP | None = None
        if self._study.central_dp is not None:
            from fedcollab.privacy import CentralDP

            self._central_dp = CentralDP(config=self._study.central_dp, rounds=store.rounds())
        # From the file's header: loading a 4 GB model only to name its tensors would
        # double the coordinator's start-up peak.
        self.manifest = tensor_pb2.ModelManifest(tensors=[
            tensor_pb2.TensorSpec(name=t.name, dtype=wire_dtype(t.dtype), shape=list(t.shape))
            for t in stored_tensors(self._current.path)])
        self.dim = sum(spec_numel(s) for s in self.manifest.tensors)
        sa = self._study.secure_aggregation  # weighted: each masked upload ends with its weight
        self.masked_manifest = masked_manifest(self.dim + (1 if sa is not None and sa.weighted else 0))
        # Distributed DP under secure aggregation: one release per committed round.
        self._ddp_releases: list[tuple[float, float, float]] = [
            (r["metrics"]["distributed_dp_l1"], r["metrics"]["distributed_dp_l2"],
             r["metrics"]["distributed_dp_variance"])
            for r in store.rounds() if r["status"] == "committed" and "distributed_dp_variance" in r["metrics"]
        ]
        if self._study.secure_aggregation is not None:
            self._check_secure_aggregation()
        # The strategy: a server optimizer steps on the mean, a robust rule replaces it.
        self._robust = robust_settings_for(self._study.strategy)
        optimizer = optimizer_for(self._study.strategy)
        self._optimizer_states = (OptimizerStates(folder=self._state_dir / "optimizer", optimizer=optimizer)
                                  if optimizer is not None else None)
        if self._optimizer_states is not None:
            self._optimizer_states.check(current_version=self._current.version)
        self._study_info = pb.StudyInfo(
            name=self._study.name,
            model=pb.ModelSpec(kind=self._study.model.kind, params=_struct(self._study.model.params)),
            total_rounds=self._study.rounds,
        )

    # ----------------------------------------------------------------- models
    def _load_or_create_model(self) -> ModelVersion:
        latest = self._store.latest_model()
        if latest is None:
            self._check_memory()
            try:
                model = models.build_model(
                    kind=self._study.model.kind, params=self._study.model.params, seed=self._study.seed
                )
            except ValueError as e:
                raise ConfigError(f"study.model: {e}") from None
            state = {k: (v.detach().reshape(-1), v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
            del model
            remove_orphans(self._models_dir, keep=set())
            latest = write_streaming(state, folder=self._models_dir, version=0)
            del state
            signed = self._signed_record(
                model=latest, round_number=0, parent_sha256=None, contributions=[], central_dp=None,
                aggregator={"name": "initial", "model": {"kind": self._study.model.kind,
                                                         "params": dict(self._study.model.params)},
                            "seed": self._study.seed},
            )
            self._store.add_initial_model(latest, lineage=signed)
            self._keep_lineage(latest.version, signed)
            log.info("initial model v0 %s (%d bytes)", latest.sha256[:12], latest.size_bytes)
            return latest
        keep = {m.path.resolve() for m in self._store.models()}
        for orphan in remove_orphans(self._models_dir, keep=keep):
            log.warning("removed %s: written but never committed (crash before commit)", orphan.name)
        if not latest.path.is_file() or file_sha256(latest.path) != latest.sha256:
            raise ConfigError(
                f"{latest.path}: committed model v{latest.version} is missing or does not match its "
                f"SHA-256 {latest.sha256}; restore the file or start with a fresh state_dir"
            )
        self._resume_lineage(latest)
        log.info("resuming after round %d with model v%d", self._store.last_committed_round(), latest.version)
        return latest

    # ----------------------------------------------------------------- lineage
    def _signed_record(self, *, model: ModelVersion, round_number: int, parent_sha256: str | None,
                       contributions: list[dict[str, Any]], aggregator: dict[str, Any],
                       central_dp: dict[str, Any] | None, signed_at_restart: bool = False) -> tuple[bytes, bytes]:
        record = build_record(
            version=model.version, round=round_number, study=self._study.name,
            federation=self._config.federation.name, parent_sha256=parent_sha256, model_sha256=model.sha256,
            contributions=contributions, aggregator=aggregator, central_dp=central_dp, code_version=__version__,
            signed_at_restart=signed_at_restart,
        )
        record_bytes = canonical_bytes(record)
        return record_bytes, sign_record(record_bytes, self._signing_key)

    def _aggregation(self, dp_metrics: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The aggregator and the central DP release of a round, from its DP figures
        (CentralRelease.metrics; empty without central DP). The clipped fraction is
        the operator's diagnostic, not a DP release: it stays out of the record."""
        if "central_dp_noise_multiplier" not in dp_metrics:
            return {"name": "fedavg", "weighting": "num_examples"}, None
        c = self._study.central_dp
        aggregator = {"name": "dp-fedavg", "weighting": "uniform", "clip_norm": dp_metrics["clip_norm"],
                      "noise_multiplier": dp_metrics["central_dp_noise_multiplier"],
                      "adaptive_clipping": c.adaptive.model_dump() if c is not None and c.adaptive else None}
        names = {"central_dp_epsilon": "epsilon", "central_dp_delta": "delta",
                 "central_dp_noise_multiplier": "noise_multiplier",
                 "central_dp_update_noise_multiplier": "update_noise_multiplier",
                 "clip_norm": "clip_norm", "clip_norm_next": "clip_norm_next", "noise_std": "noise_std"}
        central = {short: dp_metrics[k] for k, short in names.items() if k in dp_metrics}
        central["accountant"] = c.accountant if c is not None else None
        return aggregator, central

    def _ddp_release(self, plan: DistributedDPPlan, *, survivors: int) -> dict[str, float]:
        """The round's distributed-DP release and the federation's epsilon with it."""
        from fedcollab.secagg._ddp import skellam_epsilon

        d = self._study.secure_aggregation.distributed_dp  # type: ignore[union-attr]
        assert d is not None
        l1, l2, variance = plan.release(survivors=survivors)
        epsilon, _ = skellam_epsilon(releases=[*self._ddp_releases, (l1, l2, variance)], delta=d.delta)
        return {
            "distributed_dp_l1": float(l1), "distributed_dp_l2": float(l2), "distributed_dp_variance": float(variance),
            # noise std on the committed mean, in update units
            "distributed_dp_noise_std": math.sqrt(variance) / plan.scale / survivors,
            "federation_dp_epsilon": float(epsilon), "federation_dp_delta": d.delta,
        }

    def _secagg_aggregation(self, r: _Round, ddp: Mapping[str, float]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        sa = self._study.secure_aggregation
        assert sa is not None and r.secagg is not None
        aggregator = {"name": "secagg+fedavg", "weighting": "num_examples" if sa.weighted else "uniform",
                      **({"max_weight": sa.max_weight} if sa.weighted else {}), "bits": sa.bits,
                      "threshold": r.secagg.threshold, "neighbours": r.secagg.degree,
                      "masked_updates": len(r.secagg.u3), "dropped_after_sharing": len(r.secagg.u2 - r.secagg.u3),
                      "wrong_shares_from": sorted(r.secagg.bad_shares)}
        if not ddp or sa.distributed_dp is None:
            return aggregator, None
        d = sa.distributed_dp
        return aggregator, {"mechanism": "distributed-skellam", "epsilon": ddp["federation_dp_epsilon"],
                            "delta": d.delta, "clip_norm": d.clip_norm, "noise_multiplier": d.noise_multiplier,
                            "noise_std": ddp["distributed_dp_noise_std"], "accountant": "rdp"}

    def _keep_lineage(self, version: int, signed: tuple[bytes, bytes]) -> None:
        """After the commit: cache the record for ModelRefs, and write its readable copy
        (best effort: the SQLite row is authoritative)."""
        with self._cond:
            self._lineage[version] = signed
            for old in [v for v in self._lineage if v < version - 1]:
                del self._lineage[old]
        self._write_record_copy(version, signed)

    def _write_record_copy(self, version: int, signed: tuple[bytes, bytes]) -> None:
        try:
            write_record_file(self._state_dir, version=version, record_bytes=signed[0], signature=signed[1])
        except OSError as e:
            log.warning("v%d: cannot write its readable lineage record: %s", version, e)

    def _resume_lineage(self, latest: ModelVersion) -> None:
        """A restarted coordinator: its key must be the one that signed the chain. State
        written before lineage was recorded gets a record for its latest version only
        (institutions refuse a model without one), marked as signed at restart."""
        head = self._store.lineage_of(latest.version)
        if head is not None:
            try:
                check_model(record_bytes=head[0], signature=head[1], public_key=self.lineage_public_key,
                            version=latest.version, sha256=latest.sha256)
            except LineageError as e:
                raise ConfigError(
                    f"{self._state_dir / SIGNING_KEY_FILE}: v{latest.version}'s lineage record does not verify "
                    f"with this key ({e.message}); restore the key this state was signed with, or start with a "
                    "fresh state_dir"
                ) from None
            for version, record, signature in self._store.lineage():
                if not record_path(self._state_dir, version).is_file():  # a crash right after a commit
                    self._write_record_copy(version, (record, signature))
            self._keep_lineage(latest.version, head)
            return
        log.warning("models v0..v%d were committed before lineage was recorded: they have no signed record "
                    "(`fedcollab lineage verify` reports the gap); signing v%d now, marked as signed at restart, "
                    "and every version from the next round on", latest.version, latest.version)
        parents = self._store.model_parents()
        by_version = {m.version: m for m in self._store.models()}
        parent = parents.get(latest.version)
        committing = [r for r in self._store.rounds() if r["status"] == "committed"
                      and r["model_version"] == latest.version]
        contributions: list[dict[str, Any]] = []
        aggregator: dict[str, Any] = {"name": "initial"}
        central: dict[str, Any] | None = None
        round_number = 0
        if committing:
            r = committing[-1]
            round_number = r["round"]
            contributions = [
                {"institution": p["institution"], "update_sha256": p["update_sha256"],
                 "num_examples": p["num_examples"], "privacy": p["privacy"]}
                for p in self._store.participations(round_number=r["round"])
                if p["attempt"] == r["attempt"] and p["status"] == "done"
            ]
            aggregator, central = self._aggregation(r["metrics"])
            claimed = {p["institution"]: p["metrics"][_bounds.CLAIMED_METRIC]
                       for p in self._store.participations(round_number=r["round"])
                       if p["attempt"] == r["attempt"] and p["status"] == "done"
                       and _bounds.CLAIMED_METRIC in p["metrics"]}
            if claimed:
                aggregator["bounded_weights"] = _bounds.bounded_weights_record(self._study, claimed)
        signed = self._signed_record(
            model=latest, round_number=round_number, contributions=contributions, aggregator=aggregator,
            central_dp=central, signed_at_restart=True,
            parent_sha256=by_version[parent].sha256 if parent is not None and parent in by_version else None,
        )
        self._store.add_lineage(version=latest.version, record=signed[0], signature=signed[1])
        self._keep_lineage(latest.version, signed)

    def lineage(self, from_version: int = 0) -> list[tuple[int, bytes, bytes]]:
        """(version, record bytes, signature) of every signed version from `from_version` on."""
        return self._store.lineage(from_version)

    def _ref(self, m: ModelVersion) -> pb.ModelRef:
        """Caller holds the lock."""
        signed = self._lineage.get(m.version)
        if signed is None:
            signed = self._store.lineage_of(m.version)
            if signed is None:
                log.error("v%d has no lineage record: institutions will refuse it", m.version)
                signed = (b"", b"")
            else:
                self._lineage[m.version] = signed
        return pb.ModelRef(version=m.version, sha256=m.sha256, size_bytes=m.size_bytes,
                           lineage_record=signed[0], lineage_signature=signed[1])

    def _check_memory(self) -> None:
        """Refuse a model the coordinator cannot hold, before allocating it: a round
        needs the running sum and, at commit, the base model (about 2x its size)."""
        spec = self._study.model
        try:
            with torch.device("meta"):  # shapes only, no memory
                shapes = models.build_model(kind=spec.kind, params=spec.params).state_dict().values()
        except Exception:
            return  # build errors are reported with their reason when the model is built
        nbytes = sum(t.numel() * t.element_size() for t in shapes)
        available = psutil.virtual_memory().available
        if 2 * nbytes > available:
            raise ConfigError(
                f"study.model: a {spec.kind} model of {nbytes / 2**30:.1f} GiB needs about "
                f"{2 * nbytes / 2**30:.1f} GiB at the coordinator, and {available / 2**30:.1f} GiB is available"
            )

    @property
    def current_model(self) -> ModelVersion:
        return self._current

    @property
    def finished(self) -> bool:
        return self._finished

    # ----------------------------------------------------------------- sessions
    def join(self, *, institution: str, num_train_examples: int, serial: int = 0) -> tuple[str, pb.StudyInfo]:
        if not NAME.fullmatch(institution):  # fullmatch: '$' would let a trailing newline in
            raise Rejected(
                code=grpc.StatusCode.INVALID_ARGUMENT,
                reason="INVALID_INSTITUTION_NAME",
                message="institution names are 1-128 letters, digits, '.', '_' or '-', starting alphanumeric",
            )
        if num_train_examples < 0:
            raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_EXAMPLE_COUNT",
                           message="num_train_examples must not be negative")
        session_id = self._session_prefix + secrets.token_urlsafe(24)
        with self._cond:
            replaced = [s for s, v in self._sessions.items() if v.institution == institution]
            for sid in replaced:
                del self._sessions[sid]
            self._sessions[session_id] = _Session(session_id, institution, time.monotonic(), serial=serial,
                                                  declared_examples=num_train_examples)
            self._cond.notify_all()
            if replaced:  # a long-poll on a replaced session answers SESSION_UNKNOWN
                self._tasks_changed([institution])
            workers = self._config.server.max_workers
            if len(self._sessions) >= workers and not self._warned_workers:
                self._warned_workers = True
                log.warning("%d institutions have joined and server.max_workers is %d: each waiting PollTask holds "
                            "one of the server's threads, so other calls will queue behind long-polls; raise "
                            "server.max_workers above the number of institutions", len(self._sessions), workers)
        self._store.upsert_institution(name=institution, num_train_examples=num_train_examples)
        log.debug("%s joined", institution)  # per call: at INFO, 200 joins flood the log
        return session_id, self._study_info

    def _touch(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise Rejected(
                code=grpc.StatusCode.UNAUTHENTICATED,
                reason="SESSION_UNKNOWN",
                message="unknown or replaced session (the coordinator may have restarted): call Join again",
            )
        session.last_seen = time.monotonic()
        return session

    def touch(self, session_id: str) -> str:
        with self._cond:
            return self._touch(session_id).institution

    def heartbeat(self, *, session_id: str) -> float:
        self.touch(session_id)
        return self.lease_s

    @property
    def study(self) -> StudyConfig:
        return self._study

    @property
    def study_info(self) -> pb.StudyInfo:
        return self._study_info

    # ----------------------------------------------------------------- operator
    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def pause(self) -> None:
        with self._cond:
            self._paused.set()
            self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            self._paused.clear()
            self._cond.notify_all()

    def finish(self) -> None:
        """Ends the study where it stands (the operator cancelled it): polls answer
        FINISHED. Call after the driver has stopped."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()
            self._tasks_changed()

    def forget_institution(self, institution: str) -> None:
        """Drops its sessions (it was suspended): its next call must Join, and is refused."""
        with self._cond:
            for sid in [s for s, v in self._sessions.items() if v.institution == institution]:
                del self._sessions[sid]
            self._tasks_changed([institution])

    def forget_serials(self, serials: frozenset[int]) -> list[str]:
        """Drops the sessions that joined with a revoked certificate, and takes these
        institutions out of the open round (their update too, if it arrived: a revoked
        key may have sent it). Under secure aggregation they become dropouts the
        protocol already handles: no call of theirs gets past the interceptor."""
        with self._cond:
            gone = sorted({v.institution for v in self._sessions.values() if v.serial and v.serial in serials})
            if not gone:
                return []
            for sid in [s for s, v in self._sessions.items() if v.serial and v.serial in serials]:
                del self._sessions[sid]
            r = self._round
            if r is not None and not r.closed and r.secagg is None:
                for name in gone:
                    p = r.participants.get(name)
                    if p is not None and p.status in ("selected", "uploading", "done"):
                        # Under the lock, so the round's close cannot count it meanwhile. It
                        # may rebuild the sum from the spools (slow for big models): only
                        # on a revocation, with an update of the revoked in the open round.
                        r.total.exclude(name)
                        self._fail(r, p, "CERTIFICATE_REVOKED")
            self._tasks_changed(gone)
        log.warning("dropped the sessions of %s: certificate revoked", ", ".join(gone))
        return gone

    def waits_for_upload(self, institution: str) -> bool:
        """The open round waits for this institution's update (it was given the task)."""
        with self._cond:
            return self._waiting_participant(institution) is not None

    def fail_waiting_upload(self, *, institution: str, reason: str) -> None:
        """The open round stops waiting for this institution's update (it opened an
        upload and sent nothing)."""
        with self._cond:
            p = self._waiting_participant(institution)
            if p is not None and self._round is not None:
                self._fail(self._round, p, reason, message="opened an upload and sent no header")

    def _waiting_participant(self, institution: str) -> _Participant | None:
        """Caller holds the lock."""
        r = self._round
        p = r.participants.get(institution) if r is not None and not r.closed else None
        if p is None or p.status != "selected":
            return None
        assert r is not None
        if r.secagg is not None and not (r.secagg.stage == MASKED and institution in r.secagg.u2):
            return None  # not at the stage of its masked upload
        return p

    def online_institutions(self) -> list[str]:
        with self._cond:
            return self._online()

    def _online(self) -> list[str]:
        now = time.monotonic()
        return sorted(s.institution for s in self._sessions.values() if now - s.last_seen <= self.lease_s)

    # ----------------------------------------------------------------- tasks
    def poll(self, *, session_id: str, wait_s: float, is_active: Callable[[], bool] = lambda: True) -> pb.Task:
        wait = min(wait_s if wait_s > 0 else self._config.server.max_poll_wait_s, self._config.server.max_poll_wait_s)
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                institution = self._touch(session_id).institution
                task = self._task_for(institution)
                if task is not None:
                    return task
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not is_active():
                    return pb.Task(kind=pb.TASK_KIND_WAIT)
                # At most 1 s: a cancelled call is noticed (is_active) and the session kept alive.
                self._polls_of(institution).wait(min(remaining, 1.0))

    def _polls_of(self, institution: str) -> threading.Condition:
        """Caller holds the lock. One per institution that ever polled: as many as joined."""
        cond = self._polls.get(institution)
        if cond is None:
            cond = self._polls[institution] = threading.Condition(self._lock)
        return cond

    def _tasks_changed(self, institutions: Iterable[str] | None = None) -> None:
        """Caller holds the lock: wakes the long-polls of these institutions (None: all)
        for a change that can give one an answer: their round opened or closed, their
        evaluation opened or closed, their secure-aggregation stage moved, the study
        finished, a session was replaced, a task reopened (an upload that could not
        start). Nothing else needs to: a TRAIN or EVALUATE task appears only then, and an
        institution whose task goes away (its upload, report or failure) is not polling
        for it. Each long-poll also wakes at least once a second, which bounds the cost
        of a wake-up missed."""
        names = self._polls.keys() if institutions is None else institutions
        for name in names:
            cond = self._polls.get(name)
            if cond is not None:
                cond.notify_all()

    def _task_for(self, institution: str) -> pb.Task | None:
        if self._finished:
            return pb.Task(kind=pb.TASK_KIND_FINISHED)
        r = self._round
        if r is not None and not r.closed:
            p = r.participants.get(institution)
            if p is not None and p.status == "selected" and (
                    r.secagg is None or (r.secagg.stage == ADVERTISE and institution not in r.secagg.keys)):
                t = self._study.train
                return pb.Task(
                    kind=pb.TASK_KIND_TRAIN,
                    round=r.number,
                    nonce=p.nonce,
                    model=self._ref(r.base),
                    train=pb.TrainPlan(
                        local_epochs=t.local_epochs, batch_size=t.batch_size,
                        learning_rate=t.learning_rate * t.learning_rate_decay ** (r.number - 1),
                        optimizer=t.optimizer, momentum=t.momentum, weight_decay=t.weight_decay,
                        proximal_mu=self._study.strategy.proximal_mu or 0.0,
                    ),
                    manifest=self.manifest,
                    secure_aggregation=r.secagg.params_for(institution) if r.secagg is not None else None,
                    compression=compression_to_proto(self._study.compression),
                )
        e = self._eval
        if e is not None and not e.closed and institution in e.nonces and institution not in e.reports:
            return pb.Task(kind=pb.TASK_KIND_EVALUATE, round=e.number, nonce=e.nonces[institution],
                           model=self._ref(e.model))
        return None

    # ----------------------------------------------------------------- downloads
    def model_for_download(self, *, session_id: str, sha256: str) -> ModelVersion:
        self.touch(session_id)
        model = self._store.model_by_sha(sha256)
        if model is None:
            raise Rejected(code=grpc.StatusCode.NOT_FOUND, reason="MODEL_NOT_FOUND",
                           message=f"no committed model has SHA-256 {sha256[:64]!r}")
        return model

    def count_bytes_out(self, n: int) -> None:
        with self._cond:
            self.bytes_out += n

    # ----------------------------------------------------------------- uploads
    def start_upload(self, *, header: pb.UpdateHeader) -> Upload:
        with self._cond:
            session = self._touch(header.session_id)
            institution = session.institution
            r = self._round
            if r is None or r.closed or header.round != r.number:
                current = r.number if r is not None and not r.closed else "none"
                raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="ROUND_CLOSED",
                               message=f"round {header.round} is not open for uploads (open round: {current})",
                               metadata={"round": header.round})
            p = r.participants.get(institution)
            if p is None:
                raise Rejected(code=grpc.StatusCode.PERMISSION_DENIED, reason="NOT_SELECTED",
                               message=f"{institution} was not selected for round {r.number}")
            if not secrets.compare_digest(p.nonce.encode(), header.nonce.encode()):
                raise Rejected(code=grpc.StatusCode.PERMISSION_DENIED, reason="NONCE_MISMATCH",
                               message="the upload's nonce is not the one of this round's task")
            if p.status == "done":
                raise Rejected(code=grpc.StatusCode.ALREADY_EXISTS, reason="DUPLICATE_UPLOAD",
                               message=f"an update from {institution} for round {r.number} was already accepted")
            if p.status == "uploading":
                raise Rejected(code=grpc.StatusCode.ABORTED, reason="UPLOAD_IN_PROGRESS",
                               message="another upload for this task is in progress")
            if p.status != "selected":
                raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="PARTICIPATION_ENDED",
                               message=f"{institution}'s part in round {r.number} ended: {p.status} ({p.reason})")
            if header.base_version != r.base.version:
                raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="STALE_BASE",
                               message=f"update computed from v{header.base_version}, "
                                       f"the round is on v{r.base.version}")
            if r.secagg is not None:
                if header.manifest != self.masked_manifest:
                    raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="SECAGG_REQUIRED",
                                   message="this round uses secure aggregation: send the masked update after the key "
                                           "stages (one uint32 tensor 'secagg.masked')")
                if r.secagg.stage != MASKED or institution not in r.secagg.u2:
                    raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="SECAGG_WRONG_STAGE",
                                   message=f"{institution} cannot upload now: the masked input stage is not open "
                                           "for it")
            # Taken now, so that a second upload for this task is refused (UPLOAD_IN_PROGRESS)
            # while this one checks its header and creates its spool outside the lock: file
            # system calls under the engine-wide lock stalled every other call.
            p.status = "uploading"
        try:
            receiver = UploadReceiver(
                header=header, manifest=self.masked_manifest if r.secagg is not None else self.manifest,
                max_chunk_bytes=self.max_chunk_bytes,
                spool=self._spool_dir / f"r{r.number}-a{r.attempt}-{institution}.upload",
                compression=self._study.compression,
            )
        except Rejected as e:
            with self._cond:
                if p.status == "uploading":
                    self._fail(r, p, e.reason)
            raise
        except BaseException:  # no spool (disk full?): the task stays open, as if never tried
            with self._cond:
                if p.status == "uploading":
                    p.status = "selected"
                    self._tasks_changed([institution])  # its TRAIN task is due again
            raise
        with self._cond:
            # The round may have closed meanwhile (deadline, stop, enough updates, a secure-
            # aggregation stage timing out): it then failed this participant.
            if r.closed or p.status != "uploading":
                receiver.discard()
                if r.closed:
                    raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="ROUND_CLOSED",
                                   message=f"round {r.number} closed before the upload started",
                                   metadata={"round": header.round})
                raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="PARTICIPATION_ENDED",
                               message=f"{institution}'s part in round {r.number} ended: {p.status} ({p.reason})")
            try:
                weight = _bounds.update_weight(claimed=header.num_examples, declared=session.declared_examples,
                                               cap=self._study.max_examples_per_update)
            except Rejected as e:
                receiver.discard()
                self._fail(r, p, e.reason)
                raise
            if isinstance(r.total, RoundSum):
                r.total.add(institution, receiver=receiver, weight=float(weight), claimed=float(header.num_examples))
            else:
                r.total.add(institution, receiver=receiver, weight=float(weight))
            return Upload(receiver, r, institution, weight)

    def accept_chunk(self, upload: Upload, chunk: tensor_pb2.Chunk) -> None:
        """Check one chunk and fold it into the round's sum at once (under central DP,
        only measure it: the clipped update is folded when it completes)."""
        pieces = upload.receiver.accept(chunk)
        try:
            folded = upload.round.total.fold(upload.institution, pieces, upto=upload.receiver.received)
        except AggregateOverflow as e:
            raise _overflow(e) from None
        if not folded:
            self._refused_by_sum(upload)
            raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="ROUND_CLOSED",
                           message=f"round {upload.round.number} closed during the upload")
        crash_point("coordinator.upload_chunk")
        with self._cond:
            self.bytes_in += len(chunk.data)
            session = self._sessions.get(upload.receiver.header.session_id)
            if session is not None:
                session.last_seen = time.monotonic()

    def finish_upload(self, upload: Upload) -> None:
        """The whole update arrived: it counts only if its SHA-256 matches."""
        r, header = upload.round, upload.receiver.header
        p = r.participants[upload.institution]
        closed = Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="ROUND_CLOSED",
                          message=f"round {r.number} closed before the upload completed")
        with self._cond:
            if r.closed or p.status != "uploading":
                raise closed
        try:
            upload.receiver.finish()
        except Rejected as e:
            self.abort_upload(upload, reason=e.reason)
            raise
        # Under central DP the whole update is folded now, clipped, from its spool:
        # outside the lock, as it reads the update back.
        try:
            finished = r.total.finish(upload.institution)
        except AggregateOverflow as e:
            self.abort_upload(upload, reason="UPDATE_OVERFLOWS_AGGREGATE")
            raise _overflow(e) from None
        except NormOutOfBounds as e:
            self.abort_upload(upload, reason="UPDATE_NORM_OUT_OF_BOUNDS")
            raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="UPDATE_NORM_OUT_OF_BOUNDS",
                           message=f"{e}; the update is refused", metadata={"norm": f"{e.norm:.6g}",
                                                                            "bound": f"{e.bound:.6g}"}) from None
        if not finished:
            self._refused_by_sum(upload)
            raise closed
        with self._cond:
            if r.closed or p.status != "uploading" or not r.total.complete(upload.institution):
                self._refused_by_sum(upload)
                raise closed
            p.status = "done"
            p.num_examples = upload.weight
            p.metrics = dict(header.metrics)
            p.privacy = spend_dict(header.privacy) if header.HasField("privacy") else None
            p.update_sha256 = header.sha256.hex()
            self._cond.notify_all()
        self._store.record_participation(
            round_number=r.number, attempt=r.attempt, institution=p.name, status="done",
            num_examples=p.num_examples, update_sha256=header.sha256.hex(), metrics=dict(header.metrics),
            privacy=p.privacy,
        )
        # Per call, so DEBUG: at INFO, rich's handler took ~5% of the coordinator's CPU
        # under 200 institutions; the round's open and commit lines stay at INFO.
        log.debug("round %d: update from %s accepted (%d examples)", r.number, p.name, header.num_examples)

    def _refused_by_sum(self, upload: Upload) -> None:
        """The sum refused this upload while another one was taken out (coordinator/_round_sum.py
        _rebuild): its own reason, not ROUND_CLOSED."""
        refused = upload.round.total.refused.get(upload.institution) if isinstance(upload.round.total,
                                                                                   RoundSum) else None
        if refused is not None:
            raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason=refused[0], message=refused[1])

    def abort_upload(self, upload: Upload, *, reason: str) -> None:
        """Takes whatever was folded of this upload out of the sum, and records why."""
        r = upload.round
        r.total.exclude(upload.institution)
        upload.receiver.discard()
        with self._cond:
            p = r.participants.get(upload.institution)
            if p is not None and p.status == "uploading":
                self._fail(r, p, reason)

    def decline(self, *, request: pb.DeclineTaskRequest) -> None:
        """The institution will not train this round, and why. Its word is final: the
        coordinator records it and goes on without it."""
        if not _REASON.fullmatch(request.reason):
            raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_REASON",
                           message="a decline's reason is UPPER_SNAKE, 1-64 characters, e.g. BUDGET_EXHAUSTED")
        if len(request.message) > 1024:
            raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="METADATA_TOO_LARGE",
                           message="a decline's message is at most 1024 characters")
        privacy = None
        if request.HasField("privacy"):
            check_privacy_spend(request.privacy)
            privacy = spend_dict(request.privacy)
        with self._cond:
            institution = self._touch(request.session_id).institution
            r = self._round
            if r is None or r.closed or request.round != r.number:
                raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="ROUND_CLOSED",
                               message=f"round {request.round} is not open")
            p = r.participants.get(institution)
            if p is None or not secrets.compare_digest(p.nonce.encode(), request.nonce.encode()):
                raise Rejected(code=grpc.StatusCode.PERMISSION_DENIED, reason="NONCE_MISMATCH",
                               message="the decline's nonce is not the one of this round's task")
            if p.status != "selected":
                raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="PARTICIPATION_ENDED",
                               message=f"{institution}'s part in round {r.number} is already {p.status}")
            p.privacy = privacy
            if request.reason == "BUDGET_EXHAUSTED":
                self._exhausted.add(institution)
            self._fail(r, p, request.reason, status="declined", message=request.message)

    def _fail(self, r: _Round, p: _Participant, reason: str, status: str = "failed", message: str = "") -> None:
        """Caller holds the lock."""
        p.status, p.reason = status, reason
        if status == "failed":
            self.failures[reason] += 1
        self._cond.notify_all()
        log.warning("round %d: %s %s (%s)%s", r.number, p.name, status, reason, f": {message}" if message else "")
        self._store.record_participation(
            round_number=r.number, attempt=r.attempt, institution=p.name, status=status,
            reason=f"{reason}: {message}" if message else reason, privacy=p.privacy,
        )

    # ----------------------------------------------------------------- secure aggregation
    def _secagg_participant(self, *, session_id: str, round_number: int, nonce: str) -> tuple[_Round, str]:
        """Caller holds the lock."""
        institution = self._touch(session_id).institution
        r = self._round
        if r is None or r.closed or r.number != round_number or r.secagg is None:
            raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="ROUND_CLOSED",
                           message=f"no secure-aggregation round {round_number} is open")
        p = r.participants.get(institution)
        if p is None or not secrets.compare_digest(p.nonce.encode(), nonce.encode()):
            raise Rejected(code=grpc.StatusCode.PERMISSION_DENIED, reason="NONCE_MISMATCH",
                           message="the nonce is not the one of this round's task")
        return r, institution

    def secagg_submit(self, *, request: pb.SecAggSubmitRequest) -> None:
        with self._cond:
            r, institution = self._secagg_participant(session_id=request.session_id, round_number=request.round,
                                                      nonce=request.nonce)
            assert r.secagg is not None
            which = request.WhichOneof("payload")
            if which == "keys":
                r.secagg.submit_keys(institution, request.keys)
            elif which == "shares":
                r.secagg.submit_shares(institution, request.shares)
            elif which == "unmask":
                r.secagg.submit_unmask(institution, request.unmask)
            elif which == "consistency":
                r.secagg.submit_consistency(institution, request.consistency)
            else:
                raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="SECAGG_EMPTY",
                               message="send keys, shares, consistency or unmask")
            self._cond.notify_all()

    def secagg_poll(self, *, request: pb.SecAggPollRequest,
                    is_active: Callable[[], bool] = lambda: True) -> pb.SecAggPollResponse:
        wait = min(request.wait_seconds if request.wait_seconds > 0 else self._config.server.max_poll_wait_s,
                   self._config.server.max_poll_wait_s)
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                r, institution = self._secagg_participant(session_id=request.session_id,
                                                          round_number=request.round, nonce=request.nonce)
                assert r.secagg is not None
                response = r.secagg.poll(institution, request.stage)
                remaining = deadline - time.monotonic()
                if response.ready or remaining <= 0 or not is_active():
                    return response
                # Ready only once the stage moves on (_secagg_step, _secagg_abort), not
                # on each submission.
                self._polls_of(institution).wait(min(remaining, 1.0))

    def _check_secure_aggregation(self) -> None:
        """Parameters that could never work are refused at start, not in round 1."""
        sa = self._study.secure_aggregation
        assert sa is not None
        n = max(self._study.wait_for_institutions, 2)
        try:
            threshold_for(degree_for(n, sa.neighbours) + 1, sa.reconstruction_threshold)
            self._secagg_quantizer(n)
        except ValueError as e:
            raise ConfigError(f"study.secure_aggregation: {e}") from None

    def _secagg_quantizer(self, n: int) -> tuple[Quantizer, DistributedDPPlan | None]:
        sa = self._study.secure_aggregation
        assert sa is not None
        d = sa.distributed_dp
        if d is None:
            # Weighted, the weight element (at most 1) is summed too.
            clip = max(sa.clipping_range, 1.0) if sa.weighted else sa.clipping_range
            return Quantizer.for_range(clip=clip, bits=sa.bits, max_summands=n), None
        from fedcollab.secagg._ddp import plan_distributed_dp

        plan = plan_distributed_dp(clip_norm=d.clip_norm, noise_multiplier=d.noise_multiplier, bits=sa.bits,
                                   dim=self.dim, max_summands=n, min_survivors=self._study.min_institutions,
                                   beta=d.rounding_beta)
        return plan.quantizer(), plan

    def _secagg_round(self, selected: list[str],
                      number: int) -> tuple[MaskedSum, SecAggRound, DistributedDPPlan | None]:
        sa = self._study.secure_aggregation
        assert sa is not None
        quantizer, plan = self._secagg_quantizer(len(selected))
        params = pb.SecAggParams(bits=sa.bits, scale=quantizer.scale, clipping_range=sa.clipping_range,
                                 max_weight=sa.max_weight if sa.weighted else 0.0)
        if plan is not None:
            params.clipping_range = plan.clip_norm
            params.distributed_dp.CopyFrom(pb.DistributedDPParams(
                clip_norm=plan.clip_norm, l2_bound=plan.l2_bound, institution_variance=plan.institution_variance))
        tls = self._config.server.tls  # with it, submitted signatures are checked against the federation CA
        secagg = SecAggRound(names=selected, config=sa, round_id=secrets.token_bytes(16), params=params,
                             round_number=number, verifier=PeerVerifier.from_file(tls.ca_cert) if tls else None)
        total = MaskedSum(model_manifest=self.manifest, quantizer=quantizer, piece_bytes=self.chunk_bytes,
                          weighted=sa.weighted, max_weight=sa.max_weight,
                          clip=sa.clipping_range if plan is None else float("inf"))
        return total, secagg, plan

    def _secagg_step(self, r: _Round, now: float) -> None:
        """Caller holds the lock: moves the round's secure aggregation to its next stage
        once nobody alive owes the current one, or its time is up."""
        sa = r.secagg
        assert sa is not None
        alive = {p.name for p in r.participants.values() if p.status in _OPEN}
        timeout = self._study.secure_aggregation.stage_timeout_s  # type: ignore[union-attr]
        quorum = self._study.min_institutions
        if sa.stage == ADVERTISE:
            if sa.waiting(alive):
                return
            sa.to_share(alive, deadline=now + timeout)
            if len(sa.u1) < quorum:
                self._secagg_abort(r, f"{len(sa.u1)} institutions advertised keys, {quorum} needed")
        elif sa.stage == SHARE:
            late = sa.waiting(alive)
            if late and now < sa.stage_deadline:
                return
            for name in late:
                self._fail(r, r.participants[name], "SECAGG_STAGE_TIMEOUT", message="shared no keys in time")
            sa.to_masked({p.name for p in r.participants.values() if p.status in _OPEN}, deadline=now + timeout)
            for p in r.participants.values():
                if p.status in _OPEN and p.name not in sa.u2:
                    self._fail(r, p, "SECAGG_EXCLUDED", message="did not take part in the key exchange")
            if len(sa.u2) < quorum:
                self._secagg_abort(r, f"{len(sa.u2)} institutions shared keys, {quorum} needed")
        elif sa.stage == MASKED:
            unsent = [p for p in r.participants.values() if p.status in _OPEN]
            if unsent and now < sa.stage_deadline:
                return
            for p in unsent:
                self._fail(r, p, "SECAGG_STAGE_TIMEOUT", message="sent no masked update in time")
            completed = set(r.total.close())  # takes uploads cut off here back out of the sum
            sa.to_consistency(completed, deadline=now + timeout)
            if len(sa.u3) < quorum:
                self._secagg_abort(r, f"{len(sa.u3)} masked updates arrived, {quorum} needed")
        elif sa.stage in (CONSISTENCY, UNMASK):
            by_name = {s.institution: s for s in self._sessions.values()}
            reachable = {n for n in sa.u3 if n in by_name and now - by_name[n].last_seen <= self.lease_s}
            if sa.waiting(reachable) and now < sa.stage_deadline:
                return
            if sa.stage == CONSISTENCY:  # the survivors signed their list (or their time is up)
                sa.to_unmask(deadline=now + timeout)
            else:
                try:
                    sa.removal_check()
                except SecAggError as e:
                    self._secagg_abort(r, e.message)
                    return
                sa.stage = DONE
        self._cond.notify_all()
        self._tasks_changed(r.participants)

    def _secagg_abort(self, r: _Round, why: str) -> None:
        """Caller holds the lock."""
        assert r.secagg is not None
        log.warning("round %d: secure aggregation cannot complete: %s", r.number, why)
        r.secagg.fail(why)
        for p in r.participants.values():
            if p.status in _OPEN:
                self._fail(r, p, "SECAGG_ABORTED", message=why)
        self._cond.notify_all()
        self._tasks_changed(r.participants)

    # ----------------------------------------------------------------- evaluation
    def report_evaluation(self, *, request: pb.ReportEvaluationRequest) -> None:
        with self._cond:
            institution = self._touch(request.session_id).institution
            e = self._eval
            if e is None or e.closed or e.number != request.round:
                raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="EVALUATION_CLOSED",
                               message=f"no evaluation of round {request.round} is open")
            nonce = e.nonces.get(institution)
            if nonce is None or not secrets.compare_digest(nonce.encode(), request.nonce.encode()):
                raise Rejected(code=grpc.StatusCode.PERMISSION_DENIED, reason="NONCE_MISMATCH",
                               message="the report's nonce is not the one of this evaluation task")
            if request.model_sha256 != e.model.sha256:
                raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="MODEL_MISMATCH",
                               message="the report is for another model than the one to evaluate")
            if (request.num_examples < 0 or not math.isfinite(request.loss)
                    or not 0.0 <= request.accuracy <= 1.0):
                raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_METRICS",
                               message="num_examples >= 0, a finite loss and an accuracy in [0, 1] are required")
            if institution in e.reports:
                raise Rejected(code=grpc.StatusCode.ALREADY_EXISTS, reason="DUPLICATE_REPORT",
                               message="this evaluation was already reported")
            e.reports[institution] = (int(request.num_examples), float(request.loss), float(request.accuracy))
            self._cond.notify_all()

    # ----------------------------------------------------------------- driver
    def run(self, stop: threading.Event) -> None:
        """Drive rounds until the study is done or `stop` is set. Only a study that ran
        all its rounds (or gave up on one) is finished: a stopped coordinator resumes."""
        try:
            while not stop.is_set():
                number = self._store.last_committed_round() + 1
                if number > self._study.rounds:
                    log.info("study %s finished after %d rounds", self._study.name, self._study.rounds)
                    break
                attempt = self._store.next_attempt(number)
                failed = self._store.counted_attempts(number)
                if failed >= self._study.max_round_attempts:
                    self.failure = f"round {number} failed {failed} times; giving up (see the rounds table)"
                    log.error(self.failure)
                    break
                selected = self._wait_for_quorum(stop, seed=(self._study.seed, number, attempt))
                if selected is None:
                    if self.failure:
                        break
                    return
                self._run_round(number, attempt, selected, stop)
            else:
                return
        except Exception:
            log.exception("round engine stopped on an internal error")
            self.failure = "internal error in the round engine (see the log)"
        with self._cond:
            self._finished = True
            self._cond.notify_all()
            self._tasks_changed()

    def _wait_for_quorum(self, stop: threading.Event, *, seed: tuple[int, int, int]) -> list[str] | None:
        with self._cond:
            while not stop.is_set():
                if self._paused.is_set():
                    self._cond.wait(0.2)
                    continue
                barred = self._barred.get(seed[1], set())  # refused in an uncounted attempt of this round
                online = [n for n in self._online() if n not in self._exhausted and n not in barred]
                needed = self._study.wait_for_institutions
                if self._exhausted:
                    known = {i["name"] for i in self._store.institutions()} - self._exhausted
                    if len(known) < self._study.min_institutions:
                        self.failure = (
                            f"too few institutions have privacy budget left for a quorum of "
                            f"{self._study.min_institutions}: {', '.join(sorted(self._exhausted))} exhausted theirs"
                        )
                        log.error(self.failure)
                        return None
                    # Waiting for institutions that will only decline would wait forever.
                    needed = max(self._study.min_institutions, min(needed, len(known)))
                if barred:  # as for exhausted budgets: do not wait for institutions left out
                    known = {i["name"] for i in self._store.institutions()} - self._exhausted - barred
                    needed = max(self._study.min_institutions, min(needed, len(known)))
                if len(online) >= needed:
                    k = self._study.institutions_per_round
                    if k and k < len(online):
                        online = sorted(random.Random(str(seed)).sample(online, k))  # reproducible per round
                    return online
                self._cond.wait(0.2)
        return None

    def _run_round(self, number: int, attempt: int, selected: list[str], stop: threading.Event) -> None:
        base = self._current
        secagg, plan = None, None
        total: RoundSum | MaskedSum
        if self._study.secure_aggregation is not None:
            total, secagg, plan = self._secagg_round(selected, number)
        else:
            norms = _bounds.norm_policy(self._study, last_metrics=self._store.last_committed_metrics())
            total = RoundSum(manifest=self.manifest, piece_bytes=self.chunk_bytes,
                             clip_norm=self._central_dp.clip_norm if self._central_dp else None,
                             max_norm=norms.max_norm, keep_updates=self._study.strategy.robust,
                             max_weight_share=self._study.max_weight_share, screen_factor=norms.screen_factor,
                             measure_norms=norms.measure)
        r = _Round(
            number=number, attempt=attempt, base=base,
            participants={n: _Participant(n, secrets.token_hex(16)) for n in selected},
            deadline=time.monotonic() + self._study.round_timeout_s, total=total, opened=time.monotonic(),
            secagg=secagg, ddp=plan,
        )
        self._store.open_round(round_number=number, attempt=attempt, base_version=base.version, participants=selected)
        bytes_at_open = (self.bytes_in, self.bytes_out)
        log.info("round %d (attempt %d) opened with %s", number, attempt, ", ".join(selected))
        with self._cond:
            self._round = r
            self._cond.notify_all()
            self._tasks_changed(r.participants)
            while True:
                self._expire(r)
                if r.secagg is not None:
                    self._secagg_step(r, time.monotonic())
                    if r.secagg.stage == DONE:
                        break
                elif all(p.status not in _OPEN for p in r.participants.values()):
                    break
                elif self._study.updates_per_round and sum(
                        p.status == "done" for p in r.participants.values()) >= self._study.updates_per_round:
                    # Over-selection: enough updates; the stragglers' uploads meet ROUND_CLOSED.
                    for p in r.participants.values():
                        if p.status in _OPEN:
                            self._fail(r, p, "ROUND_CLOSED", status="late",
                                       message=f"the round closed at {self._study.updates_per_round} updates")
                    break
                now = time.monotonic()
                if stop.is_set() or now >= r.deadline:
                    why = "COORDINATOR_STOPPING" if stop.is_set() else "ROUND_DEADLINE"
                    for p in r.participants.values():
                        if p.status in ("selected", "uploading"):
                            self._fail(r, p, why)
                    break
                self._cond.wait(min(0.25, max(r.deadline - now, 0.01)))
            r.closed = True
            self._cond.notify_all()
            self._tasks_changed(r.participants)
            participants = {
                p.name: {"status": p.status, "num_examples": p.num_examples, "reason": p.reason, **p.metrics,
                         **({"epsilon": p.privacy["epsilon"]} if p.privacy else {})}
                for p in r.participants.values()
            }
        try:
            self._settle(r, participants, bytes_at_open, stop)
        finally:
            if isinstance(r.total, RoundSum):
                r.total.discard()  # the spools a robust rule kept

    def _settle(self, r: _Round, participants: dict[str, dict[str, Any]], bytes_at_open: tuple[int, int],
                stop: threading.Event) -> None:
        """The closed round: committed if it can be, else recorded as failed and why."""
        number, attempt = r.number, r.attempt
        completed = r.total.close()  # uploads cut off by the close leave the sum here
        if isinstance(r.total, RoundSum):
            self._count_as_bounded(r, participants)
        done = [p for p in r.participants.values() if p.status == "done"]
        if r.secagg is not None and (r.secagg.stage != DONE or r.secagg.failure):
            why = r.secagg.failure or f"stopped at stage {pb.SecAggStage.Name(r.secagg.stage)}"
            reason = f"SECAGG_INCOMPLETE: secure aggregation did not complete: {why}"
            self._fail_round(r, reason)
            log.warning("round %d failed: %s", number, reason)
            self._emit(RoundResult(number, attempt, "failed", None, participants, {}, reason))
            return
        if sorted(completed) != sorted(p.name for p in done):
            raise AssertionError(f"round {number}: sum holds {sorted(completed)}, done are {[p.name for p in done]}")
        if stop.is_set() and len(done) < len(r.participants):
            self._store.fail_round(round_number=number, attempt=attempt, reason="coordinator stopped mid-round")
            return
        if len(done) < self._study.min_institutions:
            reason = f"quorum not met: {len(done)} accepted updates, {self._study.min_institutions} needed"
            self._fail_round(r, reason)
            log.warning("round %d failed: %s", number, reason)
            self._emit(RoundResult(number, attempt, "failed", None, participants, {}, reason))
            return
        try:
            metrics = self._commit(r, done, bytes_at_open)
        except _NotCommitted as e:
            self._fail_round(r, str(e))
            log.error("round %d failed: %s", number, e)
            self._emit(RoundResult(number, attempt, "failed", None, participants, {}, str(e)))
            return
        metrics.update(self._evaluate_round(number, self._current, stop))
        self._store.update_round_metrics(round_number=number, metrics=metrics)
        self._emit(RoundResult(number, attempt, "committed", self._current.version, participants, metrics))

    def _count_as_bounded(self, r: _Round, participants: dict[str, dict[str, Any]]) -> None:
        """After the sum's close: updates it refused there fail, and capped weights are
        what the participants' records say they counted for."""
        assert isinstance(r.total, RoundSum)
        weights = r.total.weights()
        with self._cond:
            for name, (reason, message) in r.total.refused.items():
                p = r.participants.get(name)
                if p is not None and p.status in ("done", *_OPEN):
                    self._fail(r, p, reason, message=message)
                    participants[name].update(status=p.status, reason=p.reason)
            for name, claimed in r.total.capped.items():
                p = r.participants[name]
                if p.status == "done" and name in weights:
                    log.info("round %d: %s claimed %d examples and counts for %d (max_weight_share %g, "
                             "max_examples_per_update %d)", r.number, name, claimed, weights[name],
                             self._study.max_weight_share, self._study.max_examples_per_update)
                    p.num_examples = int(weights[name])
                    participants[name]["num_examples"] = p.num_examples
                    self._store.record_participation(
                        round_number=r.number, attempt=r.attempt, institution=name, status="done",
                        num_examples=p.num_examples, update_sha256=p.update_sha256,
                        metrics={**p.metrics, _bounds.CLAIMED_METRIC: claimed}, privacy=p.privacy)

    def _fail_round(self, r: _Round, reason: str) -> None:
        """A failed round counts as an attempt unless institutions were refused for what they
        sent and the others can still make a quorum: those are then left out of this
        round's next attempts (_bounds.MISBEHAVIOUR), so uncounted attempts are bounded
        by the number of institutions."""
        culprits = {p.name for p in r.participants.values()
                    if p.status == "failed" and p.reason in _bounds.MISBEHAVIOUR}
        barred = self._barred.setdefault(r.number, set())
        known = {i["name"] for i in self._store.institutions()} - self._exhausted - barred - culprits
        counted = not culprits or len(known) < self._study.min_institutions
        if not counted:
            barred |= culprits
            log.warning("round %d: attempt %d not counted: it failed with %s refused for what they sent, who are "
                        "left out of the next attempt", r.number, r.attempt, ", ".join(sorted(culprits)))
        self._store.fail_round(round_number=r.number, attempt=r.attempt, reason=reason, counted=counted)

    def _expire(self, r: _Round) -> None:
        now = time.monotonic()
        by_name = {s.institution: s for s in self._sessions.values()}
        for p in r.participants.values():
            if p.status == "selected":
                s = by_name.get(p.name)
                if s is None or now - s.last_seen > self.lease_s:
                    self._fail(r, p, "LEASE_EXPIRED", status="vanished")

    def _commit(self, r: _Round, done: list[_Participant], bytes_at_open: tuple[int, int]) -> dict[str, float]:
        central = self._central_dp
        # Central DP never runs under secure aggregation (config refuses it): the sum is a RoundSum.
        dp = central.release(update_norms=r.total.update_norms()) if central is not None else None  # type: ignore[union-attr]
        ddp_metrics: dict[str, float] = {}
        strategy_record: dict[str, Any] = {}
        stored = {t.name: t for t in stored_tensors(r.base.path)}
        if isinstance(r.total, MaskedSum):
            assert r.secagg is not None
            try:
                removal = r.secagg.removal()
                for holder, why in sorted(removal.bad_shares.items()):
                    log.warning("round %d: %s revealed a wrong share (left out, rebuilt from the others): %s",
                                r.number, holder, why)
                new = r.total.unmask_mean(add=removal.add, subtract=removal.subtract, count=len(done))
            except SecAggError as e:
                raise _NotCommitted(f"{e.reason}: {e.message}") from None
            if r.ddp is not None:
                ddp_metrics = self._ddp_release(r.ddp, survivors=len(done))
        elif self._robust is not None:
            new, strategy_record = robust_mean_deltas(kept=r.total.kept_updates(), manifest=self.manifest,
                                                      settings=self._robust)
        else:
            # The mean of the deltas is computed in the round's sums, and the base is
            # added from its file 4 MiB at a time: the commit holds one model, not three.
            new = r.total.mean_deltas(noise_std=dp.noise_std if dp else 0.0)
        if self._optimizer_states is not None:  # steps on the mean delta, tensor by tensor
            strategy_record = self._optimizer_states.step(base_path=r.base.path, base_version=r.base.version,
                                                          mean=new, round_number=r.number)
        else:
            add_file_into(r.base.path, new)
        # Every update was finite, but finite values can still overflow the weighted
        # sum: a model of Inf would poison every later round, so it is never committed.
        broken = [name for name, t in new.items() if not all_finite(t)]
        if broken:
            # Each fold is checked (an update that overflows the sum is refused as it arrives),
            # so this is the base plus the mean, or a server optimizer's step, overflowing:
            # possible only with updates near float32's limit, which the norm bound refuses.
            raise _NotCommitted(f"NON_FINITE_AGGREGATE: the aggregate of tensors {broken[:5]} overflowed; "
                                "bound what one update may contribute (max_update_norm, adaptive_norm_factor, "
                                "central_dp.clip_norm)")
        crash_point("coordinator.aggregated")
        total = sum(p.num_examples for p in done)
        metrics: dict[str, float] = {
            "num_examples": float(total),
            "num_updates": float(len(done)),
            "bytes_in": float(self.bytes_in - bytes_at_open[0]),
            "bytes_out": float(self.bytes_out - bytes_at_open[1]),
            "train_seconds": time.monotonic() - r.opened,
        }
        train_losses = [(p.num_examples, p.metrics["train_loss"]) for p in done if "train_loss" in p.metrics]
        if train_losses:
            metrics["train_loss"] = sum(n * v for n, v in train_losses) / sum(n for n, _ in train_losses)
        if dp is not None:
            metrics.update(dp.metrics)
        metrics.update(ddp_metrics)
        if isinstance(r.total, RoundSum):
            previous = (self._store.last_committed_metrics() or {}).get(_bounds.NORM_MEDIAN_METRIC)
            median = _bounds.next_norm_median(r.total.accepted_norms(), previous=previous)
            if median is not None:  # the next round's adaptive norm bound starts from it
                metrics[_bounds.NORM_MEDIAN_METRIC] = median
            if r.total.max_norm is not None:
                metrics["update_norm_bound"] = r.total.max_norm
        model = write_streaming({name: (flat, stored[name].dtype, stored[name].shape) for name, flat in new.items()},
                                folder=self._models_dir, version=r.base.version + 1)
        del new  # evaluation reads the written model back: the sums are gone by then
        crash_point("coordinator.commit_written")
        if self._evaluator is not None:
            metrics.update({f"central_{k}": float(v) for k, v in self._evaluator(load_tensors(model.path)).items()})
        aggregator, central_figures = self._aggregation(dp.metrics if dp is not None else {})
        if r.secagg is not None:
            aggregator, central_figures = self._secagg_aggregation(r, ddp_metrics)
        if self._study.strategy.name != "fedavg":
            aggregator["strategy"] = {**self._study.strategy.model_dump(exclude_none=True), **strategy_record}
        if isinstance(r.total, RoundSum) and r.total.capped:  # signed: who claimed more than it counted for
            aggregator["bounded_weights"] = _bounds.bounded_weights_record(self._study, r.total.capped)
        signed = self._signed_record(
            model=model, round_number=r.number, parent_sha256=r.base.sha256, aggregator=aggregator,
            central_dp=central_figures,
            contributions=[{"institution": p.name, "update_sha256": p.update_sha256, "num_examples": p.num_examples,
                            "privacy": p.privacy} for p in done],
        )
        self._store.commit_round(round_number=r.number, attempt=r.attempt, model=model, parent=r.base.version,
                                 metrics=metrics, lineage=signed)
        crash_point("coordinator.commit_recorded")
        self._current = model
        self._keep_lineage(model.version, signed)
        if ddp_metrics:
            self._ddp_releases.append((ddp_metrics["distributed_dp_l1"], ddp_metrics["distributed_dp_l2"],
                                       ddp_metrics["distributed_dp_variance"]))
        if central is not None and dp is not None:
            central.commit(dp)  # the round's release is spent only once committed
            log.info("round %d: central DP epsilon %.3f (delta %g), clip norm %.4g -> %.4g", r.number,
                     dp.metrics["central_dp_epsilon"], dp.metrics["central_dp_delta"], dp.clip_norm,
                     dp.clip_norm_next)
        log.info("round %d committed: model v%d %s", r.number, model.version, model.sha256[:12])
        return metrics

    def _evaluate_round(self, number: int, model: ModelVersion, stop: threading.Event) -> dict[str, float]:
        with self._cond:
            targets = self._online()
            k = self._study.evaluation_institutions_per_round
            if k and k < len(targets):
                # Reproducible per round, like the training selection, and drawn apart from it.
                targets = sorted(random.Random(str((self._study.seed, number, "evaluation"))).sample(targets, k))
            if not targets:
                return {}
            e = _Evaluation(number=number, model=model, nonces={n: secrets.token_hex(16) for n in targets},
                            deadline=time.monotonic() + self._study.evaluation_timeout_s)
            self._eval = e
            self._cond.notify_all()
            self._tasks_changed(e.nonces)
            while not stop.is_set() and time.monotonic() < e.deadline:
                now = time.monotonic()
                by_name = {s.institution: s for s in self._sessions.values()}
                waiting = [n for n in e.nonces if n not in e.reports
                           and n in by_name and now - by_name[n].last_seen <= self.lease_s]
                if not waiting:
                    break
                self._cond.wait(0.25)
            e.closed = True
            self._tasks_changed(e.nonces)
            # What each report counts for: bounded like an update's weight (_bounds).
            reports = _bounds.bounded_reports(dict(e.reports), study=self._study)
        # All at once, now that no report can arrive: one transaction per round instead of
        # one per report. A crash during the evaluation loses its reports, which are
        # figures about a model already committed, not part of it.
        self._store.record_evaluations(round_number=number, model_version=model.version, reports=reports)
        return _bounds.evaluation_metrics(reports)

    def _emit(self, result: RoundResult) -> None:
        if self._on_round is not None:
            try:
                self._on_round(result)
            except Exception:  # an observer must never stop the federation
                log.exception("round observer failed")


def _overflow(e: AggregateOverflow) -> Rejected:
    return Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="UPDATE_OVERFLOWS_AGGREGATE",
                    message=f"{e}; the update is refused and the round goes on without it: send finite deltas of "
                            "a sensible size")


def _struct(params: Mapping[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(dict(params))
    return s
