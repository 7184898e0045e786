"""Compressed updates end to end: a real coordinator on port 0 and real daemons over
gRPC. Each committed model must be base + the example-weighted mean of the updates as
the coordinator decodes them, and the bytes received must shrink as the encoding says."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fedcollab.compression import encode_update, encoded_nbytes, update_decoder
from fedcollab.config import CompressionConfig
from fedcollab.coordinator import Coordinator
from fedcollab.coordinator._bounds import water_fill
from fedcollab.errors import RemoteError
from fedcollab.institution import CoordinatorClient
from fedcollab.institution._error_feedback import residual_path, with_error_feedback
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import iter_stream
from tests.conftest import institution_config, recording_daemon, running, tiny_federation, wait_until

pytestmark = pytest.mark.integration

NAMES = ["hospital-a", "hospital-b", "lab-c"]
RAW_BYTES = 1210 * 4  # the tiny MLP's update as float32


def _decoded(manifest: tensor_pb2.ModelManifest, compression: CompressionConfig,
             deltas: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The update as the coordinator sees it: encoded as the institution does, decoded in 1 KiB chunks."""
    decoder = update_decoder(manifest, compression=compression)
    out = [torch.zeros(d.numel(), dtype=torch.float64) for d in deltas]
    for data in iter_stream(encode_update(deltas, compression=compression), piece_bytes=1024):
        for p in decoder.feed(bytes(data)):
            out[p.index][p.start : p.start + len(p.values)] += p.values.double()
    assert decoder.complete
    return {s.name: o.reshape(tuple(s.shape)) for s, o in zip(manifest.tensors, out, strict=True)}


@pytest.mark.parametrize(("compression", "ratio"), [
    (CompressionConfig(method="fp16"), 1 / 2),
    (CompressionConfig(method="int8"), (1210 + 4 * 7) / RAW_BYTES),  # blocks of 256: 4 + 1 + 1 + 1 per tensor
    (CompressionConfig(method="topk", topk_fraction=0.1), 121 * 8 / RAW_BYTES),  # (uint32, float32) per entry
], ids=lambda v: v.method if isinstance(v, CompressionConfig) else "")
def test_rounds_commit_the_weighted_mean_of_the_decoded_updates(tmp_path: Path, compression: CompressionConfig,
                                                                 ratio: float) -> None:
    config = tiny_federation(tmp_path / "coordinator", compression=compression)
    with Coordinator(config=config) as coordinator:
        pairs = [recording_daemon(institution_config(n, address=f"127.0.0.1:{coordinator.port}", index=i, parts=3,
                                                     state_root=tmp_path)) for i, n in enumerate(NAMES)]
        with running([d for d, _ in pairs]) as outcome:
            assert coordinator.wait(timeout=90), "study did not finish"
            wait_until(lambda: len(outcome) == len(NAMES), timeout=20, what="daemons to see the study finish")
        models = {m.version: load_file(str(m.path)) for m in coordinator.store.models()}
        rounds = [r for r in coordinator.store.rounds() if r["status"] == "committed"]
        manifest = coordinator.engine.manifest  # the tasks' order: top-k indices depend on it

    assert outcome == {n: True for n in NAMES}
    assert [r["round"] for r in rounds] == [1, 2, 3]
    names = [s.name for s in manifest.tensors]
    shadow = tmp_path / "shadow"  # the institutions' error feedback, replayed from what they trained
    for r in (1, 2, 3):
        base = models[r - 1]
        sent, total = [], 0
        for (_, trainer), name in zip(pairs, NAMES, strict=True):
            n, state = trainer.sent[r]
            deltas = [(state[k].detach().to("cpu") - base[k]).contiguous() for k in names]
            task = pb.Task(round=r, manifest=manifest, compression=pb.Compression())
            if compression.method == "topk":
                task.compression.CopyFrom(pb.Compression(method=pb.COMPRESSION_METHOD_TOPK,
                                                         topk_fraction=compression.topk_fraction))
                deltas = with_error_feedback(state_dir=shadow / name, study="tiny", task=task, deltas=deltas)
            sent.append((n, _decoded(manifest, compression, deltas)))
        # Example-weighted, with no institution above the default max_weight_share (0.5).
        counted = water_fill({str(i): n for i, (n, _) in enumerate(sent)}, max_share=0.5)
        sent = [(counted[str(i)], d) for i, (_, d) in enumerate(sent)]
        total = sum(n for n, _ in sent)
        for k in names:
            expected = base[k].double() + sum(n * d[k] for n, d in sent) / total
            torch.testing.assert_close(models[r][k].double(), expected, rtol=0, atol=1e-6)
        m = rounds[r - 1]["metrics"]
        assert m["num_updates"] == 3 and m["num_examples"] == total
        assert m["bytes_in"] == 3 * encoded_nbytes(manifest, compression=compression)
        assert m["bytes_in"] / (3 * RAW_BYTES) == pytest.approx(ratio)
    if compression.method == "topk":  # each institution kept exactly the residual replayed here
        for name in NAMES:
            kept = load_file(str(residual_path(tmp_path / name, "tiny")))
            replayed = load_file(str(residual_path(shadow / name, "tiny")))
            assert kept.keys() == replayed.keys() and all(torch.equal(kept[k], replayed[k]) for k in kept)
            assert sum(float(v.abs().sum()) for v in kept.values()) > 0


def test_an_update_encoded_another_way_is_refused(tmp_path: Path) -> None:
    config = tiny_federation(tmp_path / "c", compression=CompressionConfig(method="int8"), min_institutions=1)
    with Coordinator(config=config) as coordinator:
        client = CoordinatorClient(address=f"127.0.0.1:{coordinator.port}", credentials=None, rpc_timeout_s=5)
        try:
            session = client.join(institution="lab", num_train_examples=10).session_id
            task = pb.Task()
            for _ in range(50):
                task = client.poll(session_id=session, wait_s=0.5)
                if task.kind == pb.TASK_KIND_TRAIN:
                    break
            assert task.compression == pb.Compression(method=pb.COMPRESSION_METHOD_INT8, block_elements=256)
            deltas = [torch.zeros(math.prod(s.shape)).reshape(tuple(s.shape)) for s in task.manifest.tensors]
            with pytest.raises(RemoteError) as refused:
                client.upload(session_id=session, task=task, deltas=deltas, num_examples=10, metrics={},
                              compression=CompressionConfig(method="fp16"))
            assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                  "ENCODING_MISMATCH")
            assert "int8 (block_elements=256)" in refused.value.message
        finally:
            client.close()


def test_an_encoding_the_daemon_cannot_produce_is_declined_before_training(tmp_path: Path, monkeypatch) -> None:
    """A newer coordinator asking for a method this daemon does not know: the daemon
    declines at once (COMPRESSION_UNSUPPORTED) instead of training and failing at upload."""
    import fedcollab.coordinator._engine as engine

    monkeypatch.setattr(engine, "compression_to_proto", lambda _: pb.Compression(method=99))
    config = tiny_federation(tmp_path / "coordinator", rounds=1, max_round_attempts=1)
    with Coordinator(config=config) as coordinator:
        pairs = [recording_daemon(institution_config(n, address=f"127.0.0.1:{coordinator.port}", index=i, parts=3,
                                                     state_root=tmp_path)) for i, n in enumerate(NAMES)]
        with running([d for d, _ in pairs]):
            wait_until(lambda: len(coordinator.store.participations(round_number=1)) == len(NAMES) and all(
                p["status"] == "declined" for p in coordinator.store.participations(round_number=1)),
                timeout=30, what="every institution to decline round 1")
            parts = coordinator.store.participations(round_number=1)
    assert all(p["reason"].startswith("COMPRESSION_UNSUPPORTED") for p in parts)
    assert all(not t.sent for _, t in pairs), "nothing was trained"
