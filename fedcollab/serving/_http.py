"""A small HTTP/JSON front end with the standard library, for partners without a gRPC
client:

    GET  /healthz      {"status": "ok", "version": 3}
    GET  /v1/model     what is served (the fields of ModelInfo)
    POST /v1/predict   {"instances": [example, ...]} ->
                       {"predictions": [{"label": 7, "probabilities": [...]}, ...], ...}

Errors are JSON too: {"error": {"reason": "INPUT_SHAPE", "message": "..."}}, with 400
for a bad input (a body shorter than its Content-Length too, after a read timeout of
seconds), 413 for a body or batch too large, 404/405 for a wrong path or method, 503
when every connection slot is busy. Each connection has its own thread, out of a
bounded number of slots that idle connections give up first (_connections), so a bad,
slow or silent client never holds up the others or stops the server."""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import ssl
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from fedcollab.errors import Rejected
from fedcollab.serving._connections import HEADERS, IDLE, WORKING, ConnectionSlots, HttpLimits, refuse
from fedcollab.serving._inputs import batches_from_instances
from fedcollab.serving._model import LoadedModel

log = logging.getLogger("fedcollab.serving")

MAX_BODY_BYTES = 16 * 1024 * 1024
_TOO_LARGE = {"BATCH_TOO_LARGE", "BODY_TOO_LARGE"}
_ROUTES = {"/healthz": "GET", "/v1/model": "GET", "/v1/predict": "POST"}


class HttpFrontEnd(ThreadingHTTPServer):
    """Binds at construction; `serve_forever` in a thread, `shutdown` and
    `server_close` to stop. `ssl_context` (server side) turns it into HTTPS."""

    daemon_threads = True  # a stuck client never holds up stop()
    request_queue_size = 128  # the listen backlog: a burst of connects is accepted, then sorted out by the slots

    def __init__(self, host: str, port: int, *, model: LoadedModel, max_batch: int,
                 ssl_context: ssl.SSLContext | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 limits: HttpLimits | None = None) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.model = model
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        self.info = model.info(max_batch=max_batch)
        self.limits = limits or HttpLimits()
        self.slots = ConnectionSlots(limits=self.limits)
        super().__init__((host, port), _Handler)
        if ssl_context is not None:
            # The handshake happens in the connection's own thread (_Handler.setup), not in accept().
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also resolves the host's FQDN, which can stall on a bad resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("HTTP connection from %s failed", client_address, exc_info=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.admit(request):  # in the accept loop: a refusal costs no thread
            refuse(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self.slots.release(request)


class _Handler(BaseHTTPRequestHandler):
    server: HttpFrontEnd
    protocol_version = "HTTP/1.1"  # keep-alive; every answer has a Content-Length
    server_version = "fedcollab-serve"

    def setup(self) -> None:
        self.timeout = self.server.limits.read_timeout_s  # type: ignore[misc]  # StreamRequestHandler.setup reads it
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def handle_one_request(self) -> None:
        # Waiting for a request (the first, or the next on a keep-alive connection) is
        # idle: a short timeout, and the slot may be taken back for a newcomer.
        slots, conn, limits = self.server.slots, self.connection, self.server.limits
        if not slots.mark(conn, IDLE):
            self.close_connection = True
            return
        conn.settimeout(limits.idle_timeout_s)
        try:
            first = self.rfile.peek(1)  # type: ignore[attr-defined]
        except (OSError, ValueError):  # the idle timeout, a reset, or the slot taken back
            first = b""
        if not first or not slots.mark(conn, HEADERS):
            self.close_connection = True
            return
        conn.settimeout(limits.read_timeout_s)
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.slots.mark(self.connection, WORKING)  # headers read: real work, never reclaimed
        return ok

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    # ----------------------------------------------------------------- routes
    def do_GET(self) -> None:
        path = self._route("GET")
        if path == "/healthz":
            self._send(HTTPStatus.OK, {"status": "ok", "study": self.server.model.card.study,
                                       "version": self.server.model.card.version})
        elif path == "/v1/model":
            self._send(HTTPStatus.OK, self.server.info)

    def do_POST(self) -> None:
        if self._route("POST") != "/v1/predict":
            return
        try:
            body = self._body()
            instances = _instances(body)
            model = self.server.model
            groups = batches_from_instances(model.spec, instances, max_batch=self.server.max_batch)
            predictions: list[dict[str, Any]] = [{} for _ in instances]
            for indices, batch in groups:
                labels, probs = model.predict(batch)
                for i, label, p in zip(indices, labels.tolist(), probs.tolist(), strict=True):
                    predictions[i] = {"label": label, "probabilities": p}
        except Rejected as e:
            status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if e.reason in _TOO_LARGE else HTTPStatus.BAD_REQUEST
            if e.reason == "LENGTH_REQUIRED":
                status = HTTPStatus.LENGTH_REQUIRED
            self._error(status, e.reason, e.message)
            return
        except Exception:
            log.exception("POST /v1/predict failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "INTERNAL", "internal error in the model server; see its log")
            return
        card = model.card
        self._send(HTTPStatus.OK, {"predictions": predictions, "num_classes": model.num_classes,
                                   "model_version": card.version, "model_sha256": card.sha256})

    def do_PUT(self) -> None:
        self._route("PUT")

    do_DELETE = do_PATCH = do_PUT

    def _route(self, method: str) -> str | None:
        """The path when `method` is what it takes; else answers 404 or 405 and gives None."""
        path = self.path.split("?", 1)[0]
        allowed = _ROUTES.get(path)
        if allowed is None:
            if method in ("POST", "PUT", "PATCH"):
                self.close_connection = True  # its body is left unread
            self._error(HTTPStatus.NOT_FOUND, "NOT_FOUND",
                        f"no {path!r} here; the paths are {', '.join(f'{m} {p}' for p, m in _ROUTES.items())}")
            return None
        if allowed != method:
            if method in ("POST", "PUT", "PATCH"):
                self.close_connection = True
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED", f"{path} takes {allowed}, not {method}",
                        headers={"Allow": allowed})
            return None
        return path

    # ----------------------------------------------------------------- bodies
    def _body(self) -> bytes:
        limit = self.server.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise _rejected("LENGTH_REQUIRED", "send the body with a Content-Length, not chunked")
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            raise _rejected("LENGTH_REQUIRED", "a POST needs a Content-Length header")
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError(length)
        except ValueError:
            self.close_connection = True
            raise _rejected("INPUT_FORMAT", f"Content-Length {length_header!r} is not a byte count") from None
        if length > limit:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise _rejected("BODY_TOO_LARGE", f"the body is {length} bytes, this server takes at most {limit}; "
                            f"send at most {self.server.max_batch} examples per request and split the rest")
        body = self._read_exactly(length)
        if len(body) != length:
            self.close_connection = True
            raise _rejected("BODY_INCOMPLETE", f"the body ended after {len(body)} of the {length} bytes its "
                            f"Content-Length announces (nothing more came within "
                            f"{self.server.limits.read_timeout_s:g} s, or the body took longer than its deadline); "
                            "send the whole body, with Content-Length its size in bytes")
        return body

    def _read_exactly(self, length: int) -> bytes:
        """Up to `length` bytes: fewer when the client stops sending for read_timeout_s,
        hangs up, or takes longer than the body's deadline in all."""
        limits = self.server.limits
        deadline = time.monotonic() + limits.body_deadline_s(length)
        parts, got = [], 0
        while got < length:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.connection.settimeout(min(limits.read_timeout_s, left))
            try:
                part = self.rfile.read1(min(length - got, 1 << 20))  # type: ignore[attr-defined]
            except (TimeoutError, OSError):
                break
            if not part:
                break
            parts.append(part)
            got += len(part)
        self.connection.settimeout(limits.read_timeout_s)
        return b"".join(parts)

    def _send(self, status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, allow_nan=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: HTTPStatus, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"error": {"reason": reason, "message": message}}, headers)


def _rejected(reason: str, message: str) -> Rejected:
    return Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason=reason, message=message)


def _instances(body: bytes) -> Any:
    """The "instances" of a JSON body; Rejected NOT_JSON or INPUT_FORMAT otherwise."""

    def no_constants(name: str) -> Any:
        raise _rejected("INPUT_NOT_FINITE", f"{name} is in the body; JSON has no NaN or Infinity and neither may "
                        "an input: replace missing values before predicting")

    try:
        document = json.loads(body, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise _rejected("NOT_JSON", f"the body is not JSON ({str(e)[:200]}); send "
                        "{\"instances\": [example, ...]} with Content-Type: application/json") from None
    if not isinstance(document, dict) or "instances" not in document:
        raise _rejected("INPUT_FORMAT", "the body must be a JSON object {\"instances\": [example, ...]}; "
                        "GET /v1/model describes one example")
    unknown = sorted(set(document) - {"instances"})
    if unknown:
        raise _rejected("INPUT_FORMAT", f"unknown field(s) {unknown}; the body is {{\"instances\": [...]}} only")
    return document["instances"]
