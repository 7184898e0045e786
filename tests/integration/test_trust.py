"""Hostile callers against a mutual-TLS coordinator: each gets its status and reason,
the honest institutions' round goes on, and nothing of the attacker is recorded.

Certificates come from the federation PKI (`fedcollab.pki`, the code behind
`fedcollab pki`) and, for the ones it refuses to make (other CA, expired), from a
throwaway CA in tests/_pki.py.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fedcollab.config import TlsConfig
from fedcollab.coordinator import Coordinator
from fedcollab.pki import issue_ephemeral, revoke
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc
from fedcollab.v1 import operator_service_pb2 as opb
from fedcollab.v1 import operator_service_pb2_grpc as opb_grpc
from fedcollab.wire import from_rpc_error
from tests._pki import TestCA
from tests.conftest import tiny_federation

pytestmark = pytest.mark.integration
Code = grpc.StatusCode
HONEST = ["hospital-a", "hospital-b"]


@pytest.fixture()
def federation(tmp_path: Path):  # type: ignore[no-untyped-def]
    pki = issue_ephemeral(directory=tmp_path / "pki", federation="trust", institutions=[*HONEST, "mallory", "revoked"],
                          operators=["operator"])
    cert, key = pki.coordinator
    base = tiny_federation(tmp_path / "coordinator", rounds=50, min_institutions=2, round_timeout_s=60,
                           central_evaluation=None)
    config = base.model_copy(update={"server": base.server.model_copy(update={
        "tls": TlsConfig(ca_cert=pki.ca_cert, cert=cert, key=key, crl=pki.crl)})})
    with Coordinator(config=config) as coordinator:
        yield pki, coordinator


def _channel(coordinator: Coordinator, ca: Path, cert: bytes | None = None, key: bytes | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes(), private_key=key, certificate_chain=cert)
    return grpc.secure_channel(f"127.0.0.1:{coordinator.port}", creds)


def _as(pki, coordinator: Coordinator, name: str, group: str = "institutions") -> grpc.Channel:  # type: ignore[no-untyped-def]
    cert, key = getattr(pki, group)[name]
    return _channel(coordinator, pki.ca_cert, Path(cert).read_bytes(), Path(key).read_bytes())


def _refused(call, code: Code, reason: str | None) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    if reason is not None:
        assert from_rpc_error(err.value).reason == reason, err.value.details()


def _join(channel: grpc.Channel, name: str = "") -> str:
    return pb_grpc.CoordinatorServiceStub(channel).Join(pb.JoinRequest(institution=name), timeout=5).session_id


def test_identity_comes_from_the_certificate(federation) -> None:  # type: ignore[no-untyped-def]
    pki, coordinator = federation
    a = _as(pki, coordinator, "hospital-a")
    assert _join(a)  # the name comes from the certificate; the request field may stay empty
    _refused(lambda: _join(a, "hospital-b"), Code.PERMISSION_DENIED, "IDENTITY_MISMATCH")
    assert [i["name"] for i in coordinator.store.institutions()] == ["hospital-a"]


def test_an_institution_cannot_act_in_another_ones_session(federation) -> None:  # type: ignore[no-untyped-def]
    pki, coordinator = federation
    b_session = _join(_as(pki, coordinator, "hospital-b"))
    mallory_channel = _as(pki, coordinator, "mallory")
    _join(mallory_channel)
    mallory = pb_grpc.CoordinatorServiceStub(mallory_channel)
    for call in (
        lambda: mallory.Heartbeat(pb.HeartbeatRequest(session_id=b_session), timeout=5),
        lambda: mallory.PollTask(pb.PollTaskRequest(session_id=b_session, wait_seconds=0.1), timeout=5),
        lambda: list(mallory.DownloadModel(pb.DownloadModelRequest(session_id=b_session, sha256="0" * 64), timeout=5)),
        lambda: mallory.UploadUpdate(iter([pb.UploadUpdateRequest(header=pb.UpdateHeader(session_id=b_session))]),
                                     timeout=5),
        lambda: mallory.DeclineTask(pb.DeclineTaskRequest(session_id=b_session, reason="X"), timeout=5),
    ):
        _refused(call, Code.PERMISSION_DENIED, "SESSION_NOT_YOURS")


@pytest.mark.parametrize("who", ["unknown CA", "expired", "plaintext", "no client certificate"])
def test_outsiders_are_refused_at_the_handshake(federation, who: str) -> None:  # type: ignore[no-untyped-def]
    pki, coordinator = federation
    if who == "plaintext":
        channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
    elif who == "no client certificate":
        channel = _channel(coordinator, pki.ca_cert)
    else:
        ca = TestCA("an outsider's CA") if who == "unknown CA" else None
        if who == "expired":  # signed by the real CA's key, but out of date
            from tests._pki import issue_with

            pem = issue_with(ca_cert=pki.ca_cert, ca_key=Path(pki.ca_cert).parent / "ca-key.pem", name="hospital-a",
                             days=-1, not_before_days=-2)
        else:
            pem = ca.issue("hospital-a", server=False)  # type: ignore[union-attr]
        channel = _channel(coordinator, pki.ca_cert, pem.cert, pem.key)
    stub = pb_grpc.CoordinatorServiceStub(channel)
    _refused(lambda: stub.Join(pb.JoinRequest(institution="hospital-a"), timeout=5), Code.UNAVAILABLE, None)
    assert coordinator.store.institutions() == []  # no state changed
    assert _join(_as(pki, coordinator, "hospital-a"))  # and the coordinator still serves


def test_a_revoked_certificate_is_refused_without_a_restart(federation) -> None:  # type: ignore[no-untyped-def]
    pki, coordinator = federation
    channel = _as(pki, coordinator, "revoked")
    stub = pb_grpc.CoordinatorServiceStub(channel)
    session = _join(channel)
    revoke(ca_dir=Path(pki.ca_cert).parent, name="revoked", reason="key_compromise")
    _refused(lambda: stub.Heartbeat(pb.HeartbeatRequest(session_id=session), timeout=5),
             Code.UNAUTHENTICATED, "CERTIFICATE_REVOKED")
    _refused(lambda: _join(channel), Code.UNAUTHENTICATED, "CERTIFICATE_REVOKED")
    assert _join(_as(pki, coordinator, "hospital-a"))


def test_the_operator_api_needs_an_operator_certificate(federation) -> None:  # type: ignore[no-untyped-def]
    pki, coordinator = federation
    _join(_as(pki, coordinator, "hospital-a"))
    as_institution = opb_grpc.OperatorServiceStub(_as(pki, coordinator, "hospital-a"))
    _refused(lambda: as_institution.GetStatus(opb.GetStatusRequest(), timeout=5), Code.PERMISSION_DENIED,
             "OPERATOR_ONLY")
    operator_channel = _as(pki, coordinator, "operator", group="operators")
    status = opb_grpc.OperatorServiceStub(operator_channel).GetStatus(opb.GetStatusRequest(), timeout=5)
    assert status.study == "tiny" and [i.name for i in status.institutions] == ["hospital-a"]
    # ...and an operator is not an institution.
    _refused(lambda: _join(operator_channel), Code.PERMISSION_DENIED, "INSTITUTION_ONLY")


def test_a_flood_of_joins_is_rate_limited(federation) -> None:  # type: ignore[no-untyped-def]
    pki, coordinator = federation
    channel = _as(pki, coordinator, "mallory")
    codes = []
    for _ in range(40):
        try:
            _join(channel)
            codes.append("ok")
        except grpc.RpcError as e:
            codes.append(from_rpc_error(e).reason)
    assert codes.count("RATE_LIMITED") >= 25 and codes[:5] == ["ok"] * 5, codes
    assert _join(_as(pki, coordinator, "hospital-a"))  # others are not affected


def test_malformed_protobuf_bytes_are_refused(federation) -> None:  # type: ignore[no-untyped-def]
    pki, coordinator = federation
    channel = _as(pki, coordinator, "mallory")
    raw = channel.unary_unary("/fedcollab.v1.CoordinatorService/Join")
    _refused(lambda: raw(b"\xff\xff\xff\xff not a protobuf", timeout=5), Code.INTERNAL, None)
    assert coordinator.store.institutions() == []
    assert _join(_as(pki, coordinator, "hospital-a"))


def test_a_daemon_whose_certificate_names_another_institution_stops_with_the_fix(federation, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedcollab.errors import FedcollabError
    from fedcollab.institution import daemon_from_config
    from tests.conftest import institution_config

    pki, coordinator = federation
    cert, key = pki.institutions["hospital-b"]
    config = institution_config("hospital-a", address=f"127.0.0.1:{coordinator.port}", index=0, parts=2,
                                state_root=tmp_path).model_copy(update={"tls": TlsConfig(ca_cert=pki.ca_cert,
                                                                                         cert=cert, key=key)})
    daemon = daemon_from_config(config)
    with pytest.raises(FedcollabError, match="IDENTITY_MISMATCH.*Set institution.name"):
        daemon.run()
    assert coordinator.store.institutions() == []
