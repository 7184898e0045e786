"""Signed lineage over real gRPC: every committed version has a record the institutions
verify, and they refuse a model or a coordinator whose lineage does not check out."""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcollab.config import InstitutionConfig
from fedcollab.coordinator import Coordinator
from fedcollab.errors import ConfigError
from fedcollab.institution import CoordinatorClient, DaemonEvent, InstitutionDaemon, TorchTrainer, load_local_data
from fedcollab.lineage import (
    PUBLIC_KEY_FILE,
    SIGNING_KEY_FILE,
    load_or_create_signing_key,
    parse_record,
    raw_public_key,
    read_record_file,
    record_path,
    verify_chain,
    verify_record,
)
from fedcollab.v1 import coordinator_service_pb2 as pb
from tests.conftest import RecordingTrainer, institution_config, running, tiny_federation, wait_until

pytestmark = pytest.mark.integration
NAMES = ["hospital-a", "hospital-b", "lab-c"]


def _daemon(config: InstitutionConfig, events: list[DaemonEvent]) -> tuple[InstitutionDaemon, RecordingTrainer]:
    assert config.data is not None
    train, val = load_local_data(config.data)
    trainer = RecordingTrainer(TorchTrainer(train=train, val=val, device=torch.device("cpu")))
    return InstitutionDaemon(config=config, trainer=trainer, num_train_examples=len(train), poll_wait_s=1.0,
                             on_event=events.append), trainer


def _config(name: str, coordinator: Coordinator, root: Path, index: int, *, pin: Path | None = None
            ) -> InstitutionConfig:
    config = institution_config(name, address=f"127.0.0.1:{coordinator.port}", index=index, parts=3, state_root=root)
    if pin is not None:
        config = config.model_copy(update={"institution": config.institution.model_copy(
            update={"lineage_public_key": pin})})
    return config


@dataclass
class Study:
    state: Path
    public_key: bytes
    records: dict[int, tuple[bytes, bytes]]
    participations: list[dict[str, Any]]
    rounds: list[dict[str, Any]]
    models: dict[int, Any]
    join_key: bytes


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """A 3-round study; hospital-a pins the coordinator's key from its state folder."""
    root = tmp_path_factory.mktemp("lineage")
    state = root / "coordinator"
    with Coordinator(config=tiny_federation(state)) as coordinator:
        pin = state / PUBLIC_KEY_FILE
        daemons = [_daemon(_config(n, coordinator, root, i, pin=pin if n == "hospital-a" else None), [])[0]
                   for i, n in enumerate(NAMES)]
        with running(daemons) as outcome:
            assert coordinator.wait(timeout=90), "study did not finish"
            wait_until(lambda: len(outcome) == len(NAMES), timeout=20, what="daemons to see the study finish")
        assert outcome == {n: True for n in NAMES}
        client = CoordinatorClient(address=coordinator.address, credentials=None)
        try:
            join_key = client.join(institution="observer", num_train_examples=0).lineage_public_key
        finally:
            client.close()
        entries = coordinator.engine.lineage()
        assert entries == coordinator.store.lineage()
        result = Study(
            state=state, public_key=coordinator.engine.lineage_public_key,
            records={v: (r, s) for v, r, s in entries}, participations=coordinator.store.participations(),
            rounds=coordinator.store.rounds(), models={m.version: m for m in coordinator.store.models()},
            join_key=join_key,
        )
    return result


def test_every_version_has_a_record_that_verifies(study: Study) -> None:
    assert study.join_key == study.public_key and len(study.public_key) == 32
    assert study.public_key == raw_public_key(load_or_create_signing_key(study.state))
    assert sorted(study.records) == [0, 1, 2, 3]
    records = {v: verify_record(record_bytes=r, signature=s, public_key=study.public_key)
               for v, (r, s) in study.records.items()}
    v0 = records[0]
    assert v0["parent_sha256"] is None and v0["contributions"] == [] and v0["aggregator"]["name"] == "initial"
    assert v0["aggregator"]["model"]["kind"] == "mlp" and v0["round"] == 0
    committed = {r["round"]: r for r in study.rounds if r["status"] == "committed"}
    for v in (1, 2, 3):
        rec = records[v]
        assert rec["version"] == v and rec["round"] == v and rec["model_sha256"] == study.models[v].sha256
        assert rec["parent_sha256"] == records[v - 1]["model_sha256"]
        assert rec["study"] == "tiny" and rec["federation"] == "federation" and rec["code_version"]
        aggregator = dict(rec["aggregator"])
        bounded = aggregator.pop("bounded_weights", None)  # only where a weight was capped
        assert aggregator == {"name": "fedavg", "weighting": "num_examples"} and rec["central_dp"] is None
        done = [p for p in study.participations
                if p["round"] == v and p["attempt"] == committed[v]["attempt"] and p["status"] == "done"]
        assert [(c["institution"], c["update_sha256"], c["num_examples"]) for c in rec["contributions"]] == \
            [(p["institution"], p["update_sha256"], p["num_examples"]) for p in done]
        if bounded is not None:  # the record names the claim above what counted
            counted = {c["institution"]: c["num_examples"] for c in rec["contributions"]}
            assert bounded["claimed"] and all(n > counted[name] for name, n in bounded["claimed"].items())
        assert len(rec["contributions"]) == 3
    for v, signed in study.records.items():
        assert read_record_file(record_path(study.state, v)) == signed, "the readable copy holds the signed bytes"
    report = verify_chain(study.state)
    assert report.ok, report.problems
    assert report.versions == [0, 1, 2, 3] and report.warnings == []
    assert verify_chain(study.state.parent, public_key=study.state / PUBLIC_KEY_FILE).ok


def _copy_state(study: Study, tmp_path: Path) -> Path:
    """A copy of the study's state folder; the models table names model files by their
    absolute path, so it is pointed at the copies (a coordinator removes the others)."""
    state = tmp_path / "coordinator"
    shutil.copytree(study.state, state)
    db = sqlite3.connect(state / "coordinator.sqlite")
    with db:
        db.execute("UPDATE models SET path = replace(path, ?, ?)", (str(study.state), str(state)))
    db.close()
    return state


@pytest.mark.parametrize("tamper, version, problem", [
    ("model", 2, "v2: model file changed"),
    ("row", 3, "v3: signature does not verify"),
], ids=["model-file", "lineage-row"])
def test_tampering_with_the_state_is_named(study: Study, tmp_path: Path, tamper: str, version: int,
                                          problem: str) -> None:
    state = _copy_state(study, tmp_path)
    if tamper == "model":
        path = state / "models" / study.models[2].path.name
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        db = sqlite3.connect(state / "coordinator.sqlite")
        with db:
            (record,) = db.execute("SELECT record FROM lineage WHERE version=3").fetchone()
            edited = record.replace(b'"num_examples":', b'"num_examples":1', 1)
            db.execute("UPDATE lineage SET record=? WHERE version=3", (edited,))
        db.close()
    report = verify_chain(state)
    assert not report.ok and report.first_broken_version == version
    assert report.problem is not None and report.problem.startswith(problem), report.problems


def test_a_restarted_coordinator_keeps_its_key_and_refuses_another(study: Study, tmp_path: Path) -> None:
    state = _copy_state(study, tmp_path)
    config = tiny_federation(state)
    restarted = Coordinator(config=config)
    try:
        assert restarted.engine.lineage_public_key == study.public_key
        assert restarted.engine.current_model.version == 3
    finally:
        restarted.close()
    (state / SIGNING_KEY_FILE).unlink()
    with pytest.raises(ConfigError, match="lineage record does not verify with this key"):
        Coordinator(config=config)


def test_state_from_before_lineage_gets_its_latest_version_signed(study: Study, tmp_path: Path) -> None:
    """Restarted on state without lineage: v3 is signed at restart (institutions refuse a
    model without a record), the versions before it stay unsigned and are reported."""
    state = _copy_state(study, tmp_path)
    db = sqlite3.connect(state / "coordinator.sqlite")
    with db:
        db.execute("DROP TABLE lineage")
    db.close()
    shutil.rmtree(state / "lineage")
    for name in (SIGNING_KEY_FILE, PUBLIC_KEY_FILE):
        (state / name).unlink()
    restarted = Coordinator(config=tiny_federation(state))
    try:
        entries = restarted.engine.lineage()
        assert [v for v, _, _ in entries] == [3]
        rec = verify_record(record_bytes=entries[0][1], signature=entries[0][2],
                            public_key=restarted.engine.lineage_public_key)
    finally:
        restarted.close()
    original = parse_record(study.records[3][0])
    assert rec["signed_at_restart"] is True
    for key in ("version", "round", "parent_sha256", "model_sha256", "contributions", "aggregator"):
        assert rec[key] == original[key], key
    report = verify_chain(state)
    assert not report.ok and report.first_broken_version == 0
    assert report.problems == ["v0..v2: no lineage record (committed before lineage was recorded, or rows deleted)"]


def _corrupt_signature(ref: pb.ModelRef) -> None:
    signature = bytearray(ref.lineage_signature)
    signature[0] ^= 0x01
    ref.lineage_signature = bytes(signature)


def _drop_record(ref: pb.ModelRef) -> None:
    ref.lineage_record = b""
    ref.lineage_signature = b""


def _swap_sha(ref: pb.ModelRef) -> None:
    ref.sha256 = "0" * 64


@pytest.mark.parametrize("corrupt, reason", [
    (_corrupt_signature, "LINEAGE_INVALID"),
    (_drop_record, "LINEAGE_MISSING"),
    (_swap_sha, "LINEAGE_INVALID"),
], ids=["bad-signature", "no-record", "other-model"])
def test_an_institution_refuses_a_model_whose_lineage_does_not_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      corrupt: Any, reason: str) -> None:
    """lab-c is handed v0 with a broken lineage: it neither downloads nor trains on it,
    declines the round with the reason, and goes on to evaluate v1, which verifies."""
    config = tiny_federation(tmp_path / "coordinator", rounds=1, min_institutions=2, min_available_institutions=3)
    with Coordinator(config=config) as coordinator:
        engine = coordinator.engine
        original = engine._task_for

        def task_for(institution: str) -> pb.Task | None:
            task = original(institution)
            if task is not None and institution == "lab-c" and task.HasField("model") and task.model.version == 0:
                corrupt(task.model)
            return task

        monkeypatch.setattr(engine, "_task_for", task_for)
        events: dict[str, list[DaemonEvent]] = {n: [] for n in NAMES}
        pairs = [_daemon(_config(n, coordinator, tmp_path, i), events[n]) for i, n in enumerate(NAMES)]
        with running([d for d, _ in pairs]) as outcome:
            assert coordinator.wait(timeout=60), "study did not finish"
            wait_until(lambda: len(outcome) == len(NAMES), timeout=20, what="daemons to see the study finish")
        participations = {p["institution"]: p for p in coordinator.store.participations(round_number=1)}
        rounds = coordinator.store.rounds()
        evaluations = {e["institution"] for e in coordinator.store.evaluations()}
        v0 = coordinator.store.models()[0].sha256

    trainers = {n: t for n, (_, t) in zip(NAMES, pairs, strict=True)}
    assert trainers["lab-c"].sent == {}, "lab-c must not train on a model it refused"
    assert set(trainers["hospital-a"].sent) == {1} and set(trainers["hospital-b"].sent) == {1}
    assert participations["lab-c"]["status"] == "declined"
    assert participations["lab-c"]["reason"].startswith(f"{reason}: refused model v0")
    assert participations["lab-c"]["update_sha256"] is None
    assert [r["status"] for r in rounds] == ["committed"] and rounds[0]["metrics"]["num_updates"] == 2
    refused = [e for e in events["lab-c"] if e.kind == "refused"]
    assert refused and refused[0].detail.startswith(reason)
    assert "uploaded" not in {e.kind for e in events["lab-c"]}
    cached = {p.name.split(".")[0] for p in (tmp_path / "lab-c" / "models").glob("*")}
    assert v0 not in cached and "0" * 64 not in cached, "a refused model is not downloaded"
    assert "lab-c" in evaluations, "after a refusal the daemon goes on: v1 verifies and is evaluated"
    assert outcome == {n: True for n in NAMES}


def test_an_institution_pinned_to_another_key_refuses_to_join(tmp_path: Path) -> None:
    other = tmp_path / "other-coordinator"
    load_or_create_signing_key(other)
    with Coordinator(config=tiny_federation(tmp_path / "coordinator")) as coordinator:
        events: list[DaemonEvent] = []
        daemon, trainer = _daemon(_config("lab-c", coordinator, tmp_path, 2, pin=other / PUBLIC_KEY_FILE), events)
        with running([daemon]):
            wait_until(lambda: any(e.kind == "refused" for e in events), timeout=20, what="the refusal at Join")
        assert not any(e.kind == "joined" for e in events)
    refusal = next(e for e in events if e.kind == "refused")
    assert refusal.detail.startswith("LINEAGE_KEY_MISMATCH: the coordinator's lineage key ed25519:")
    assert "is not the pinned ed25519:" in refusal.detail
    assert trainer.sent == {}


def test_a_pinned_key_file_that_is_not_a_key_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "key.pem"
    bad.write_text("not a key")
    config = institution_config("lab-c", address="127.0.0.1:1", index=0, parts=3, state_root=tmp_path)
    config = config.model_copy(update={"institution": config.institution.model_copy(
        update={"lineage_public_key": bad})})
    with pytest.raises(ConfigError, match="institution.lineage_public_key: .*cannot load"):
        _daemon(config, [])


@pytest.mark.parametrize("z, adaptive", [(0.0, False), (1.0, True)], ids=["no-noise", "adaptive"])
def test_dp_fedavg_records_its_settings_and_release(tmp_path: Path, z: float, adaptive: bool) -> None:
    """Under central DP the record names dp-fedavg, its clip norm and noise, and the
    round's epsilon; with z = 0 that epsilon is infinite, written as "inf"."""
    from fedcollab.config import AdaptiveClippingConfig, CentralDPConfig

    dp = CentralDPConfig(clip_norm=0.5, noise_multiplier=z, delta=1e-5,
                         adaptive=AdaptiveClippingConfig(count_noise_multiplier=1.0) if adaptive else None)
    config = tiny_federation(tmp_path / "coordinator", rounds=1, central_dp=dp, central_evaluation=None)
    with Coordinator(config=config) as coordinator:
        daemons = [_daemon(_config(n, coordinator, tmp_path, i), [])[0] for i, n in enumerate(NAMES)]
        with running(daemons) as outcome:
            assert coordinator.wait(timeout=60), "study did not finish"
            wait_until(lambda: len(outcome) == len(NAMES), timeout=20, what="daemons to see the study finish")
        (_, data, signature), = coordinator.engine.lineage(from_version=1)
        metrics = coordinator.store.rounds()[-1]["metrics"]
        key = coordinator.engine.lineage_public_key
    rec = verify_record(record_bytes=data, signature=signature, public_key=key)
    assert rec["aggregator"]["name"] == "dp-fedavg" and rec["aggregator"]["weighting"] == "uniform"
    assert rec["aggregator"]["clip_norm"] == 0.5 and rec["aggregator"]["noise_multiplier"] == z
    assert (rec["aggregator"]["adaptive_clipping"] is not None) == adaptive
    central = rec["central_dp"]
    assert central["delta"] == 1e-5 and central["accountant"] == "rdp" and central["clip_norm"] == 0.5
    assert central["clip_norm_next"] == metrics["clip_norm_next"] and central["noise_std"] == metrics["noise_std"]
    if z == 0:
        assert central["epsilon"] == "inf"
    else:
        assert central["epsilon"] == metrics["central_dp_epsilon"] > 0
    assert "clipped_fraction" not in central, "the operator's diagnostic stays out of what institutions see"
    assert len(rec["contributions"]) == 3
    assert verify_chain(tmp_path / "coordinator").ok
