"""One enrolled certificate against the coordinator's threads, over mutual TLS on
loopback: a flood of streams and long-polls is held to the call limits while honest
daemons commit rounds; an upload that stalls is cut off and recorded; and an upload
that outlasts its certificate's revocation does not count.

Small limits and timeouts (and max_workers = 16) keep each test to a few seconds;
without the limits mallory's calls alone would hold every one of the 16 threads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedcollab.config import TlsConfig
from fedcollab.coordinator import Coordinator
from fedcollab.errors import Rejected
from fedcollab.pki import issue_ephemeral, revoke
from fedcollab.transport import channel_credentials_from
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc
from fedcollab.wire import from_rpc_error, iter_chunks, stream_sha256, torch_dtype
from tests.conftest import institution_config, recording_daemon, running, tiny_federation, wait_until
from tests.integration.test_failures import _assert_weighted_average

pytestmark = pytest.mark.integration
Code = grpc.StatusCode
HONEST = ["hospital-a", "hospital-b"]
MALLORY = "institution:mallory"  # her key in the call limits: role and certificate name

STUDY_B = """
[study]
name = "study-b"
rounds = 50
min_institutions = 2
round_timeout_s = 30
[study.model]
kind = "mlp"
params = { in_features = 64, hidden = [16], num_classes = 10 }
"""


@contextmanager
def _serve(tmp_path: Path, server: dict[str, Any], **study: Any) -> Iterator[tuple[Any, Coordinator]]:
    pki = issue_ephemeral(directory=tmp_path / "pki", federation="dos", institutions=[*HONEST, "mallory", "revoked"],
                          operators=["operator"])
    cert, key = pki.coordinator
    base = tiny_federation(tmp_path / "coordinator", central_evaluation=None, **study)
    config = base.model_copy(update={"server": base.server.model_copy(update={
        "tls": TlsConfig(ca_cert=pki.ca_cert, cert=cert, key=key, crl=pki.crl), "max_workers": 16, **server})})
    with Coordinator(config=config) as coordinator:
        yield pki, coordinator


def _as(pki: Any, coordinator: Coordinator, name: str) -> pb_grpc.CoordinatorServiceStub:
    cert, key = pki.institutions[name]
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes(),
                                         private_key=Path(key).read_bytes(), certificate_chain=Path(cert).read_bytes())
    return pb_grpc.CoordinatorServiceStub(grpc.secure_channel(f"127.0.0.1:{coordinator.port}", creds))


def _honest(pki: Any, coordinator: Coordinator, tmp_path: Path) -> list[Any]:
    pairs = []
    for i, name in enumerate(HONEST):
        cert, key = pki.institutions[name]
        config = institution_config(name, address=f"127.0.0.1:{coordinator.port}", index=i, parts=2,
                                    state_root=tmp_path).model_copy(
            update={"tls": TlsConfig(ca_cert=pki.ca_cert, cert=cert, key=key)})
        pairs.append(recording_daemon(config, credentials=channel_credentials_from(config.tls)))
    return pairs


def _reason(f: grpc.Future) -> str:
    e = f.exception()
    return "ok" if e is None else f"{e.code().name}/{from_rpc_error(e).reason}"


def _held(release: threading.Event, *first: pb.UploadUpdateRequest) -> Iterator[pb.UploadUpdateRequest]:
    """An upload's messages: `first`, then nothing until `release` is set."""
    yield from first
    release.wait()


@contextmanager
def _heartbeats(stub: pb_grpc.CoordinatorServiceStub, session: str) -> Iterator[None]:
    """Keeps a session's lease alive (its round must not drop it as vanished)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.1):
            try:
                stub.Heartbeat(pb.HeartbeatRequest(session_id=session), timeout=5)
            except grpc.RpcError:
                pass

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _train_task(stub: pb_grpc.CoordinatorServiceStub, session: str) -> pb.Task:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        task = stub.PollTask(pb.PollTaskRequest(session_id=session, wait_seconds=1), timeout=10).task
        if task.kind == pb.TASK_KIND_TRAIN:
            return task
    raise AssertionError("no TRAIN task within 30 s")


def _update(session: str, task: pb.Task, value: float) -> tuple[pb.UploadUpdateRequest, list[pb.UploadUpdateRequest]]:
    """A well-formed update of `value` everywhere: its header, and its chunks."""
    deltas = [torch.full(tuple(s.shape), value, dtype=torch_dtype(s.dtype)) for s in task.manifest.tensors]
    header = pb.UpdateHeader(
        session_id=session, round=task.round, nonce=task.nonce, base_version=task.model.version,
        manifest=task.manifest, total_bytes=sum(t.numel() * t.element_size() for t in deltas),
        sha256=stream_sha256(deltas), num_examples=1000)
    return (pb.UploadUpdateRequest(header=header),
            [pb.UploadUpdateRequest(chunk=c) for c in iter_chunks(deltas, chunk_bytes=1024)])


def test_a_flood_of_streams_and_long_polls_is_held_to_the_limits(tmp_path: Path) -> None:
    limits = dict(max_calls_per_identity=6, max_uploads_per_identity=2, max_polls_per_identity=3,
                  max_polls_per_session=2, max_streams_per_connection=8,
                  # So that her silent uploads stay open for the whole test: here the
                  # limits alone must keep her to her share.
                  stream_first_message_timeout_s=120, max_poll_wait_s=30)
    # She is online, so selected and asked to evaluate too, and does neither: rounds
    # close at 2 updates, evaluations after 1 s.
    with _serve(tmp_path, limits, rounds=2, min_institutions=2, min_available_institutions=3, updates_per_round=2,
                round_timeout_s=60, evaluation_timeout_s=1) as (
            pki, coordinator):
        mallory = _as(pki, coordinator, "mallory")
        session = mallory.Join(pb.JoinRequest(), timeout=5).session_id
        release = threading.Event()
        outcomes: Counter[str] = Counter()
        peak: Counter[str] = Counter()
        stop = threading.Event()

        def flood() -> None:
            """12 uploads that never send a message and 12 long-polls on one session (24
            calls: more than the 16 threads), each re-opened once it ends. Every 100 ms,
            not at once: the flood runs in the coordinator's own process here, and a
            faster one only measures the interpreter's lock."""
            def upload() -> grpc.Future:
                return mallory.UploadUpdate.future(_held(release), timeout=120)

            def poll() -> grpc.Future:
                return mallory.PollTask.future(pb.PollTaskRequest(session_id=session, wait_seconds=30), timeout=60)

            calls = [(upload, upload()) for _ in range(12)] + [(poll, poll()) for _ in range(12)]
            while not stop.is_set():
                for i, (make, f) in enumerate(calls):
                    if f.done():
                        outcomes[_reason(f)] += 1
                        calls[i] = (make, make())
                for kind in ("calls", "upload", "poll"):
                    peak[kind] = max(peak[kind], coordinator.limits.open_calls(MALLORY, kind))
                stop.wait(0.1)
            release.set()
            for _, f in calls:
                f.cancel()

        flooding = threading.Thread(target=flood, daemon=True)
        flooding.start()
        try:
            wait_until(lambda: outcomes["RESOURCE_EXHAUSTED/TOO_MANY_CALLS"] >= 20, timeout=20,
                       what="mallory's calls beyond the limits to be refused")
            pairs = _honest(pki, coordinator, tmp_path)
            started = time.monotonic()
            with running([d for d, _ in pairs]) as outcome:
                assert coordinator.wait(timeout=60), "the honest institutions' rounds should commit during the flood"
                wait_until(lambda: len(outcome) == 2, timeout=20, what="daemons to see the study finish")
            print(f"two rounds in {time.monotonic() - started:.1f} s under the flood: {dict(outcomes)}")
            still_held = coordinator.limits.open_calls(MALLORY, "upload")
        finally:
            stop.set()
            flooding.join(timeout=10)
        rounds = [r for r in coordinator.store.rounds() if r["status"] == "committed"]

    assert outcome == {"hospital-a": True, "hospital-b": True}
    assert [r["round"] for r in rounds] == [1, 2] and all(r["metrics"]["num_updates"] == 2 for r in rounds)
    # She held her share all along: her uploads stayed open, and never more than the limits.
    assert still_held == 2, still_held
    assert peak["upload"] == 2 and peak["poll"] <= 2 and peak["calls"] <= 6, peak
    # Refused by the call limits, or by the connection's stream limit (HTTP/2
    # REFUSED_STREAM: she opens streams faster than the server retires hers).
    assert set(outcomes) <= {"RESOURCE_EXHAUSTED/TOO_MANY_CALLS", "UNAVAILABLE/TRANSPORT", "ok"}, outcomes


@pytest.mark.parametrize("sends", ["nothing", "the header only"])
def test_a_stalled_upload_is_cut_off_and_the_round_goes_on(tmp_path: Path, sends: str) -> None:
    server = dict(stream_first_message_timeout_s=1.0, stream_idle_timeout_s=1.0)
    with _serve(tmp_path, server, rounds=1, min_institutions=2, min_available_institutions=3,
                round_timeout_s=60, evaluation_timeout_s=1) as (pki, coordinator):  # she does not evaluate either
        mallory = _as(pki, coordinator, "mallory")
        session = mallory.Join(pb.JoinRequest(), timeout=5).session_id
        pairs = _honest(pki, coordinator, tmp_path)
        release = threading.Event()
        with _heartbeats(mallory, session), running([d for d, _ in pairs]) as outcome:
            task = _train_task(mallory, session)
            header, _ = _update(session, task, 0.0)
            opened = time.monotonic()
            with pytest.raises(grpc.RpcError) as cut:
                mallory.UploadUpdate(_held(release, *([header] if sends != "nothing" else [])), timeout=30)
            cut_after = time.monotonic() - opened
            release.set()
            assert coordinator.wait(timeout=30), "the round should close without her"
            wait_until(lambda: len(outcome) == 2, timeout=20, what="daemons to see the study finish")
        rounds = coordinator.store.rounds()
        hers = [p for p in coordinator.store.participations(round_number=1) if p["institution"] == "mallory"]
        open_uploads = coordinator.limits.open_calls(MALLORY, "upload")

    assert cut.value.code() in (Code.CANCELLED, Code.DEADLINE_EXCEEDED), cut.value
    assert cut_after < 10, f"cut off after {cut_after:.1f} s: the stream idle timeout is 1 s"
    assert [r["status"] for r in rounds] == ["committed"] and rounds[0]["metrics"]["num_updates"] == 2
    # Recorded as a stall, not as a lease lost (her heartbeats kept her online).
    assert hers[0]["status"] == "failed" and hers[0]["reason"].startswith("UPLOAD_STALLED"), hers
    assert open_uploads == 0


def test_an_upload_that_outlasts_its_revocation_does_not_count(tmp_path: Path) -> None:
    with _serve(tmp_path, {"stream_idle_timeout_s": 30}, rounds=1, min_institutions=2, min_available_institutions=3,
                round_timeout_s=60) as (pki, coordinator):
        revoked = _as(pki, coordinator, "revoked")
        session = revoked.Join(pb.JoinRequest(), timeout=5).session_id
        pairs = _honest(pki, coordinator, tmp_path)
        with running([d for d, _ in pairs]) as outcome:
            with _heartbeats(revoked, session):
                task = _train_task(revoked, session)
                header, chunks = _update(session, task, 5.0)  # would move the model by +5 if it counted
                assert len(chunks) >= 2
                go, sent = threading.Event(), threading.Event()

                def messages() -> Iterator[pb.UploadUpdateRequest]:
                    yield header
                    yield from chunks[:-1]
                    sent.set()
                    go.wait(20)
                    yield chunks[-1]

                upload = revoked.UploadUpdate.future(messages(), timeout=30)
                assert sent.wait(10)
                # Both honest updates and all of hers but the last chunk (the round waits for her).
                before = 2 * header.header.total_bytes + sum(len(c.chunk.data) for c in chunks[:-1])
                wait_until(lambda: coordinator.engine.bytes_in >= before, timeout=20,
                           what="the coordinator to receive the chunks sent before the revocation")
                revoke(ca_dir=Path(pki.ca_cert).parent, name="revoked", reason="key_compromise")
                go.set()
                error = upload.exception(timeout=20)
            assert coordinator.wait(timeout=30), "the round should commit with the honest updates"
            wait_until(lambda: len(outcome) == 2, timeout=20, what="daemons to see the study finish")
        rounds = coordinator.store.rounds()
        models = {m.version: m for m in coordinator.store.models()}
        theirs = {p["institution"]: p for p in coordinator.store.participations(round_number=1)}
        with pytest.raises(Rejected) as gone:
            coordinator.engine.touch(session)

    assert error is not None and error.code() == Code.UNAUTHENTICATED, error
    assert from_rpc_error(error).reason == "CERTIFICATE_REVOKED"
    assert [r["status"] for r in rounds] == ["committed"] and rounds[0]["metrics"]["num_updates"] == 2
    assert theirs["revoked"]["status"] == "failed" and theirs["revoked"]["reason"] == "CERTIFICATE_REVOKED"
    _assert_weighted_average(models[1].path, [t.sent[1] for _, t in pairs])  # nothing of hers in the model
    assert gone.value.reason == "SESSION_UNKNOWN"  # the reload dropped her session


def test_a_revocation_drops_the_certificates_sessions_in_every_study(tmp_path: Path) -> None:
    with _serve(tmp_path, {}, rounds=50, min_institutions=2) as (pki, coordinator):
        coordinator.studies.submit(study_toml=STUDY_B, by="test")
        revoked, honest = _as(pki, coordinator, "revoked"), _as(pki, coordinator, "hospital-a")
        sessions = {study: revoked.Join(pb.JoinRequest(study=study), timeout=5).session_id for study in ("", "study-b")}
        kept = honest.Join(pb.JoinRequest(study="study-b"), timeout=5).session_id
        revoke(ca_dir=Path(pki.ca_cert).parent, name="revoked", reason="key_compromise")
        # The next call of anyone's reads the new CRL; the sessions go with that reload.
        honest.Heartbeat(pb.HeartbeatRequest(session_id=kept), timeout=5)
        for study, session in sessions.items():
            with pytest.raises(Rejected) as gone:
                coordinator.studies.get(study).engine.touch(session)
            assert gone.value.reason == "SESSION_UNKNOWN", study
        assert coordinator.studies.get("study-b").engine.touch(kept) == "hospital-a"


def test_a_ping_flood_is_answered_with_goaway(tmp_path: Path) -> None:
    """HTTP/2 pings cost the server work outside any handler: a client pinging far
    faster than the daemon's every 30 s (fedcollab/transport.py) is cut off."""
    with _serve(tmp_path, {"max_poll_wait_s": 10}, rounds=50, min_institutions=3) as (pki, coordinator):
        cert, key = pki.institutions["mallory"]
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes(),
                                             private_key=Path(key).read_bytes(),
                                             certificate_chain=Path(cert).read_bytes())
        flooding = grpc.secure_channel(f"127.0.0.1:{coordinator.port}", creds, options=[
            ("grpc.keepalive_time_ms", 100), ("grpc.http2.max_pings_without_data", 0)])
        mallory = pb_grpc.CoordinatorServiceStub(flooding)
        session = mallory.Join(pb.JoinRequest(), timeout=5).session_id
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as cut:  # a long-poll: nothing is sent back meanwhile
            mallory.PollTask(pb.PollTaskRequest(session_id=session, wait_seconds=10), timeout=20)
        assert cut.value.code() == Code.UNAVAILABLE and "ping" in (cut.value.details() or "").lower(), cut.value
        assert time.monotonic() - started < 9
        honest = _as(pki, coordinator, "hospital-a")
        assert honest.Join(pb.JoinRequest(), timeout=5).session_id  # others are served as before
