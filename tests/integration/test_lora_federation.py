"""Adapter-only exchange over real gRPC: a lora_transformer study commits only adapter
tensors, each upload is exactly the adapters' bytes, DP-SGD trains them, and an
institution whose frozen base hashes otherwise refuses the model before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedcollab.config import ModelConfig, PrivacyConfig, TrainConfig
from fedcollab.coordinator import Coordinator
from fedcollab.coordinator._bounds import water_fill
from fedcollab.institution import daemon_from_config
from fedcollab.institution._daemon import DaemonEvent
from fedcollab.models import _lora, build_model, lora_base_sha256
from tests.conftest import institution_config, recording_daemon, running, tiny_federation, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]

NAMES = ["hospital-a", "hospital-b", "lab-c"]
BASE = {"d_model": 16, "heads": 2, "layers": 1, "base_seed": 3}
PARAMS = {**BASE, "base_sha256": lora_base_sha256(params=BASE), "rank": 2, "alpha": 4.0}
LORA = ModelConfig(kind="lora_transformer", params=PARAMS)
TRAIN = TrainConfig(local_epochs=1, batch_size=32, learning_rate=0.01, optimizer="adam")


def _reference() -> tuple[list[str], int]:
    """The exchanged names and their float32 bytes, from a model built here."""
    state = build_model(kind="lora_transformer", params=PARAMS).state_dict()
    return sorted(state), sum(t.numel() * t.element_size() for t in state.values())


def test_only_adapters_are_committed_and_uploaded(tmp_path: Path) -> None:
    names, adapter_bytes = _reference()
    assert all(".lora_" in n or n.startswith("head.") for n in names)
    config = tiny_federation(tmp_path / "coordinator", model=LORA, train=TRAIN)
    with Coordinator(config=config) as coordinator:
        pairs = [recording_daemon(institution_config(n, address=f"127.0.0.1:{coordinator.port}", index=i, parts=3,
                                                     state_root=tmp_path)) for i, n in enumerate(NAMES)]
        with running([d for d, _ in pairs]) as outcome:
            assert coordinator.wait(timeout=120), "study did not finish"
            wait_until(lambda: len(outcome) == len(NAMES), timeout=20, what="daemons to see the study finish")
        models = {m.version: m for m in coordinator.store.models()}
        rounds = [r for r in coordinator.store.rounds() if r["status"] == "committed"]

    assert outcome == {n: True for n in NAMES}
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert sorted(models) == [0, 1, 2, 3]
    for version, model in models.items():
        committed = load_file(str(model.path))
        assert sorted(committed) == names, f"v{version} holds more than the adapters"
        assert model.size_bytes < adapter_bytes + 4096  # the file is the adapters and a header, no base
    trainers = [t for _, t in pairs]
    for r in (1, 2, 3):
        sent = [t.sent[r] for t in trainers]
        assert all(sorted(state) == names for _, state in sent)
        # Example-weighted, with no institution above the default max_weight_share (0.5).
        counted = water_fill({str(i): n for i, (n, _) in enumerate(sent)}, max_share=0.5)
        sent = [(counted[str(i)], state) for i, (_, state) in enumerate(sent)]
        total = sum(n for n, _ in sent)
        committed = load_file(str(models[r].path))
        for name, value in committed.items():  # FedAvg over the adapters, A and B each
            expected = sum(n * state[name].double() for n, state in sent) / total
            torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
        m = rounds[r - 1]["metrics"]
        assert m["bytes_in"] == len(NAMES) * adapter_bytes  # each upload: the adapters, nothing else
        assert m["num_updates"] == 3 and 0.0 < m["central_accuracy"] <= 1.0
    # The daemons' frozen bases were never touched by training.
    fresh = dict(build_model(kind="lora_transformer", params=PARAMS).named_parameters())
    for daemon, _ in pairs:
        assert daemon._model is not None
        for name, p in daemon._model.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p.detach(), fresh[name].detach()), f"{daemon.name}: frozen {name} changed"


def test_adapters_train_under_institution_dp(tmp_path: Path) -> None:
    names, adapter_bytes = _reference()
    config = tiny_federation(tmp_path / "coordinator", model=LORA, rounds=2,
                             train=TrainConfig(local_epochs=1, batch_size=64, learning_rate=1.0, optimizer="sgd"))
    # A 10 s lease: the first DP round imports peft and times Opacus' modes, which on a
    # loaded 2-core machine can starve the heartbeat thread past the tiny default of 2 s;
    # a lapsed round would then spend budget and leave none for the second one.
    config = config.model_copy(update={"server": config.server.model_copy(update={"lease_intervals": 50})})
    with Coordinator(config=config) as coordinator:
        daemons = []
        for i, n in enumerate(NAMES):
            base = institution_config(n, address=f"127.0.0.1:{coordinator.port}", index=i, parts=3,
                                      state_root=tmp_path)
            privacy = PrivacyConfig(target_epsilon=5.0, target_delta=1e-5, accountant="rdp",
                                    grad_sample_mode="auto" if i == 0 else "hooks")
            daemon = daemon_from_config(base.model_copy(update={"privacy": privacy}))
            daemon._poll_wait = 1.0
            daemons.append(daemon)
        with running(daemons) as outcome:
            assert coordinator.wait(timeout=150), "study did not finish"
            wait_until(lambda: len(outcome) == len(NAMES), timeout=20, what="daemons to finish")
        rounds = [r for r in coordinator.store.rounds() if r["status"] == "committed"]
        reported = coordinator.store.privacy_spend()
        latest = coordinator.store.latest_model()
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["metrics"]["bytes_in"] == len(NAMES) * adapter_bytes for r in rounds)
    assert latest is not None and sorted(load_file(str(latest.path))) == names
    assert daemons[0]._trainer.last_mode in ("hooks", "ghost", "functorch")  # measured on the LoRA model
    assert {(p["round"], p["institution"]) for p in reported} == {(r, n) for r in (1, 2) for n in NAMES}
    assert all(0 < p["epsilon"] <= 5.0 for p in reported)
    for d in daemons:
        assert d.privacy is not None and d.privacy.ledger.verify().ok


def test_an_institution_with_another_base_refuses_before_training(tmp_path: Path, monkeypatch) -> None:
    config = tiny_federation(tmp_path / "coordinator", model=LORA, train=TRAIN, min_institutions=1,
                             max_round_attempts=1, rounds=1)
    with Coordinator(config=config) as coordinator:
        # From here on this process draws other base weights, as another torch build might.
        real = _lora._build_base
        monkeypatch.setattr(_lora, "_build_base", lambda c, seed: real(c, seed + 1))
        events: list[DaemonEvent] = []
        daemon, trainer = recording_daemon(institution_config(NAMES[0], address=f"127.0.0.1:{coordinator.port}",
                                                              index=0, parts=3, state_root=tmp_path))
        daemon._on_event = events.append
        with running([daemon]):
            wait_until(lambda: any(p["status"] == "declined" for p in coordinator.store.participations()),
                       timeout=60, what="the institution to decline round 1")
        declined = coordinator.store.participations(round_number=1)
        committed = [r for r in coordinator.store.rounds() if r["status"] == "committed"]
    assert [(p["institution"], p["status"]) for p in declined] == [(NAMES[0], "declined")]
    assert declined[0]["reason"].startswith("MODEL_BUILD_FAILED: ")
    assert "not the one the study names" in declined[0]["reason"]
    assert trainer.sent == {}, "nothing may be trained on another base"
    assert committed == []
    assert any(e.kind == "refused" and "MODEL_BUILD_FAILED" in e.detail for e in events)

