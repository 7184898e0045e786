"""The operators' page attacked over real sockets on loopback: a rebound DNS name
(Host header of another site), the session cookie (a random id, never the operator
token, expiring, Secure under TLS) and the log lines (no ?token=, Bearer or cookie)."""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedcollab.coordinator._http import OperatorHttpServer
from fedcollab.coordinator._http_access import SESSION_COOKIE, host_of
from fedcollab.coordinator._snapshot import ConsortiumSnapshot

pytestmark = pytest.mark.integration
TOKEN = "Op3rator-T0ken-" + "x" * 30


def _snapshot() -> ConsortiumSnapshot:
    return ConsortiumSnapshot(federation="secret-federation", taken_at=time.time(), studies=[], institutions=[])


@pytest.fixture
def open_page() -> Iterator[OperatorHttpServer]:
    with OperatorHttpServer(address="127.0.0.1:0", snapshot=_snapshot) as server:
        yield server


@pytest.fixture
def guarded_page() -> Iterator[OperatorHttpServer]:
    with OperatorHttpServer(address="127.0.0.1:0", snapshot=_snapshot, token=TOKEN) as server:
        yield server


def raw(port: int, request: bytes, *, wrap: ssl.SSLContext | None = None) -> tuple[int, bytes, bytes]:
    """Sends `request` as it is on a fresh socket; (status, head, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        sock = wrap.wrap_socket(plain, server_hostname="127.0.0.1") if wrap else plain
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data.startswith(b"HTTP/"):  # http.server answers a request it cannot parse with no status line
        return 0, b"", data
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


def get(port: int, path: str, *, host: str | None, headers: str = "", method: str = "GET") -> tuple[int, bytes, bytes]:
    host_line = f"Host: {host}\r\n" if host is not None else ""
    return raw(port, f"{method} {path} HTTP/1.1\r\n{host_line}{headers}Connection: close\r\n\r\n".encode())


# --------------------------------------------------------------- DNS rebinding
@pytest.mark.parametrize("host", [
    "evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}", "localhost.evil.example",
    "attacker-rebinds-to-127-0-0-1.example.org:{port}", "10.0.0.1:{port}", "", "[::1", "::1", "local host",
])
def test_a_foreign_host_header_is_refused_on_every_route(open_page: OperatorHttpServer, host: str) -> None:
    port = open_page.port
    assert port
    for path, method in (("/", "GET"), ("/metrics", "GET"), ("/api/snapshot.json", "GET"), ("/healthz", "GET"),
                         ("/", "HEAD"), ("/", "POST")):
        status, head, body = get(port, path, host=host.format(port=port), method=method)
        assert status == 421, (path, method, head)
        assert b"secret-federation" not in body and b"Host header" in body or method == "HEAD"


def test_a_request_without_host_is_refused(open_page: OperatorHttpServer) -> None:
    assert open_page.port
    status, _, _ = raw(open_page.port, b"GET /api/snapshot.json HTTP/1.0\r\n\r\n")
    assert status == 421


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "127.0.0.1", "localhost:{port}", "LOCALHOST.", "127.0.0.2",
                                  "[::1]:{port}"])
def test_the_addresses_it_is_served_on_are_answered(open_page: OperatorHttpServer, host: str) -> None:
    port = open_page.port
    assert port
    status, _, body = get(port, "/api/snapshot.json", host=host.format(port=port))
    assert status == 200 and b"secret-federation" in body


def test_on_every_interface_ip_addresses_and_own_names_are_answered() -> None:
    with OperatorHttpServer(address="0.0.0.0:0", snapshot=_snapshot, allowed_hosts=["dash.example.org"]) as server:
        port = server.port
        assert port
        for host in ("10.1.2.3", f"127.0.0.1:{port}", "localhost", socket.gethostname(), "dash.example.org:443"):
            assert get(port, "/healthz", host=host)[0] == 200, host
        for host in ("evil.example", "dash.example.org.evil.example"):
            assert get(port, "/healthz", host=host)[0] == 421, host


def test_host_of() -> None:
    assert host_of("Example.ORG.:8080") == "example.org"
    assert host_of("[::1]:80") == "::1" and host_of("[::1]") == "::1"
    assert host_of("::1") is None and host_of("a b") is None and host_of("a:b") is None and host_of("") is None


# --------------------------------------------------------------- sessions
def _login(port: int, extra: str = "") -> str:
    status, head, _ = get(port, f"/?token={TOKEN}", host=f"127.0.0.1:{port}", headers=extra)
    assert status == 303, head
    (line,) = [h for h in head.decode().split("\r\n") if h.lower().startswith("set-cookie:")]
    return line.split(":", 1)[1].strip()


def test_the_cookie_is_a_session_not_the_token(guarded_page: OperatorHttpServer) -> None:
    port = guarded_page.port
    assert port
    cookie = _login(port)
    name_value = cookie.split(";")[0]
    name, value = name_value.split("=", 1)
    assert name == SESSION_COOKIE and TOKEN not in cookie and len(value) >= 40
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {p.strip() for p in cookie.split(";")}
    assert "Max-Age=" in cookie and "Secure" not in cookie  # plain HTTP: a Secure cookie would never come back
    assert get(port, "/api/snapshot.json", host="127.0.0.1", headers=f"Cookie: {name_value}\r\n")[0] == 200
    assert _login(port).split(";")[0] != name_value  # each login its own id
    # The token, or anything but an issued id, in the cookie opens nothing.
    flipped = value[:-1] + ("B" if value[-1] == "A" else "A")
    for forged in (f"{SESSION_COOKIE}={TOKEN}", f"fedcollab_operator={TOKEN}", f"{SESSION_COOKIE}={flipped}",
                   f"{SESSION_COOKIE}="):
        assert get(port, "/api/snapshot.json", host="127.0.0.1", headers=f"Cookie: {forged}\r\n")[0] == 401, forged
    # The session opens the page only from an address it is served on.
    assert get(port, "/api/snapshot.json", host="evil.example", headers=f"Cookie: {name_value}\r\n")[0] == 421
    # The link sends the browser on only to a route of this page.
    for path, location in (("/metrics", "/metrics"), ("//evil.example/", "/"), ("/nowhere", "/")):
        status, head, _ = get(port, f"{path}?token={TOKEN}", host="127.0.0.1")
        assert status == 303 and f"\r\nLocation: {location}\r\n" in head.decode() + "\r\n", head
    # Prometheus keeps the token in a Bearer header.
    assert get(port, "/metrics", host="127.0.0.1", headers=f"Authorization: Bearer {TOKEN}\r\n")[0] == 200


def test_a_session_expires() -> None:
    with OperatorHttpServer(address="127.0.0.1:0", snapshot=_snapshot, token=TOKEN, session_ttl_s=0.5) as server:
        port = server.port
        assert port
        cookie = _login(port).split(";")[0]
        assert get(port, "/", host="127.0.0.1", headers=f"Cookie: {cookie}\r\n")[0] == 200
        time.sleep(0.7)
        assert get(port, "/", host="127.0.0.1", headers=f"Cookie: {cookie}\r\n")[0] == 401
        assert len(server.sessions) == 0


def test_behind_a_tls_proxy_the_cookie_is_secure(guarded_page: OperatorHttpServer) -> None:
    assert guarded_page.port
    assert "; Secure" in _login(guarded_page.port, "X-Forwarded-Proto: https\r\n")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_under_tls_the_cookie_is_secure(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    with OperatorHttpServer(address="127.0.0.1:0", snapshot=_snapshot, token=TOKEN, ssl_context=server_ctx) as server:
        port = server.port
        assert port
        # Plain HTTP to the TLS port is no answer (and does not stop the server).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b"secret-federation" not in sock.recv(65536)
        status, head, _ = raw(port, f"GET /?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                              .encode(), wrap=client_ctx)
        cookie = next(h for h in head.decode().split("\r\n") if h.lower().startswith("set-cookie:"))
        assert status == 303 and "; Secure" in cookie and TOKEN not in cookie
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=client_ctx, timeout=10)
        conn.request("GET", "/api/snapshot.json", headers={"Cookie": cookie.split(":", 1)[1].split(";")[0].strip()})
        response = conn.getresponse()
        assert response.status == 200 and b"secret-federation" in response.read()
        conn.close()


# --------------------------------------------------------------- logs
def test_no_log_line_shows_the_token_or_a_session(guarded_page: OperatorHttpServer, caplog: pytest.LogCaptureFixture,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    port = guarded_page.port
    assert port
    caplog.set_level(logging.DEBUG, logger="fedcollab.coordinator.http")
    session = _login(port).split(";")[0]
    sid = session.split("=", 1)[1]
    asks = [
        f"GET /metrics?token={TOKEN}&x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        f"GET /?%74oken={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # percent-encoded key: parse_qs reads 'token'
        f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n",
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {session}\r\n",
        f"GET /?token={TOKEN} HTTP/1.1\r\nHost: evil.example\r\n",  # refused by Host, still logged
        f"GET /x token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # bad syntax: send_error quotes the request line
        f"GET /?token={TOKEN} HTTP/7.0\r\nHost: 127.0.0.1\r\n",  # bad version: likewise
        f"POST /?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    ]
    for ask in asks:
        raw(port, (ask + "Connection: close\r\n\r\n").encode())
    messages = [r.getMessage() for r in caplog.records]
    assert any("GET /metrics?<query redacted>" in m for m in messages), messages  # the lines are there
    assert any("Bad request" in m for m in messages), messages
    out, err = capfd.readouterr()
    for text in [*messages, out, err]:
        assert TOKEN not in text and sid not in text, text


def test_the_coordinator_answers_the_host_names_its_config_allows(tmp_path: Path) -> None:
    """server.http_allowed_hosts reaches the coordinator's page: a proxy's name is
    answered, every other name still refused."""
    from fedcollab.coordinator import Coordinator
    from tests.conftest import tiny_federation

    base = tiny_federation(tmp_path / "coordinator", central_evaluation=None)
    config = base.model_copy(update={"server": base.server.model_copy(update={
        "http_address": "127.0.0.1:0", "http_allowed_hosts": ("dash.example.org",)})})
    with Coordinator(config=config) as coordinator:
        port = coordinator.http_port
        assert port is not None
        assert get(port, "/healthz", host=f"dash.example.org:{port}")[0] == 200
        assert get(port, "/healthz", host=f"127.0.0.1:{port}")[0] == 200
        assert get(port, "/healthz", host=f"evil.example:{port}")[0] == 421
