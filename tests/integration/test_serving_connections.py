"""The model server's HTTP front end attacked over real sockets on loopback: a flood of
silent connections, a body shorter than its Content-Length, connections stuck in their
headers, idle keep-alive. Each is bounded in threads and time, and a real request is
still served."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from fedcollab.lineage import raw_public_key
from fedcollab.serving import HttpLimits, ModelServer
from tests.conftest import wait_until
from tests.integration.test_serving import Served, _row, digits, mlp  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration
PREDICT = json.dumps({"instances": [_row()]}).encode()


def _server(mlp: Served, limits: HttpLimits | None = None) -> ModelServer:  # noqa: F811
    return ModelServer(model_file=mlp.file, public_key=raw_public_key(mlp.key), grpc_address="127.0.0.1:0",
                       http_address="127.0.0.1:0", max_batch=8, http_limits=limits)


def _predict(port: int) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/predict", body=PREDICT, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def _answer(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.fixture
def sockets() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def test_many_silent_sockets_do_not_stop_a_real_request(mlp: Served, sockets: ExitStack) -> None:  # noqa: F811
    """300 connections that never send a byte, default limits: at most 64 threads, and
    a real request is answered at once (it takes the slot of the oldest silent one)."""
    with _server(mlp) as server:
        port = server.http_port
        assert port
        baseline = _handler_threads()
        for _ in range(300):
            sockets.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        wait_until(lambda: server.http_connections()["idle"] == HttpLimits().max_connections, timeout=20,
                   what="the server to fill its slots with the silent sockets")
        started = time.monotonic()
        status, body = _predict(port)
        took = time.monotonic() - started
        threads = _handler_threads() - baseline
        print(f"\n300 silent sockets: a real request answered in {took * 1000:.0f} ms, "
              f"{threads} connection threads alive (limit {HttpLimits().max_connections})")
        assert status == 200 and len(body["predictions"]) == 1
        assert took < 3.0
        assert threads <= HttpLimits().max_connections + 2  # + the threads of hung-up sockets, winding down


def test_a_body_shorter_than_its_content_length_is_a_400_within_seconds(mlp: Served) -> None:  # noqa: F811
    """Default limits: 400 BODY_INCOMPLETE after the 5 s read timeout (it was a 500 after 30 s)."""
    with _server(mlp) as server, socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + PREDICT[:10])  # and then nothing, the socket kept open
        reply = _answer(sock)
        took = time.monotonic() - started
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), reply[:300]
        error = json.loads(body)["error"]
        assert error["reason"] == "BODY_INCOMPLETE" and "10 of the 1000 bytes" in error["message"]
        assert HttpLimits().read_timeout_s - 0.5 <= took < HttpLimits().read_timeout_s + 5.0, took
        assert _predict(server.http_port)[0] == 200


def test_a_trickled_body_meets_its_deadline(mlp: Served) -> None:  # noqa: F811
    """A byte every 0.3 s never trips the read timeout, but the body's whole deadline holds."""
    limits = HttpLimits(read_timeout_s=1.0, min_body_rate=100.0)  # deadline 1 s + 100 bytes / 100 B/s = 2 s
    with _server(mlp, limits) as server, socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()
        sock.settimeout(0.3)
        reply = b""
        while time.monotonic() - started < 10 and not reply:
            try:
                sock.sendall(b" ")
                reply = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
        answered = time.monotonic() - started
        sock.settimeout(5)
        try:  # the head and the body may come in separate segments: read to the close
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError:
            pass
        assert reply.startswith(b"HTTP/1.1 400") and b"BODY_INCOMPLETE" in reply, reply[:300]
        assert answered < 4.0


def test_beyond_the_limit_busy_connections_get_503_and_stale_headers_are_reclaimed(
        mlp: Served, sockets: ExitStack) -> None:  # noqa: F811
    limits = HttpLimits(max_connections=4, header_timeout_s=1.0)
    with _server(mlp, limits) as server:
        port = server.http_port
        assert port
        for _ in range(4):  # a request line and part of the headers, then nothing: not idle, not done
            s = sockets.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
        wait_until(lambda: server.http_connections()["headers"] == 4, timeout=10, what="4 connections in headers")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as refused:
            reply = _answer(refused)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head, reply[:300]
        assert json.loads(body)["error"]["reason"] == "SERVER_BUSY"
        assert server.http_connections() == {"idle": 0, "headers": 4, "working": 0}
        time.sleep(1.2)  # past header_timeout_s: the stuck ones may be reclaimed
        assert _predict(port)[0] == 200
        assert sum(server.http_connections().values()) <= 4


def test_an_idle_keep_alive_connection_is_closed_soon(mlp: Served) -> None:  # noqa: F811
    limits = HttpLimits(idle_timeout_s=0.5)
    with _server(mlp, limits) as server, socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: HTTP/1.1's default
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += s.recv(65536)
        head, _, body = reply.partition(b"\r\n\r\n")
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
        while len(body) < length:
            body += s.recv(65536)
        started = time.monotonic()
        assert s.recv(1) == b""  # the server hangs up
        assert 0.3 < time.monotonic() - started < 3.0
        wait_until(lambda: sum(server.http_connections().values()) == 0, timeout=5, what="the slot to be freed")


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_connections must be > 0.*read_timeout_s"):
        HttpLimits(max_connections=0, read_timeout_s=0)
    assert HttpLimits().read_timeout_s < 30 and HttpLimits().idle_timeout_s < 30
