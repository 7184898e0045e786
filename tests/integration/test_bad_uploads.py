"""Every kind of bad upload gets its specific status and reason, the round goes on
with the honest institutions, and nothing of the bad upload reaches the aggregate.

One coordinator runs a round per case, over mutual TLS as in production. Three clients
speak the protocol by hand: two honest ones send known deltas, "mallory" (holding a
valid certificate of her own) sends the case's bad upload.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fedcollab.coordinator import Coordinator
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc
from fedcollab.wire import (
    from_rpc_error,
    iter_chunks,
    manifest_of,
    stream_sha256,
    torch_dtype,
)
from tests.conftest import tiny_federation

pytestmark = pytest.mark.integration
Code = grpc.StatusCode


class Client:
    def __init__(self, address: str, name: str, credentials: grpc.ChannelCredentials | None = None, *,
                 examples: int = 1000) -> None:
        """`examples`: declared at Join, the most any of its updates may claim."""
        self.channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        self.stub = pb_grpc.CoordinatorServiceStub(self.channel)
        self.name = name
        self.session = self.stub.Join(pb.JoinRequest(institution=name, num_train_examples=examples)).session_id

    def task(self, kind: int) -> pb.Task:
        for _ in range(100):
            task = self.stub.PollTask(pb.PollTaskRequest(session_id=self.session, wait_seconds=0.5), timeout=5).task
            if task.kind == kind:
                return task
        raise AssertionError(f"{self.name} never got a task of kind {kind}")

    def upload(self, messages: list[pb.UploadUpdateRequest]) -> pb.UploadUpdateResponse:
        return self.stub.UploadUpdate(iter(messages), timeout=10)

    def evaluate(self) -> None:
        task = self.task(pb.TASK_KIND_EVALUATE)
        self.stub.ReportEvaluation(pb.ReportEvaluationRequest(
            session_id=self.session, round=task.round, nonce=task.nonce, model_sha256=task.model.sha256,
            num_examples=5, loss=1.0, accuracy=0.5))


def deltas_for(task: pb.Task, value: float) -> dict[str, torch.Tensor]:
    return {s.name: torch.full(tuple(s.shape), value, dtype=torch_dtype(s.dtype)) for s in task.manifest.tensors}


def messages(session: str, task: pb.Task, deltas: dict[str, torch.Tensor], *, num_examples: int = 10,
             chunk_bytes: int = 1024, **header: object) -> list[pb.UploadUpdateRequest]:
    tensors = list(deltas.values())
    fields = dict(session_id=session, round=task.round, nonce=task.nonce, base_version=task.model.version,
                  manifest=manifest_of(deltas), total_bytes=sum(t.numel() * t.element_size() for t in tensors),
                  sha256=stream_sha256(tensors), num_examples=num_examples)
    fields.update(header)
    out = [pb.UploadUpdateRequest(header=pb.UpdateHeader(**fields))]
    out += [pb.UploadUpdateRequest(chunk=c) for c in iter_chunks(tensors, chunk_bytes=chunk_bytes)]
    return out


Build = Callable[[str, pb.Task], list[pb.UploadUpdateRequest]]


def _set(d: dict[str, torch.Tensor], name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**d, name: t}


def _first(task: pb.Task) -> str:
    return task.manifest.tensors[0].name


def _poisoned(value: float) -> Build:
    def build(s: str, t: pb.Task) -> list[pb.UploadUpdateRequest]:
        d = deltas_for(t, 0.5)
        d[_first(t)].view(-1)[7] = value
        return messages(s, t, d)
    return build


def _corrupt_chunk(s: str, t: pb.Task) -> list[pb.UploadUpdateRequest]:
    m = messages(s, t, deltas_for(t, 0.5))
    m[2].chunk.data = bytes([m[2].chunk.data[0] ^ 0xFF]) + m[2].chunk.data[1:]
    return m


def _swap_chunks(s: str, t: pb.Task) -> list[pb.UploadUpdateRequest]:
    m = messages(s, t, deltas_for(t, 0.5))
    m[1], m[2] = m[2], m[1]
    return m


def _giant_chunk(size: int) -> Build:
    def build(s: str, t: pb.Task) -> list[pb.UploadUpdateRequest]:
        m = messages(s, t, deltas_for(t, 0.5))
        data = bytes(size)
        m[1].chunk.data, m[1].chunk.sha256 = data, hashlib.sha256(data).digest()
        return m[:2]
    return build


def _tampered_whole(s: str, t: pb.Task) -> list[pb.UploadUpdateRequest]:
    return messages(s, t, deltas_for(t, 0.5), sha256=hashlib.sha256(b"something else").digest())


@dataclass(frozen=True)
class Case:
    id: str
    build: Build
    code: Code
    reason: str
    ends_participation: bool = True  # False: refused before it touches the round's state
    # What the coordinator may record, where it differs from the reason the client gets:
    # gRPC refuses an over-limit message before fedcollab sees it, as a broken stream
    # (seen as cancelled or as ended short, depending on timing).
    recorded: tuple[str, ...] = ()


CASES = [
    Case("wrong shape", lambda s, t: messages(s, t, _set(deltas_for(t, .5), _first(t), torch.zeros(3, 3))),
         Code.INVALID_ARGUMENT, "SHAPE_MISMATCH"),
    Case("wrong dtype", lambda s, t: messages(s, t, _set(deltas_for(t, .5), _first(t),
                                                         deltas_for(t, .5)[_first(t)].half())),
         Code.INVALID_ARGUMENT, "DTYPE_MISMATCH"),
    Case("missing tensor", lambda s, t: messages(s, t, dict(list(deltas_for(t, .5).items())[1:])),
         Code.INVALID_ARGUMENT, "TENSOR_MISSING"),
    Case("extra tensor", lambda s, t: messages(s, t, {**deltas_for(t, .5), "backdoor.weight": torch.ones(4)}),
         Code.INVALID_ARGUMENT, "TENSOR_UNEXPECTED"),
    Case("NaN", _poisoned(float("nan")), Code.INVALID_ARGUMENT, "NON_FINITE_VALUES"),
    Case("Inf", _poisoned(float("inf")), Code.INVALID_ARGUMENT, "NON_FINITE_VALUES"),
    Case("chunk over the size limit", _giant_chunk(4096), Code.RESOURCE_EXHAUSTED, "CHUNK_TOO_LARGE"),
    Case("message over the transport limit", _giant_chunk(200_000), Code.RESOURCE_EXHAUSTED, "TRANSPORT",
         recorded=("UPLOAD_INTERRUPTED", "UPDATE_INCOMPLETE")),
    Case("chunk hash mismatch", _corrupt_chunk, Code.DATA_LOSS, "CHUNK_HASH_MISMATCH"),
    Case("chunks out of order", _swap_chunks, Code.INVALID_ARGUMENT, "CHUNK_OUT_OF_ORDER"),
    Case("truncated stream", lambda s, t: messages(s, t, deltas_for(t, .5))[:3],
         Code.INVALID_ARGUMENT, "UPDATE_INCOMPLETE"),
    Case("whole-update hash mismatch", _tampered_whole, Code.DATA_LOSS, "UPDATE_HASH_MISMATCH"),
    Case("zero examples", lambda s, t: messages(s, t, deltas_for(t, .5), num_examples=0),
         Code.INVALID_ARGUMENT, "INVALID_EXAMPLE_COUNT"),
    Case("oversized metadata", lambda s, t: messages(s, t, deltas_for(t, .5),
                                                     metrics={f"m{i}": 1.0 for i in range(100)}),
         Code.INVALID_ARGUMENT, "METADATA_TOO_LARGE"),
    Case("closed round", lambda s, t: messages(s, t, deltas_for(t, .5), round=t.round - 1),
         Code.FAILED_PRECONDITION, "ROUND_CLOSED", ends_participation=False),
    Case("wrong nonce", lambda s, t: messages(s, t, deltas_for(t, .5), nonce="0" * 32),
         Code.PERMISSION_DENIED, "NONCE_MISMATCH", ends_participation=False),
    Case("non-ASCII nonce", lambda s, t: messages(s, t, deltas_for(t, .5), nonce="é" * 32),
         Code.PERMISSION_DENIED, "NONCE_MISMATCH", ends_participation=False),
    Case("stale base model", lambda s, t: messages(s, t, deltas_for(t, .5), base_version=t.model.version + 7),
         Code.FAILED_PRECONDITION, "STALE_BASE", ends_participation=False),
    Case("unknown session", lambda s, t: messages("forged-session", t, deltas_for(t, .5)),
         Code.UNAUTHENTICATED, "SESSION_UNKNOWN", ends_participation=False),
    Case("no header", lambda s, t: messages(s, t, deltas_for(t, .5))[1:],
         Code.INVALID_ARGUMENT, "HEADER_MISSING", ends_participation=False),
]


def test_bad_uploads_are_refused_and_never_aggregated(tmp_path: Path, test_ca) -> None:  # type: ignore[no-untyped-def]
    # max_weight_share 1.0: the exact example-weighted mean is checked here; the bound on
    # shares has its own tests (test_hostile_institution.py).
    config = tiny_federation(tmp_path / "coordinator", rounds=len(CASES), min_institutions=2,
                             min_available_institutions=3, central_evaluation=None, max_weight_share=1.0)
    honest = {"honest-a": (10, 0.25), "honest-b": (30, -0.5)}  # name: (examples, delta value)
    server_creds, client_creds = test_ca.mutual_tls([*honest, "mallory"])
    with Coordinator(config=config, credentials=server_creds) as coordinator:
        address = f"127.0.0.1:{coordinator.port}"
        clients = {n: Client(address, n, client_creds[n]) for n in [*honest, "mallory"]}
        mallory = clients["mallory"]
        for case in CASES:
            tasks = {n: c.task(pb.TASK_KIND_TRAIN) for n, c in clients.items()}
            for name, (n, value) in honest.items():
                clients[name].upload(messages(clients[name].session, tasks[name], deltas_for(tasks[name], value),
                                              num_examples=n))
            if case is CASES[0]:  # an accepted update cannot be sent twice
                name = "honest-a"
                with pytest.raises(grpc.RpcError) as dup:
                    clients[name].upload(messages(clients[name].session, tasks[name], deltas_for(tasks[name], 9.0)))
                assert (dup.value.code(), from_rpc_error(dup.value).reason) == (Code.ALREADY_EXISTS, "DUPLICATE_UPLOAD")
            with pytest.raises(grpc.RpcError) as err:
                mallory.upload(case.build(mallory.session, tasks["mallory"]))
            got = (err.value.code(), from_rpc_error(err.value).reason)
            assert got == (case.code, case.reason), f"case {case.id!r}: {err.value.details()}"
            if not case.ends_participation:  # end mallory's part with an update that is refused too
                with pytest.raises(grpc.RpcError):
                    mallory.upload(_poisoned(float("nan"))(mallory.session, tasks["mallory"]))
            for c in clients.values():
                c.evaluate()
        assert coordinator.wait(timeout=30)
        models = {m.version: load_file(str(m.path)) for m in coordinator.store.models()}
        rounds = [r for r in coordinator.store.rounds() if r["status"] == "committed"]
        mallory_rows = [p for p in coordinator.store.participations() if p["institution"] == "mallory"]
        for c in clients.values():
            c.channel.close()

    assert [r["round"] for r in rounds] == list(range(1, len(CASES) + 1))
    expected_step = (10 * 0.25 + 30 * -0.5) / 40  # honest institutions only
    for r in range(1, len(CASES) + 1):
        assert rounds[r - 1]["metrics"]["num_updates"] == 2
        for name, value in models[r].items():
            torch.testing.assert_close(value, models[r - 1][name] + expected_step, rtol=0, atol=1e-6,
                                       msg=f"round {r} ({CASES[r - 1].id}): aggregate is off")
    for case, row in zip(CASES, mallory_rows, strict=True):
        expected = (case.recorded or (case.reason,)) if case.ends_participation else ("NON_FINITE_VALUES",)
        assert row["reason"] in expected, f"case {case.id!r} recorded {row['reason']}"
    assert all(p["status"] == "failed" for p in mallory_rows)


def test_proto_level_garbage_gets_a_clear_status(tmp_path: Path) -> None:
    """Bytes that are not a valid message, and RPCs with missing fields."""
    with Coordinator(config=tiny_federation(tmp_path / "c")) as coordinator:
        channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
        raw = channel.unary_unary("/fedcollab.v1.CoordinatorService/Join")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff not a protobuf", timeout=5)
        assert err.value.code() == Code.INTERNAL  # grpc's own deserialization failure
        stub = pb_grpc.CoordinatorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Join(pb.JoinRequest(institution="../../etc/passwd"), timeout=5)
        assert (err.value.code(), from_rpc_error(err.value).reason) == (Code.INVALID_ARGUMENT,
                                                                         "INVALID_INSTITUTION_NAME")
        with pytest.raises(grpc.RpcError) as err:
            list(stub.DownloadModel(pb.DownloadModelRequest(session_id="nope", sha256="0" * 64), timeout=5))
        assert from_rpc_error(err.value).reason == "SESSION_UNKNOWN"
        session = stub.Join(pb.JoinRequest(institution="ok"), timeout=5).session_id
        with pytest.raises(grpc.RpcError) as err:
            list(stub.DownloadModel(pb.DownloadModelRequest(session_id=session, sha256="0" * 64), timeout=5))
        assert (err.value.code(), from_rpc_error(err.value).reason) == (Code.NOT_FOUND, "MODEL_NOT_FOUND")
        # The coordinator is still serving.
        assert stub.Heartbeat(pb.HeartbeatRequest(session_id=session), timeout=5).lease_seconds > 0
        channel.close()




def test_bad_evaluation_reports_are_refused_and_not_recorded(tmp_path: Path) -> None:
    config = tiny_federation(tmp_path / "c", rounds=1, min_institutions=2, central_evaluation=None,
                             max_weight_share=1.0)  # the exact weighting of reports is checked
    with Coordinator(config=config) as coordinator:
        site, other = (Client(f"127.0.0.1:{coordinator.port}", n) for n in ("site", "other"))
        for c in (site, other):
            train = c.task(pb.TASK_KIND_TRAIN)
            c.upload(messages(c.session, train, deltas_for(train, 0.1)))
        task = site.task(pb.TASK_KIND_EVALUATE)
        good = dict(session_id=site.session, round=task.round, nonce=task.nonce, model_sha256=task.model.sha256,
                    num_examples=20, loss=0.5, accuracy=0.75)
        bad = [
            ({"nonce": "x" * 32}, Code.PERMISSION_DENIED, "NONCE_MISMATCH"),
            ({"round": task.round + 1}, Code.FAILED_PRECONDITION, "EVALUATION_CLOSED"),
            ({"model_sha256": "0" * 64}, Code.INVALID_ARGUMENT, "MODEL_MISMATCH"),
            ({"loss": float("nan")}, Code.INVALID_ARGUMENT, "INVALID_METRICS"),
            ({"accuracy": 1.5}, Code.INVALID_ARGUMENT, "INVALID_METRICS"),
            ({"num_examples": -1}, Code.INVALID_ARGUMENT, "INVALID_METRICS"),
        ]
        for change, code, reason in bad:
            with pytest.raises(grpc.RpcError) as err:
                site.stub.ReportEvaluation(pb.ReportEvaluationRequest(**{**good, **change}), timeout=5)
            assert (err.value.code(), from_rpc_error(err.value).reason) == (code, reason), change
        site.stub.ReportEvaluation(pb.ReportEvaluationRequest(**good), timeout=5)
        with pytest.raises(grpc.RpcError) as err:  # the phase is still open: "other" has not reported
            site.stub.ReportEvaluation(pb.ReportEvaluationRequest(**good), timeout=5)
        assert (err.value.code(), from_rpc_error(err.value).reason) == (Code.ALREADY_EXISTS, "DUPLICATE_REPORT")
        last = other.task(pb.TASK_KIND_EVALUATE)
        other.stub.ReportEvaluation(pb.ReportEvaluationRequest(
            session_id=other.session, round=last.round, nonce=last.nonce, model_sha256=last.model.sha256,
            num_examples=60, loss=1.5, accuracy=0.25), timeout=5)
        assert coordinator.wait(timeout=20)
        evaluations = coordinator.store.evaluations()
        metrics = coordinator.store.rounds()[0]["metrics"]
        for c in (site, other):
            c.channel.close()
    assert sorted((e["institution"], e["num_examples"], e["loss"], e["accuracy"]) for e in evaluations) == [
        ("other", 60, 1.5, 0.25), ("site", 20, 0.5, 0.75)]
    # Example-weighted: (20 * 0.5 + 60 * 1.5) / 80 and (20 * 0.75 + 60 * 0.25) / 80.
    assert (metrics["eval_loss"], metrics["eval_accuracy"], metrics["eval_examples"]) == (1.25, 0.375, 80.0)
