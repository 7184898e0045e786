"""DP-FedAvg at the coordinator over real gRPC: committed models are base + the uniform
mean of clipped deltas (+ noise), epsilon is recorded per round, and the adaptive clip
norm carries over a restart."""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedcollab.config import AdaptiveClippingConfig, CentralDPConfig
from fedcollab.coordinator import Coordinator, RoundResult
from fedcollab.privacy import epsilon_of
from fedcollab.v1 import coordinator_service_pb2 as pb
from tests.conftest import RecordingTrainer, institution_config, recording_daemon, running, tiny_federation, wait_until
from tests.integration.test_bad_uploads import Client, deltas_for, messages

pytestmark = pytest.mark.integration

NAMES = ["hospital-a", "hospital-b", "lab-c"]


def _clipped_mean(base_path: Path, sent: list[tuple[int, dict[str, torch.Tensor]]], clip_norm: float
                  ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """base + mean_k(delta_k * min(1, S / ||delta_k||)) in float64, from what the
    institutions trained (deltas as the daemon computes them: float32 local - base)."""
    base = load_file(str(base_path))
    deltas = [{k: state[k] - base[k] for k in base} for _, state in sent]
    norms = [math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values())) for delta in deltas]
    scales = [min(1.0, clip_norm / n) for n in norms]
    mean = {k: base[k].double() + sum(s * d[k].double() for d, s in zip(deltas, scales, strict=True)) / len(deltas)
            for k in base}
    return mean, norms


def _epsilon(z: float, k: int, *, delta: float, accountant: str) -> float:
    with np.errstate(divide="ignore"):  # PRV's log(1 - q) at q = 1
        return epsilon_of(history=[(z, 1.0, k)], delta=delta, accountant=accountant)


def test_without_noise_the_model_is_base_plus_the_uniform_mean_of_clipped_deltas(tmp_path: Path) -> None:
    clip = 2.0  # the tiny MLP's deltas have norms of about 1.6-2.7 after one epoch of Adam: one gets clipped
    config = tiny_federation(tmp_path / "coordinator", central_dp=CentralDPConfig(clip_norm=clip, noise_multiplier=0.0))
    with Coordinator(config=config) as coordinator:
        pairs = [recording_daemon(institution_config(n, address=f"127.0.0.1:{coordinator.port}", index=i, parts=3,
                                                     state_root=tmp_path)) for i, n in enumerate(NAMES)]
        with running([d for d, _ in pairs]) as outcome:
            assert coordinator.wait(timeout=90), "study did not finish"
            wait_until(lambda: len(outcome) == 3, timeout=20, what="daemons to see the study finish")
        models = {m.version: m for m in coordinator.store.models()}
        rounds = [r for r in coordinator.store.rounds() if r["status"] == "committed"]

    assert [r["round"] for r in rounds] == [1, 2, 3]
    trainers: list[RecordingTrainer] = [t for _, t in pairs]
    clipped_any = unclipped_any = False
    for r in (1, 2, 3):
        sent = [t.sent[r] for t in trainers]
        assert len({n for n, _ in sent}) > 1, "example counts differ, so uniform and weighted means differ"
        expected, norms = _clipped_mean(models[r - 1].path, sent, clip)
        committed = load_file(str(models[r].path))
        for name, value in committed.items():
            torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6)
        m = rounds[r - 1]["metrics"]
        assert m["clip_norm"] == m["clip_norm_next"] == clip and m["noise_std"] == 0.0
        assert m["clipped_fraction"] == pytest.approx(sum(v > clip for v in norms) / 3)
        assert m["central_dp_epsilon"] == math.inf and m["central_dp_delta"] == 1e-5
        assert m["num_updates"] == 3
        clipped_any |= any(v > clip for v in norms)
        unclipped_any |= any(v <= clip for v in norms)
    assert clipped_any and unclipped_any, f"at S={clip} clipping should touch some updates and not others"


def test_noise_and_adaptive_clipping_record_epsilon_per_round_and_survive_a_restart(tmp_path: Path) -> None:
    z = 1.0
    dp = CentralDPConfig(clip_norm=2.0, noise_multiplier=z, accountant="rdp",
                         adaptive=AdaptiveClippingConfig(target_quantile=0.5, learning_rate=0.5,
                                                         count_noise_multiplier=1.0))
    state = tmp_path / "coordinator"
    config = tiny_federation(state, rounds=3, central_dp=dp)
    two_committed = threading.Event()

    def on_round(r: RoundResult) -> None:
        if r.status == "committed" and r.round == 2:
            two_committed.set()

    first = Coordinator(config=config, on_round=on_round)
    address = f"127.0.0.1:{first.start()}"
    pairs = [recording_daemon(institution_config(n, address=address, index=i, parts=3, state_root=tmp_path))
             for i, n in enumerate(NAMES)]
    with running([d for d, _ in pairs]) as outcome:
        try:
            assert two_committed.wait(timeout=60), "round 2 never committed"
        finally:
            first.stop()
        second = Coordinator(config=config.model_copy(update={
            "server": config.server.model_copy(update={"address": address})}))
        with second:
            resumed = second.engine._central_dp
            assert resumed is not None
            restored_clip, resumed_from = resumed.clip_norm, second.engine.current_model.version
            assert second.wait(timeout=60), "the restarted coordinator did not finish the study"
            wait_until(lambda: len(outcome) == 3, timeout=20, what="daemons to see the study finish")
            rounds = second.store.rounds()
            models = {m.version: m for m in second.store.models()}

    committed = [r for r in rounds if r["status"] == "committed"]
    assert [r["round"] for r in committed] == [1, 2, 3]
    metrics = [r["metrics"] for r in committed]
    # Every committed round adds one step at q = 1; failed or abandoned attempts add none.
    for k, m in enumerate(metrics, start=1):
        assert m["central_dp_epsilon"] == pytest.approx(_epsilon(z, k, delta=1e-5, accountant="rdp"), rel=1e-12)
        z_delta = (z**-2 - 2.0**-2) ** -0.5
        assert m["noise_std"] == pytest.approx(z_delta * m["clip_norm"] / 3, rel=1e-12)
    assert metrics[0]["central_dp_epsilon"] < metrics[1]["central_dp_epsilon"] < metrics[2]["central_dp_epsilon"]
    # The clip norm moves round to round; the restarted coordinator took it from the last
    # committed round, not from the config.
    assert metrics[0]["clip_norm"] == 2.0
    for before, after in itertools.pairwise(metrics):
        assert after["clip_norm"] == before["clip_norm_next"]
    assert resumed_from in (2, 3)
    assert restored_clip == metrics[resumed_from - 1]["clip_norm_next"] != 2.0
    # The noise is there, at its scale: the committed model minus the noiseless clipped
    # mean has the recorded std (1,210 coordinates: within 15%).
    trainers = [t for _, t in pairs]
    for r in (1, 2, 3):
        expected, _ = _clipped_mean(models[r - 1].path, [t.sent[r] for t in trainers], metrics[r - 1]["clip_norm"])
        committed_model = load_file(str(models[r].path))
        residual = torch.cat([(committed_model[k].double() - expected[k]).reshape(-1) for k in expected])
        assert abs(float(residual.std()) / metrics[r - 1]["noise_std"] - 1) < 0.15


def _nan_at_the_end(deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    last = list(deltas)[-1]
    deltas[last].view(-1)[-1] = float("nan")
    return deltas


def test_refused_uploads_leave_nothing_in_the_clipped_sum(tmp_path: Path) -> None:
    """Mallory's update arrives whole (its norm measured) but fails its hash, is cut
    short, or breaks mid-stream: under central DP it is never folded, and the honest
    updates, clipped, are all there is."""
    clip = 10.0
    cases = [
        ("whole-update hash mismatch", lambda s, t: messages(s, t, deltas_for(t, 1e3),
                                                             sha256=hashlib.sha256(b"other").digest())),
        ("truncated stream", lambda s, t: messages(s, t, deltas_for(t, 1e3))[:3]),
        ("NaN in the last chunk", lambda s, t: messages(s, t, _nan_at_the_end(deltas_for(t, 1e3)))),
    ]
    config = tiny_federation(tmp_path / "coordinator", rounds=len(cases), min_institutions=2,
                             min_available_institutions=3, central_evaluation=None,
                             central_dp=CentralDPConfig(clip_norm=clip, noise_multiplier=0.0))
    honest = {"honest-a": (10, 0.25), "honest-b": (1000, -0.5)}  # name: (examples, delta value)
    with Coordinator(config=config) as coordinator:
        address = f"127.0.0.1:{coordinator.port}"
        clients = {n: Client(address, n) for n in [*honest, "mallory"]}
        for _case, build in cases:
            tasks = {n: c.task(pb.TASK_KIND_TRAIN) for n, c in clients.items()}
            for name, (n, value) in honest.items():
                clients[name].upload(messages(clients[name].session, tasks[name], deltas_for(tasks[name], value),
                                              num_examples=n))
            with pytest.raises(grpc.RpcError):
                clients["mallory"].upload(build(clients["mallory"].session, tasks["mallory"]))
            for c in clients.values():
                c.evaluate()
        assert coordinator.wait(timeout=30)
        models = {m.version: load_file(str(m.path)) for m in coordinator.store.models()}
        rounds = [r for r in coordinator.store.rounds() if r["status"] == "committed"]
        for c in clients.values():
            c.channel.close()

    numel = 1210
    norms = [abs(v) * math.sqrt(numel) for _, v in honest.values()]  # 8.7 (kept) and 17.4 (clipped)
    step = sum(v * min(1.0, clip / nrm) for (_, v), nrm in zip(honest.values(), norms, strict=True)) / 2
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in (1, 2, 3):
        m = rounds[r - 1]["metrics"]
        assert m["num_updates"] == 2 and m["clipped_fraction"] == 0.5
        for name, value in models[r].items():
            torch.testing.assert_close(value, models[r - 1][name] + step, rtol=0, atol=1e-6,
                                       msg=f"round {r} ({cases[r - 1][0]}): aggregate is off")
