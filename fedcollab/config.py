"""Typed configuration: TOML files -> validated, frozen values with clear errors.

Relative paths in a file are resolved against that file's folder, so a config works
from wherever the command is run.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class ServerConfig(_Strict):
    address: str = "127.0.0.1:50051"
    state_dir: Path = Path("coordinator-state")
    chunk_bytes: int = Field(default=4 * MiB, ge=1024, le=64 * MiB)
    max_workers: int = Field(default=64, ge=4, le=1024)
    heartbeat_interval_s: float = Field(default=2.0, gt=0, le=300)
    # An institution silent for this many heartbeat intervals is taken as gone.
    lease_intervals: float = Field(default=5.0, ge=2)
    max_poll_wait_s: float = Field(default=10.0, gt=0, le=120)
    tls: TlsConfig | None = None


class ModelConfig(_Strict):
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Strict):
    local_epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=0.05, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)


class CentralEvaluationConfig(_Strict):
    """Server-side evaluation of each committed model on a dataset's test split."""

    dataset: str
    seed: int = 0
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    data_dir: Path | None = None


class StudyConfig(_Strict):
    name: str = "study"
    rounds: int = Field(default=10, ge=1)
    # Quorum: a round commits only with at least this many accepted updates.
    min_institutions: int = Field(default=2, ge=1)
    # A round opens once this many institutions are online (default: min_institutions).
    min_available_institutions: int | None = Field(default=None, ge=1)
    # Institutions selected per round; 0 selects every one that is online.
    institutions_per_round: int = Field(default=0, ge=0)
    round_timeout_s: float = Field(default=600.0, gt=0)
    evaluation_timeout_s: float = Field(default=120.0, gt=0)
    max_round_attempts: int = Field(default=3, ge=1)
    seed: int = 0
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    central_evaluation: CentralEvaluationConfig | None = None

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

    @model_validator(mode="after")
    def _npz_needs_path(self) -> DataConfig:
        if self.dataset == "npz" and self.path is None:
            raise ValueError('dataset "npz" needs `path` to a .npz file holding arrays x and y')
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


class InstitutionConfig(_Strict):
    """An institution daemon's file (institution.toml)."""

    institution: InstitutionInfo
    data: DataConfig | None = None
    reconnect: ReconnectConfig = ReconnectConfig()
    tls: TlsConfig | None = None

    @model_validator(mode="after")
    def _torch_needs_data(self) -> InstitutionConfig:
        if self.institution.trainer == "torch" and self.data is None:
            raise ValueError("a [data] table is needed to train (or set institution.trainer)")
        return self


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


class Scenario(_Strict):
    simulation: SimulationConfig = SimulationConfig()
    federation: FederationInfo = FederationInfo()
    server: ServerConfig = ServerConfig()
    study: StudyConfig

    def federation_config(self) -> FederationConfig:
        return FederationConfig(federation=self.federation, server=self.server, study=self.study)


T = TypeVar("T", bound=BaseModel)


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
