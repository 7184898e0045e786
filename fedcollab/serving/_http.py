"""A small HTTP/JSON front end with the standard library, for partners without a gRPC
client:

    GET  /healthz      {"status": "ok", "version": 3}
    GET  /v1/model     what is served (the fields of ModelInfo)
    POST /v1/predict   {"instances": [example, ...]} ->
                       {"predictions": [{"label": 7, "probabilities": [...]}, ...], ...}

Errors are JSON too: {"error": {"reason": "INPUT_SHAPE", "message": "..."}}, with 400
for a bad input, 413 for a body or batch too large, 404/405 for a wrong path or method.
Each connection has its own thread and a read timeout, so a bad or slow client never
holds up the others or stops the server."""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import ssl
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from fedcollab.errors import Rejected
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

    def __init__(self, host: str, port: int, *, model: LoadedModel, max_batch: int,
                 ssl_context: ssl.SSLContext | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.model = model
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        self.info = model.info(max_batch=max_batch)
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


class _Handler(BaseHTTPRequestHandler):
    server: HttpFrontEnd
    protocol_version = "HTTP/1.1"  # keep-alive; every answer has a Content-Length
    server_version = "fedcollab-serve"
    timeout = 30  # seconds a read may block: a stalled client loses its connection, not a thread for good

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

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
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise _rejected("INPUT_FORMAT", f"the body ended after {len(body)} of {length} bytes")
        return body

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
