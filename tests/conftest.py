"""Shared fixtures: a tiny study on digits, daemons in threads, a manual client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedcollab.config import (
    CentralEvaluationConfig,
    DataConfig,
    FederationConfig,
    InstitutionConfig,
    InstitutionInfo,
    ModelConfig,
    PartitionConfig,
    ReconnectConfig,
    ServerConfig,
    StudyConfig,
    TrainConfig,
)
from fedcollab.institution import InstitutionDaemon, TorchTrainer, load_local_data
from fedcollab.institution._trainer import EvalResult, TrainResult

TINY_MLP = ModelConfig(kind="mlp", params={"in_features": 64, "hidden": [16], "num_classes": 10})


def tiny_federation(state_dir: Path, **study: Any) -> FederationConfig:
    """3 rounds of a 1,210-parameter MLP; 1 KiB chunks so every update spans several."""
    values: dict[str, Any] = dict(
        name="tiny", rounds=3, min_institutions=3, round_timeout_s=30, evaluation_timeout_s=10,
        model=TINY_MLP, train=TrainConfig(local_epochs=1, batch_size=32, learning_rate=0.01, optimizer="adam"),
        central_evaluation=CentralEvaluationConfig(dataset="digits"),
    )
    values.update(study)
    return FederationConfig(
        server=ServerConfig(address="127.0.0.1:0", state_dir=state_dir, chunk_bytes=1024,
                            heartbeat_interval_s=0.2, lease_intervals=10, max_poll_wait_s=1.0),
        study=StudyConfig(**values),
    )


def institution_config(name: str, *, address: str, index: int, parts: int, state_root: Path) -> InstitutionConfig:
    return InstitutionConfig(
        institution=InstitutionInfo(name=name, coordinator=address, state_dir=state_root / name, device="cpu"),
        data=DataConfig(dataset="digits", val_fraction=0.2,
                        partition=PartitionConfig(scheme="dirichlet", num_partitions=parts, index=index, seed=1)),
        reconnect=ReconnectConfig(initial_backoff_s=0.05, max_backoff_s=0.5),
    )


class RecordingTrainer:
    """A real TorchTrainer that also keeps what it sent: the model after each round's training."""

    def __init__(self, inner: TorchTrainer) -> None:
        self._inner = inner
        self.sent: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}

    @property
    def num_train_examples(self) -> int:
        return self._inner.num_train_examples

    def train(self, *, model: torch.nn.Module, plan: Any, round_number: int, privacy: Any = None) -> TrainResult:
        result = self._inner.train(model=model, plan=plan, round_number=round_number, privacy=privacy)
        self.sent[round_number] = (result.num_examples, {k: v.detach().clone() for k, v in model.state_dict().items()})
        return result

    def evaluate(self, *, model: torch.nn.Module) -> EvalResult:
        return self._inner.evaluate(model=model)


def recording_daemon(config: InstitutionConfig, *, credentials: grpc.ChannelCredentials | None = None
                     ) -> tuple[InstitutionDaemon, RecordingTrainer]:
    assert config.data is not None
    train, val = load_local_data(config.data)
    trainer = RecordingTrainer(TorchTrainer(train=train, val=val, device=torch.device("cpu")))
    daemon = InstitutionDaemon(config=config, trainer=trainer, num_train_examples=len(train),
                               credentials=credentials, poll_wait_s=1.0)
    return daemon, trainer


@contextmanager
def running(daemons: list[InstitutionDaemon]) -> Iterator[dict[str, bool]]:
    """Runs daemons in threads; yields {name: finished} filled in as they end."""
    stop = threading.Event()
    outcome: dict[str, bool] = {}

    def run(d: InstitutionDaemon) -> None:
        outcome[d.name] = d.run(stop=stop)

    threads = [threading.Thread(target=run, args=(d,), daemon=True) for d in daemons]
    for t in threads:
        t.start()
    try:
        yield outcome
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def test_ca() -> Any:
    from tests._pki import TestCA

    return TestCA()


def assert_spent_as_planned(entries: dict[str, list[Any]], *, rounds: int, target: float) -> None:
    """Each site's ledger rows (LedgerEntry): one per round 1..rounds, and the spend
    after the last exactly what its noise was calibrated for (the planned rounds at the
    first row's noise, rate and steps), within the calibration's 1% under `target`."""
    from fedcollab.privacy._accounting import epsilon_of

    for name, rows in entries.items():
        assert [e.round for e in rows] == list(range(1, rounds + 1)), (name, [(e.round, e.nonce) for e in rows])
        first = rows[0]
        planned = epsilon_of(history=[(first.noise_multiplier, first.sample_rate, first.steps * rounds)],
                             delta=first.delta, accountant=first.accountant)
        assert rows[-1].epsilon == pytest.approx(planned, rel=1e-9), name
        assert 0.98 * target <= rows[-1].epsilon <= target * (1 + 1e-9), name
