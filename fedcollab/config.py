"""Typed configuration: TOML files -> validated, frozen values with clear errors.

Relative paths in a file are resolved against that file's folder, so a config works
from wherever the command is run.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedcollab._address import parse_address
from fedcollab._dataset_names import DATA_SOURCES, KNOWN_DATASETS, NPZ
from fedcollab.errors import ConfigError

MiB = 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Strict):
    """PEM files for TLS. With `client_cert`/`client_key` (institution) or
    `require_client_auth` (coordinator) it is mutual TLS."""

    ca_cert: Path
    cert: Path
    key: Path
    require_client_auth: bool = True
    # Coordinator: the federation CA's revocation list (`fedcollab pki revoke` writes
    # it); re-read when the file changes, so a revocation needs no restart.
    crl: Path | None = None


class ServerConfig(_Strict):
    address: str = "127.0.0.1:50051"
    state_dir: Path = Path("coordinator-state")
    # 1 MiB: against 4 MiB, a 50M x 4 round ran 9.3-9.5 s instead of 10.5-11 s and the
    # coordinator peaked at 0.55 GiB instead of 0.64 (fewer bytes in flight per stream).
    chunk_bytes: int = Field(default=1 * MiB, ge=1024, le=64 * MiB)
    # RPC threads. Must exceed the number of institutions: each waiting PollTask holds
    # one for up to max_poll_wait_s, and a call that finds none free queues behind the
    # long-polls (with 64, 200 institutions got thousands of RESOURCE_EXHAUSTED and no
    # round). 256 serves about 200 institutions; give it institutions + 64 above that.
    max_workers: int = Field(default=256, ge=4, le=1024)
    # The operators' read-only web page and Prometheus endpoint (/ and /metrics), plain
    # HTTP: keep it on loopback (or behind the operator's own proxy). None (the default
    # for a library-built config; federation.toml sets 127.0.0.1:8080): not served.
    http_address: str | None = None
    # Host names the page answers besides its own address and loopback (a DNS name it is
    # reached by, behind a proxy): any other Host header gets 421, so a DNS-rebinding page
    # in an operator's browser cannot read it.
    http_allowed_hosts: tuple[str, ...] = ()
    # Membership: False admits every institution with a valid certificate (the CA's
    # signature was the approval) and records it "approved"; True records a newcomer
    # "pending" and refuses it until `fedcollab institutions approve NAME`.
    require_approval: bool = False
    heartbeat_interval_s: float = Field(default=2.0, gt=0, le=300)
    # An institution silent for this many heartbeat intervals is taken as gone.
    lease_intervals: float = Field(default=5.0, ge=2)
    max_poll_wait_s: float = Field(default=10.0, gt=0, le=120)
    tls: TlsConfig | None = None
    # Calls one identity (a certificate; over plaintext, the session or name a request
    # claims) may hold open at once: beyond them RESOURCE_EXHAUSTED / TOO_MANY_CALLS.
    # An honest daemon holds a long-poll and a heartbeat per study it serves, at most
    # one upload or download per study, and its agent a ListStudies: 2 x studies + 1.
    # None: min(24, max_workers // 2), so that one identity never holds more than half
    # the threads (24 of the default 256: enough for a daemon in 10 studies at once).
    max_calls_per_identity: int | None = Field(default=None, ge=2)
    max_uploads_per_identity: int = Field(default=4, ge=1)  # one per study uploading at the same time
    max_downloads_per_identity: int = Field(default=4, ge=1)  # DownloadModel and PullModel
    # PollTask and SecAggPoll. A daemon has one at a time per session; a second for the
    # moment a cancelled one takes to notice (it wakes every second).
    max_polls_per_session: int = Field(default=2, ge=1)
    max_polls_per_identity: int = Field(default=16, ge=1)
    # A client stream (UploadUpdate) with no message for this long is cancelled and the
    # partial upload refused UPLOAD_STALLED, as is a server stream (DownloadModel,
    # PullModel) whose client reads nothing for this long. 60 s: a 1 MiB chunk at
    # 140 kbit/s; a stalled upload holds no thread until round_timeout_s.
    stream_idle_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    # The first message (an upload's header) is built before the call opens and comes
    # at once from an honest daemon.
    stream_first_message_timeout_s: float = Field(default=15.0, gt=0, le=3600)
    # HTTP/2 connections (see _server.py for why each): keepalive pings to find dead
    # peers, idle connections closed, every connection renewed after an age, with a
    # grace for the calls on it long enough for a big upload (the daemon allows 1 s
    # per MB: 1 h is ~3.6 GB), and streams per connection bounded.
    keepalive_time_s: float = Field(default=60.0, ge=10, le=7200)
    keepalive_timeout_s: float = Field(default=20.0, gt=0, le=600)
    max_connection_idle_s: float = Field(default=300.0, gt=0)
    max_connection_age_s: float = Field(default=3600.0, gt=0)
    max_connection_age_grace_s: float = Field(default=3600.0, ge=0)
    max_streams_per_connection: int = Field(default=64, ge=4, le=10_000)

    @field_validator("address", "http_address")
    @classmethod
    def _listen_address(cls, v: str | None) -> str | None:
        if v is not None:
            parse_address(v, listen=True)  # port 0: any free one (tests, simulations)
        return v

    @property
    def calls_per_identity(self) -> int:
        """`max_calls_per_identity`, or its default for these max_workers."""
        if self.max_calls_per_identity is not None:
            return self.max_calls_per_identity
        return max(2, min(24, self.max_workers // 2))

    @model_validator(mode="after")
    def _one_identity_cannot_take_every_thread(self) -> ServerConfig:
        n = self.max_calls_per_identity
        if n is not None and n > self.max_workers // 2:
            raise ValueError(f"max_calls_per_identity ({n}) must be at most half of max_workers ({self.max_workers}): "
                             "otherwise one certificate can hold the threads every other institution needs. "
                             "Lower it, or raise max_workers")
        return self


class ModelConfig(_Strict):
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)

    # Checked here, at load time, so that the error names this table: built first by
    # central evaluation, a bad model was blamed on study.central_evaluation.
    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        from fedcollab.models import MODEL_KINDS  # torch: only for files that name a model

        if v not in MODEL_KINDS:
            raise ValueError(f"unknown model kind {v!r}; known kinds: {', '.join(MODEL_KINDS)}")
        return v

    @field_validator("params")
    @classmethod
    def _params_fit_kind(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from fedcollab.models import model_config

        if "kind" in info.data:  # else the kind's own error says what is wrong
            model_config(kind=info.data["kind"], params=v)  # a ValueError names the param and what is accepted
        return v


class TrainConfig(_Strict):
    local_epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=0.05, gt=0)
    # Round r trains with learning_rate * learning_rate_decay ** (r - 1). Under DP-SGD a
    # decaying step keeps the last rounds' noise from undoing what earlier rounds learnt.
    learning_rate_decay: float = Field(default=1.0, gt=0, le=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)


Accountant = Literal["prv", "rdp", "gdp"]
# The accountants fedcollab accepts anywhere (config, ledger rows, reported spend).
ACCOUNTANTS: tuple[str, ...] = get_args(Accountant)


class AdaptiveClippingConfig(_Strict):
    """Clip to a quantile of the update norms instead of a fixed bound (Andrew et al.
    2021): the bound moves geometrically each round, from a noised count of the
    institutions whose update fell under it."""

    target_quantile: float = Field(default=0.5, gt=0, lt=1)
    learning_rate: float = Field(default=0.2, gt=0, le=10)
    # Noise on the count of unclipped updates; Andrew et al. suggest
    # institutions per round / 20. It takes a share of the privacy: the updates' noise
    # multiplier becomes (z^-2 - (2 * this)^-2)^-1/2.
    count_noise_multiplier: float = Field(gt=0)


class CentralDPConfig(_Strict):
    """Institution-level DP at the coordinator (DP-FedAvg, McMahan et al. 2018): each
    update is clipped to `clip_norm`, the average is uniform over institutions, and
    Gaussian noise of std noise_multiplier * clip_norm / (updates) is added to it."""

    clip_norm: float = Field(gt=0)
    noise_multiplier: float = Field(ge=0, le=1000)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    accountant: Accountant = "rdp"
    adaptive: AdaptiveClippingConfig | None = None

    @model_validator(mode="after")
    def _count_noise_leaves_room(self) -> CentralDPConfig:
        a = self.adaptive
        if a is not None and self.noise_multiplier > 0 and 2 * a.count_noise_multiplier <= self.noise_multiplier:
            raise ValueError(
                f"adaptive.count_noise_multiplier ({a.count_noise_multiplier}) must exceed half of noise_multiplier "
                f"({self.noise_multiplier / 2}): the count's noise takes a share of the privacy, and this share "
                "would leave none for the updates. Raise count_noise_multiplier or noise_multiplier"
            )
        return self


class DistributedDPConfig(_Strict):
    """Distributed DP under secure aggregation (Kairouz et al. 2021; Skellam noise,
    Agarwal et al. 2021): each institution clips its update to `clip_norm`, and adds
    integer Skellam noise before masking, so the unmasked sum carries noise of std
    noise_multiplier * clip_norm (in update units) and the coordinator never sees a
    sum without it. Each institution adds 1/min_institutions of the noise variance,
    so any quorum of survivors carries at least the target."""

    clip_norm: float = Field(gt=0)
    noise_multiplier: float = Field(gt=0, le=1000)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    # Conditional stochastic rounding: an encoded update whose norm exceeds the bound
    # that holds with probability 1 - beta is rounded again (Kairouz et al. 2021).
    rounding_beta: float = Field(default=0.6065306597126334, gt=0, lt=1)  # e^-0.5


class SecureAggregationConfig(_Strict):
    """SecAgg+ (Bell et al. 2020): the coordinator learns only the sum of the updates."""

    # Updates become integers mod 2^bits; the sum of a round's updates must fit.
    bits: int = Field(default=32, ge=16, le=32)
    # Without distributed DP, each coordinate of an update is clipped to [-r, r].
    clipping_range: float = Field(default=8.0, gt=0)
    # Shamir threshold t: an int is a count, a float in (0.5, 1] a fraction of each
    # institution's neighbourhood (itself included), rounded up. Masks of dropped
    # institutions are removed once t of their neighbours answer. Institutions refuse
    # a round whose t is not above half of their neighbourhood (a coordinator could
    # otherwise collect both secrets of one institution from two disjoint groups), so
    # a count below that is raised to a majority of the round's neighbourhood.
    reconstruction_threshold: int | float = Field(default=0.66, gt=0)
    # Neighbours each institution masks with: "auto" is everyone in small rounds
    # (up to 20 institutions) and O(log n) beyond; an int can raise the degree, not
    # lower it (institutions refuse a graph sparser than "auto").
    neighbours: Literal["auto"] | int = "auto"
    # Each key-exchange and unmasking stage waits at most this long for stragglers.
    stage_timeout_s: float = Field(default=120.0, gt=0)
    distributed_dp: DistributedDPConfig | None = None
    # How updates count in the mean. "num_examples": each institution masks its
    # clipped update times min(n, max_weight) / max_weight together with that ratio
    # as one more element, and the coordinator divides the unmasked sum by the
    # unmasked sum of ratios (Flower's SecAgg+ max_weight, with the weight capped so
    # no institution counts for more than max_weight examples). "uniform": each
    # update counts once. "auto": num_examples, or uniform with distributed DP (whose
    # accounting bounds each institution's contribution by clip_norm, once).
    weighting: Literal["auto", "uniform", "num_examples"] = "auto"
    max_weight: float = Field(default=1000.0, gt=0, le=1e9)

    @property
    def weighted(self) -> bool:
        return self.weighting == "num_examples" or (self.weighting == "auto" and self.distributed_dp is None)

    @model_validator(mode="after")
    def _threshold_is_meaningful(self) -> SecureAggregationConfig:
        t = self.reconstruction_threshold
        if isinstance(t, float) and not 0.5 < t <= 1:
            raise ValueError("reconstruction_threshold as a fraction must be in (0.5, 1]: institutions refuse a "
                             "threshold that is not above half of their neighbourhood; use an int for a count")
        if self.weighting == "num_examples" and self.distributed_dp is not None:
            raise ValueError("weighting = \"num_examples\" cannot be combined with distributed_dp, whose privacy "
                             "accounting counts each update once: use weighting = \"uniform\" (or \"auto\")")
        if isinstance(t, int) and t < 2:
            raise ValueError("reconstruction_threshold must be at least 2 institutions: with 1, any single "
                             "neighbour's shares would unmask an institution's update")
        if isinstance(self.neighbours, int) and self.neighbours < 2:
            raise ValueError("neighbours must be \"auto\" or a degree of at least 2")
        return self


class CentralEvaluationConfig(_Strict):
    """Server-side evaluation of each committed model on a dataset's test split."""

    dataset: str
    seed: int = 0
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    data_dir: Path | None = None

    @field_validator("dataset")
    @classmethod
    def _builtin_dataset(cls, v: str) -> str:
        return _known_dataset(v, KNOWN_DATASETS)


CompressionMethod = Literal["none", "fp16", "bf16", "int8", "topk"]


class CompressionConfig(_Strict):
    """How institutions encode their updates (fedcollab.compression): fp16/bf16 halve
    them, int8 with one float32 scale per block of `block_elements` elements (per
    tensor) quarters them, topk sends the ceil(topk_fraction * elements) largest
    entries of the whole update as (index, value) pairs and keeps the rest at the
    institution for the next round (error feedback)."""

    method: CompressionMethod = "none"
    topk_fraction: float = Field(default=0.01, gt=0, le=1)
    block_elements: int = Field(default=256, ge=16, le=65536)

    @model_validator(mode="after")
    def _settings_match_method(self) -> CompressionConfig:
        stray = [f"{k} applies only to method = {m!r}" for k, m in (("topk_fraction", "topk"),
                 ("block_elements", "int8")) if k in self.model_fields_set and self.method != m]
        if stray:
            raise ValueError(f"{'; '.join(stray)}, not {self.method!r}: remove it or change the method")
        return self


StrategyName = Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "fedmedian",
                       "fedtrimmedavg", "krum", "multikrum", "bulyan"]
SERVER_OPTIMIZERS: tuple[str, ...] = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
ROBUST_STRATEGIES: tuple[str, ...] = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
# Which settings each strategy reads; the defaults (None) are Flower 1.41's for that strategy.
_STRATEGY_SETTINGS: dict[str, tuple[str, ...]] = {
    "fedavg": (), "fedprox": ("proximal_mu",),
    "fedavgm": ("server_learning_rate", "server_momentum"),
    "fedadam": ("eta", "beta_1", "beta_2", "tau"), "fedyogi": ("eta", "beta_1", "beta_2", "tau"),
    "fedadagrad": ("eta", "tau"),
    "fedmedian": (), "fedtrimmedavg": ("trim_fraction",),
    "krum": ("num_malicious",), "multikrum": ("num_malicious", "to_keep"), "bulyan": ("num_malicious",),
}


class StrategyConfig(_Strict):
    """The aggregation rule, named as Flower names its strategies, with their semantics:
    server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad; Reddi et al. 2021) step on
    the streamed mean of the updates; FedProx adds a proximal term at the institutions;
    robust rules (coordinate median, trimmed mean, Krum, Multi-Krum, Bulyan) keep each
    update spilled on disk and aggregate it coordinate block by block."""

    name: StrategyName = "fedavg"
    eta: float | None = Field(default=None, gt=0)
    beta_1: float | None = Field(default=None, ge=0, lt=1)
    beta_2: float | None = Field(default=None, ge=0, lt=1)
    tau: float | None = Field(default=None, gt=0)
    server_learning_rate: float | None = Field(default=None, gt=0)
    server_momentum: float | None = Field(default=None, ge=0, lt=1)
    proximal_mu: float | None = Field(default=None, ge=0)
    trim_fraction: float | None = Field(default=None, ge=0, lt=0.5)
    num_malicious: int | None = Field(default=None, ge=0)
    to_keep: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _settings_match_name(self) -> StrategyConfig:
        allowed = _STRATEGY_SETTINGS[self.name]
        stray = sorted(k for k in self.model_fields_set - {"name"} if k not in allowed)
        if stray:
            uses = ", ".join(allowed) if allowed else "no settings"
            raise ValueError(f"{', '.join(stray)} do not apply to strategy {self.name!r} (it uses {uses}): remove "
                             "them or change the name")
        return self

    @property
    def robust(self) -> bool:
        return self.name in ROBUST_STRATEGIES

    @property
    def num_malicious_or_default(self) -> int:
        return self.num_malicious or 0

    def needed_updates(self) -> int:
        """The fewest updates the rule is defined for (Krum: n >= 2f + 3; Bulyan: n >= 4f + 3)."""
        f = self.num_malicious_or_default
        if self.name in ("krum", "multikrum"):
            return max(2 * f + 3, self.to_keep or 1)
        if self.name == "bulyan":
            return 4 * f + 3
        return 1


class StudyConfig(_Strict):
    name: str = "study"
    rounds: int = Field(default=10, ge=1)
    # Quorum: a round commits only with at least this many accepted updates.
    min_institutions: int = Field(default=2, ge=1)
    # A round opens once this many institutions are online (default: min_institutions).
    min_available_institutions: int | None = Field(default=None, ge=1)
    # Institutions selected per round; 0 selects every one that is online.
    institutions_per_round: int = Field(default=0, ge=0)
    # Institutions asked to evaluate each new model; 0 asks every one that is online.
    # Otherwise a random sample of the online ones, reproducible per round (seed), drawn
    # apart from the training selection: eval_* metrics then come from this many. With
    # hundreds of institutions, every one reporting on every round is most of the load.
    evaluation_institutions_per_round: int = Field(default=0, ge=0)
    round_timeout_s: float = Field(default=600.0, gt=0)
    evaluation_timeout_s: float = Field(default=120.0, gt=0)
    max_round_attempts: int = Field(default=3, ge=1)
    seed: int = 0
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    central_evaluation: CentralEvaluationConfig | None = None
    central_dp: CentralDPConfig | None = None
    secure_aggregation: SecureAggregationConfig | None = None
    compression: CompressionConfig = CompressionConfig()
    strategy: StrategyConfig = StrategyConfig()
    # Over-selection: a round closes as soon as this many updates are accepted (0: it
    # waits for every selected institution, or the deadline). Select more institutions
    # than this (institutions_per_round) and stragglers no longer hold rounds back; their
    # late uploads are refused with ROUND_CLOSED.
    updates_per_round: int = Field(default=0, ge=0)
    # An update whose L2 norm exceeds this is refused (UPDATE_NORM_OUT_OF_BOUNDS) and
    # recorded; NaN and Inf are always refused (NON_FINITE_VALUES). None: no bound.
    max_update_norm: float | None = Field(default=None, gt=0)
    # Bounded influence (fedcollab/coordinator/_weights.py). An update counts for at most
    # this many examples, and never for more than its institution declared at Join.
    max_examples_per_update: int = Field(default=100_000_000, ge=1, le=10**12)
    # An evaluation report counts for at most this many examples.
    max_examples_per_evaluation: int = Field(default=100_000_000, ge=1, le=10**12)
    # No institution carries more than this share of a round's total weight (of its
    # evaluation's, likewise): larger weights are capped and the rest keep theirs
    # (water-filling). 1.0 allows any share. When fewer than 1/share institutions take
    # part, their weights become equal, the least that any of them can hold.
    max_weight_share: float = Field(default=0.5, gt=0, le=1)
    # Adaptive norm bound for updates the coordinator sees (no secure aggregation, no
    # central DP, not a robust rule): an update whose L2 norm exceeds this factor times
    # the median norm of the last committed round's accepted updates is refused
    # (UPDATE_NORM_OUT_OF_BOUNDS). With no history (round 1), the bound is the factor times
    # the round's own median once at least 3 updates arrived; with fewer, only
    # max_update_norm bounds them. None: off.
    adaptive_norm_factor: float | None = Field(default=10.0, gt=1)

    @property
    def wait_for_institutions(self) -> int:
        return max(self.min_available_institutions or 0, self.min_institutions)

    @model_validator(mode="after")
    def _per_round_covers_quorum(self) -> StudyConfig:
        if self.institutions_per_round and self.institutions_per_round < self.min_institutions:
            raise ValueError(
                f"institutions_per_round ({self.institutions_per_round}) is below "
                f"min_institutions ({self.min_institutions}): no round could reach its quorum"
            )
        if self.secure_aggregation is not None:
            if self.central_dp is not None:
                raise ValueError(
                    "central_dp cannot run with secure_aggregation: the coordinator would have to clip each "
                    "update, and under secure aggregation it never sees one. Use "
                    "[study.secure_aggregation.distributed_dp] (noise added by the institutions) instead"
                )
            if self.min_institutions < 2:
                raise ValueError("secure_aggregation needs min_institutions >= 2: the sum of one update is the update")
            t = self.secure_aggregation.reconstruction_threshold
            if isinstance(t, int) and t > self.min_institutions:
                raise ValueError(
                    f"secure_aggregation.reconstruction_threshold ({t}) exceeds min_institutions "
                    f"({self.min_institutions}): a round that reaches its quorum could not be unmasked. Lower the "
                    "threshold or raise min_institutions"
                )
        return self

    @model_validator(mode="after")
    def _strategy_fits(self) -> StudyConfig:
        st = self.strategy
        if self.updates_per_round:
            if self.updates_per_round < self.min_institutions:
                raise ValueError(f"updates_per_round ({self.updates_per_round}) is below min_institutions "
                                 f"({self.min_institutions}): the round would close before its quorum")
            if self.institutions_per_round and self.updates_per_round > self.institutions_per_round:
                raise ValueError(f"updates_per_round ({self.updates_per_round}) exceeds institutions_per_round "
                                 f"({self.institutions_per_round}): it could never be reached")
        if st.robust:
            if self.secure_aggregation is not None:
                raise ValueError(f"strategy {st.name!r} cannot run with secure_aggregation: a robust rule looks at "
                                 "each update, and secure aggregation shows the coordinator only their sum. Use "
                                 "fedavg (or a server optimizer) with secure aggregation")
            if self.central_dp is not None:
                raise ValueError(f"strategy {st.name!r} cannot run with central_dp: DP-FedAvg's guarantee is for a "
                                 "clipped mean, not for a median or a selection. Use fedavg with central_dp, or bound "
                                 "updates with max_update_norm")
            needed = st.needed_updates()
            if self.min_institutions < needed:
                raise ValueError(f"strategy {st.name!r} with num_malicious = {st.num_malicious_or_default} needs at "
                                 f"least {needed} updates per round, but min_institutions is {self.min_institutions}: "
                                 "raise min_institutions or lower num_malicious")
        return self

    @model_validator(mode="after")
    def _compression_fits(self) -> StudyConfig:
        # Central DP and institution-level DP-SGD are fine with every method: the
        # coordinator clips the decoded update, and DP-SGD's output may be post-processed.
        if self.compression.method != "none" and self.secure_aggregation is not None:
            raise ValueError(
                f"compression.method = {self.compression.method!r} cannot run with secure_aggregation: masked "
                "updates are already integers mod 2^bits (lower secure_aggregation.bits to send fewer bytes) and "
                "the coordinator never sees an update to decode. Set compression.method = \"none\""
            )
        return self


class FederationInfo(_Strict):
    name: str = "federation"


class FederationConfig(_Strict):
    """The coordinator's file (federation.toml)."""

    federation: FederationInfo = FederationInfo()
    server: ServerConfig = ServerConfig()
    study: StudyConfig


class PartitionConfig(_Strict):
    """Take one partition of the dataset's training split (rehearsals, simulations)."""

    scheme: Literal["iid", "dirichlet", "quantity"] = "dirichlet"
    num_partitions: int = Field(ge=1)
    index: int = Field(ge=0)
    alpha: float = Field(default=0.5, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _index_in_range(self) -> PartitionConfig:
        if self.index >= self.num_partitions:
            raise ValueError(
                f"index {self.index} is out of range for {self.num_partitions} partitions "
                f"(0..{self.num_partitions - 1})"
            )
        return self


class DataConfig(_Strict):
    # A dataset fedcollab knows ("digits", "breast_cancer", "fashion_mnist"), or "npz":
    # your own arrays `x` and `y` in the file at `path`.
    dataset: str
    path: Path | None = None
    data_dir: Path | None = None
    seed: int = 0
    # Share of a known dataset held out as the federation's global test split; it must
    # match the coordinator's central_evaluation so no institution trains on it.
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    # Share of the institution's own data held out for federated evaluation.
    val_fraction: float = Field(default=0.2, ge=0, lt=1)
    partition: PartitionConfig | None = None
    # The key of this data in the site's privacy ledger: every study that trains on it
    # spends from one budget. Unset: the data's source (the built-in dataset's name, or
    # the npz file's resolved path; see fedcollab/privacy/_dataset.py). Set it to keep
    # the budget when the file moves, or to tell two truly disjoint datasets apart.
    id: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")

    @field_validator("dataset")
    @classmethod
    def _known_source(cls, v: str) -> str:
        return _known_dataset(v, DATA_SOURCES)

    @model_validator(mode="after")
    def _npz_needs_path(self) -> DataConfig:
        if self.dataset == "npz" and self.path is None:
            raise ValueError('dataset "npz" needs `path` to a .npz file holding arrays x and y')
        if self.dataset == "fashion_mnist" and self.data_dir is None:
            raise ValueError('dataset "fashion_mnist" needs `data_dir`, the folder with its IDX files')
        return self

    @model_validator(mode="after")
    def _keys_apply_to_dataset(self) -> DataConfig:
        """A key the chosen dataset does not read would be ignored without a word."""
        reads = _DATASET_KEYS.get(self.dataset, set())
        stray = [k for k in sorted(self.model_fields_set - _DATA_KEYS_ALWAYS - reads) if getattr(self, k) is not None]
        if stray:
            why = (" (npz data is used whole: split or partition the arrays before writing the file)"
                   if self.dataset == NPZ else "")
            raise ValueError(f"{', '.join(f'data.{k}' for k in stray)} {'does' if len(stray) == 1 else 'do'} not "
                             f"apply to dataset {self.dataset!r}, "
                             f"which reads {', '.join(sorted(_DATA_KEYS_ALWAYS | reads))}{why}: remove them")
        return self


# Which [data] keys each dataset reads besides these (the rest it would ignore).
_DATA_KEYS_ALWAYS = {"dataset", "seed", "val_fraction", "id"}
_DATASET_KEYS: dict[str, set[str]] = {
    NPZ: {"path"},
    "digits": {"test_fraction", "partition"},
    "breast_cancer": {"test_fraction", "partition"},
    # test_fraction too: fashion_mnist's official split ignores it, but simulations pass
    # the study's central_evaluation.test_fraction to every dataset alike.
    "fashion_mnist": {"data_dir", "test_fraction", "partition"},
}


def _known_dataset(name: str, known: tuple[str, ...]) -> str:
    if name not in known:
        hint = "; npz is your own arrays x and y in the file at `path`" if NPZ in known else ""
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(known)}{hint}")
    return name


class PrivacyConfig(_Strict):
    """The institution's own sample-level DP (Opacus DP-SGD). The noise multiplier is
    calibrated so each study's planned rounds spend `target_epsilon`; `budget_epsilon`
    (default: the target) is the site's budget on its data, across every study: the
    daemon refuses any task that would take the site's composed spend past it."""

    target_epsilon: float = Field(gt=0, le=100)
    target_delta: float = Field(default=1e-5, gt=0, lt=0.1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    accountant: Accountant = "prv"
    # Opacus' per-sample-gradient mode; "auto" measures which is fastest for the model.
    grad_sample_mode: Literal["auto", "hooks", "ghost", "functorch"] = "auto"
    budget_epsilon: float | None = Field(default=None, gt=0, le=100)

    @property
    def budget(self) -> float:
        return self.budget_epsilon if self.budget_epsilon is not None else self.target_epsilon

    @model_validator(mode="after")
    def _budget_covers_target(self) -> PrivacyConfig:
        if self.budget < self.target_epsilon:
            raise ValueError(
                f"budget_epsilon ({self.budget}) is below target_epsilon ({self.target_epsilon}): noise calibrated "
                "for the target would exhaust the budget part-way through the study; lower target_epsilon"
            )
        return self


class ReconnectConfig(_Strict):
    initial_backoff_s: float = Field(default=0.5, gt=0)
    max_backoff_s: float = Field(default=30.0, gt=0)


class InstitutionInfo(_Strict):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    coordinator: str = "127.0.0.1:50051"
    state_dir: Path = Path("institution-state")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "torch" trains on the data; "synthetic" sends a small random update without
    # touching data (benchmarks and load tests only).
    trainer: Literal["torch", "synthetic"] = "torch"
    # CPU threads for torch; 0 keeps torch's default (all cores). Set 1 when several
    # daemons share one machine (a rehearsal): spinning thread pools starve each other.
    threads: int = Field(default=0, ge=0, le=1024)
    # The coordinator's lineage-public-key.pem, to pin: a coordinator presenting
    # another key is refused at Join. Unset: the key given at Join is trusted.
    lineage_public_key: Path | None = None

    @field_validator("coordinator")
    @classmethod
    def _connect_address(cls, v: str) -> str:
        parse_address(v, listen=False)
        return v


class PolicyConfig(_Strict):
    """[policy]: what this institution takes part in, decided here; the coordinator
    cannot override it. Each study is accepted or declined when the daemon first sees
    it (the decline and its reason are recorded on both sides), and every task is
    checked again against the limits."""

    # Study names, or shell patterns ("digits-*"), this institution takes part in.
    # Empty (the default): only the coordinator's default study (the one its
    # federation.toml runs), never a study an operator submits later: taking part in a
    # new study is the site's decision, so a site names what it accepts. "*" accepts
    # every study; the site's privacy budget still bounds them all together.
    studies: list[str] = Field(default_factory=list)
    # Model kinds accepted (e.g. ["mlp", "lora_transformer"]); empty: any kind.
    model_kinds: list[str] = Field(default_factory=list)
    # A sub-limit (epsilon) per study name inside the site's budget ([privacy]
    # budget_epsilon, shared by every study on the same data): the study's own spend
    # stays within it, and the site's total within the budget. 0 declines the study.
    budgets: dict[str, float] = Field(default_factory=dict)
    # Local compute: at most this many epochs per round; a round's training at most this
    # long (a study whose last round here took longer is declined from then on); at most
    # this much GPU memory (torch's per-process cap, on CUDA).
    max_local_epochs: int | None = Field(default=None, ge=1)
    max_train_seconds: float | None = Field(default=None, gt=0)
    max_gpu_memory_gb: float | None = Field(default=None, gt=0)
    # Only studies whose coordinator never sees an update in the clear.
    require_secure_aggregation: bool = False

    @field_validator("budgets")
    @classmethod
    def _budgets_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for name, eps in v.items():
            if not 0 <= eps <= 100:
                raise ValueError(f"budgets.{name} = {eps}: an epsilon between 0 (decline the study) and 100")
        return v


class InstitutionConfig(_Strict):
    """An institution daemon's file (institution.toml)."""

    institution: InstitutionInfo
    data: DataConfig | None = None
    privacy: PrivacyConfig | None = None
    reconnect: ReconnectConfig = ReconnectConfig()
    tls: TlsConfig | None = None
    policy: PolicyConfig = PolicyConfig()

    @model_validator(mode="after")
    def _torch_needs_data(self) -> InstitutionConfig:
        if self.institution.trainer == "torch" and self.data is None:
            raise ValueError("a [data] table is needed to train (or set institution.trainer)")
        if self.privacy is not None and self.institution.trainer != "torch":
            raise ValueError("[privacy] needs institution.trainer = \"torch\": DP-SGD trains on data")
        if self.privacy is not None:
            over = {n: e for n, e in self.policy.budgets.items() if e > self.privacy.budget}
            if over:
                raise ValueError(
                    f"policy.budgets {over} exceed the site's privacy budget ({self.privacy.budget:g}, "
                    "[privacy] budget_epsilon or target_epsilon): a study's sub-limit lies inside the site's "
                    "budget, which every study on this data shares; lower the sub-limit or raise budget_epsilon")
        return self


class AttackConfig(_Strict):
    """[simulation.attack]: the last `institutions` institutions of a simulation send
    poisoned updates (fedcollab/simulation/_attacks.py), to rehearse robust rules."""

    institutions: int = Field(ge=1)
    kind: Literal["sign_flip", "scale", "random"]
    scale: float = Field(default=10.0, gt=0)


class SimulationConfig(_Strict):
    """The [simulation] table of a scenario file; the rest of it is a federation.toml."""

    name: str = "simulation"
    institutions: int = Field(default=4, ge=1, le=64)
    dataset: str = "digits"
    data_dir: Path | None = None
    partition: Literal["iid", "dirichlet", "quantity"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0)
    partition_seed: int = 42
    val_fraction: float = Field(default=0.2, ge=0, lt=1)
    output_dir: Path = Path("runs")
    attack: AttackConfig | None = None

    @field_validator("dataset")
    @classmethod
    def _builtin_dataset(cls, v: str) -> str:
        return _known_dataset(v, KNOWN_DATASETS)

    @model_validator(mode="after")
    def _some_institutions_are_honest(self) -> SimulationConfig:
        if self.attack is not None and self.attack.institutions >= self.institutions:
            raise ValueError(f"attack.institutions ({self.attack.institutions}) must leave at least one of the "
                             f"{self.institutions} institutions honest")
        return self


class Scenario(_Strict):
    simulation: SimulationConfig = SimulationConfig()
    # Each simulated institution's own [privacy] table (the same for all of them).
    privacy: PrivacyConfig | None = None
    federation: FederationInfo = FederationInfo()
    server: ServerConfig = ServerConfig()
    study: StudyConfig

    def federation_config(self) -> FederationConfig:
        return FederationConfig(federation=self.federation, server=self.server, study=self.study)


T = TypeVar("T", bound=BaseModel)


class StudyFile(_Strict):
    """A study submitted to a running coordinator (`fedcollab study submit FILE`): the
    [study] table of federation.toml, and when to start it."""

    study: StudyConfig
    # Start once this study has finished or was cancelled; empty: at once, side by side.
    start_after: str = ""


def _describe(error: ValidationError, *, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and the table it is in)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        got = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def _resolve_paths(value: Any, base: Path) -> Any:
    if isinstance(value, BaseModel):
        updates = {}
        for name in type(value).model_fields:
            field = getattr(value, name)
            new = _resolve_paths(field, base)
            if new is not field:
                updates[name] = new
        return value.model_copy(update=updates) if updates else value
    if isinstance(value, Path) and not value.is_absolute():
        return base / value
    return value


def parse_config(cls: type[T], data: dict[str, Any], *, source: str, base_dir: Path | None = None) -> T:
    try:
        value = cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source=source)) from None
    return _resolve_paths(value, base_dir) if base_dir is not None else value


def load_config(cls: type[T], path: str | Path) -> T:
    """Load and validate a TOML file; every problem is reported with its key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    return parse_config(cls, data, source=str(path), base_dir=path.resolve().parent)
