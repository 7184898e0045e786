"""The operators' HTTP endpoint: the dashboard, Prometheus metrics and the snapshot as
JSON, read-only and plain HTTP (keep it on loopback or behind the operator's proxy).

    GET /                    the dashboard (HTML): the studies, the institutions, the history
    GET /studies/<name>      one study's page (HTML); ?rounds_page=N, ?lineage_page=N page its
                             rounds and lineage (newest first); an unknown study is a 404
    GET /metrics             Prometheus text format 0.0.4
    GET /api/snapshot.json   the ConsortiumSnapshot as JSON
    GET /healthz             "ok": the endpoint is up

HEAD is answered like GET without the body; any other method gets 405, any other
path 404, a page number that is no whole number from 1 a 400. Each request takes one
fresh snapshot; one that fails is a 503, never a crash of the server.

With a `token` (the coordinator gives its operator token when the page is served off
loopback), every route but /healthz needs it: `Authorization: Bearer <token>` (what
Prometheus' `authorization.credentials_file` sends), or a browser opens `/?token=...`
once and gets a session: a random id in a strict, HTTP-only cookie (Secure under TLS),
valid for hours on this process only. The token itself never goes into a cookie.

Every request, /healthz included, must name in its Host header an address the page is
served on (421 otherwise), so a rebound DNS name cannot read it; and no log line shows
a query string, a Bearer credential or a session cookie (_http_access).
"""

from __future__ import annotations

import logging
import secrets
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fedcollab._address import parse_address
from fedcollab.coordinator._dashboard import STUDIES_PATH, NoSuchStudy, linkable, render_dashboard, render_study
from fedcollab.coordinator._http_access import DEFAULT_SESSION_TTL_S, SESSION_COOKIE, HostCheck, Sessions, redact
from fedcollab.coordinator._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from fedcollab.coordinator._metrics import render_metrics
from fedcollab.coordinator._snapshot import ConsortiumSnapshot
from fedcollab.errors import ConfigError

log = logging.getLogger("fedcollab.coordinator.http")

# Names and reasons in the page come from outside: no script runs, nothing loads from
# elsewhere, whatever slips into the markup.
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_READ_TIMEOUT_S = 10.0  # a client that sends nothing does not hold a thread for longer


class OperatorHttpServer:
    """Serves the operator's routes from `snapshot()` (called once per request) in a
    daemon thread. start() returns the bound port (address "host:0": any free one).

    `allowed_hosts`: more names the Host header may carry (a proxy's public name) than
    those of the address itself. `ssl_context` (server side) serves HTTPS, and session
    cookies are then Secure."""

    def __init__(self, *, address: str, snapshot: Callable[[], ConsortiumSnapshot], token: str | None = None,
                 allowed_hosts: Iterable[str] = (), ssl_context: ssl.SSLContext | None = None,
                 session_ttl_s: float = DEFAULT_SESSION_TTL_S) -> None:
        self._host, self._requested_port = _split_address(address)
        self._snapshot = snapshot
        self._token = token
        self.hosts = HostCheck(bound_host=self._host, extra=allowed_hosts)
        self.sessions = Sessions(ttl_s=session_ttl_s)
        self._ssl_context = ssl_context
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("OperatorHttpServer.start() was already called")
        server_class = _IPv6Server if ":" in self._host else _Server
        try:
            server = server_class((self._host, self._requested_port), _handler_for(
                snapshot=self._snapshot, token=self._token, hosts=self.hosts, sessions=self.sessions,
                tls=self._ssl_context is not None))
        except OSError as e:
            raise OSError(f"cannot serve the operator page on {self._host}:{self._requested_port}: {e.strerror or e}"
                          ) from None
        if self._ssl_context is not None:
            # The handshake happens in the connection's own thread (_Handler.setup), not in accept().
            server.socket = self._ssl_context.wrap_socket(server.socket, server_side=True,
                                                          do_handshake_on_connect=False)
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="operator-http", daemon=True)
        self._thread.start()
        shown = f"[{self._host}]" if ":" in self._host else self._host
        log.info("operator page on %s://%s:%d/ (metrics at /metrics)", "https" if self._ssl_context else "http", shown,
                 self.port)
        return self.port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OperatorHttpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never holds up the coordinator's exit
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints the traceback to stderr; a failed TLS handshake is a client's problem.
        log.debug("operator page: connection from %s failed", client_address, exc_info=True)


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


def _split_address(address: str) -> tuple[str, int]:
    try:
        return parse_address(address, listen=True)
    except ValueError as e:
        raise ConfigError(f"server.http_address: {address!r} is {e}") from None


def _handler_for(*, snapshot: Callable[[], ConsortiumSnapshot], token: str | None, hosts: HostCheck,
                 sessions: Sessions, tls: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        take_snapshot = staticmethod(snapshot)
        operator_token = token
        host_check = hosts
        session_table = sessions
        served_tls = tls

    return Handler


class _Handler(BaseHTTPRequestHandler):
    take_snapshot: Callable[[], ConsortiumSnapshot]
    operator_token: str | None
    host_check: HostCheck
    session_table: Sessions
    served_tls: bool
    server_version = "fedcollab"
    sys_version = ""
    timeout = _READ_TIMEOUT_S
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()  # under `timeout`: a silent client loses its thread soon

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self._host_allowed(send_body=True):
            self._answer(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        if self._host_allowed(send_body=False):
            self._answer(send_body=False)

    def __getattr__(self, name: str) -> Any:
        # http.server looks up do_<METHOD>: every method but GET and HEAD is refused.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _host_allowed(self, *, send_body: bool) -> bool:
        hosts = type(self).host_check
        if hosts.allows(self.headers.get("Host")):
            return True
        log.warning("operator page: refused a request for Host %s from %s (not an address this page is served on; "
                    "a rebound DNS name?)", ascii(redact(self.headers.get("Host", ""))[:100]), self.address_string())
        self.close_connection = True
        self._send(HTTPStatus.MISDIRECTED_REQUEST,
                   f"421 misdirected: the Host header names no address this page is served on ({hosts.described()}); "
                   "open it by one of those (names elsewhere are refused against DNS rebinding)\n".encode(),
                   "text/plain; charset=utf-8", send_body=send_body)
        return False

    def _not_allowed(self) -> None:
        if not self._host_allowed(send_body=True):
            return
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"only GET and HEAD\n", "text/plain; charset=utf-8",
                   send_body=True, extra={"Allow": "GET, HEAD"})

    def _answer(self, *, send_body: bool) -> None:
        url = urlsplit(self.path)
        path = url.path
        if path == "/healthz":
            self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8", send_body=send_body)
            return
        token = type(self).operator_token
        if token is not None:
            given = parse_qs(url.query).get("token", [""])[0]
            if given and _same(given, token):  # once, from a link: a session in a cookie, the URL without it
                self._send(HTTPStatus.SEE_OTHER, b"", "text/plain; charset=utf-8", send_body=send_body,
                           # Only to a route of ours: "//elsewhere" would be a redirect off the site.
                           extra={"Location": path if _route(path, "") is not None else "/",
                                  "Set-Cookie": self._session_cookie()})
                return
            if not self._authorized(token):
                self._send(HTTPStatus.UNAUTHORIZED, b"operator token required: send 'Authorization: Bearer <token>' "
                           b"or open /?token=<token> once (the token is the coordinator's "
                           b"<state_dir>/operator.token)\n", "text/plain; charset=utf-8", send_body=send_body,
                           extra={"WWW-Authenticate": 'Bearer realm="fedcollab operators"'})
                return
        try:
            render = _route(path, url.query)
        except ValueError as e:
            self._send(HTTPStatus.BAD_REQUEST, f"{e}\n".encode(), "text/plain; charset=utf-8", send_body=send_body)
            return
        if render is None:
            self._send(HTTPStatus.NOT_FOUND, b"not found: try /, /studies/<name>, /metrics, /api/snapshot.json or "
                       b"/healthz\n", "text/plain; charset=utf-8", send_body=send_body)
            return
        content_type, to_text = render
        try:
            body = to_text(type(self).take_snapshot()).encode("utf-8")
        except NoSuchStudy as e:  # a name of the right form, of no study here (linkable: safe to echo)
            self._send(HTTPStatus.NOT_FOUND, f"no study {e.args[0]} at this coordinator: / lists them\n".encode(),
                       "text/plain; charset=utf-8", send_body=send_body)
            return
        except Exception as e:  # the store closed at shutdown, a bug in a renderer: one bad answer, not a dead server
            log.warning("operator page: cannot answer %s: %s: %s", path, type(e).__name__, e)
            log.debug("operator page: %s failed", path, exc_info=True)
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"the coordinator's state cannot be read right now\n",
                       "text/plain; charset=utf-8", send_body=send_body)
            return
        self._send(HTTPStatus.OK, body, content_type, send_body=send_body)

    def _session_cookie(self) -> str:
        table = type(self).session_table
        # Secure under TLS, ours or a proxy's that says so (a forged header only keeps the
        # cookie off plain HTTP, which costs the forger nothing it had).
        secure = type(self).served_tls or self.headers.get("X-Forwarded-Proto", "").strip().lower() == "https"
        return (f"{SESSION_COOKIE}={table.issue()}; Path=/; Max-Age={int(table.ttl_s)}; HttpOnly; SameSite=Strict"
                + ("; Secure" if secure else ""))

    def _authorized(self, token: str) -> bool:
        header = self.headers.get("Authorization", "")
        if header.startswith("Bearer ") and _same(header[len("Bearer "):].strip(), token):
            return True
        try:
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:
            return False
        return SESSION_COOKIE in cookie and type(self).session_table.valid(cookie[SESSION_COOKIE].value)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, *, send_body: bool,
              extra: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in {**_SECURITY_HEADERS, **(extra or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            if send_body:
                self.wfile.write(body)
        except (TimeoutError, BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True  # the client went away: nothing to answer to

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        # The request line carries ?token= links; send_error's messages quote it.
        token = type(self).operator_token
        log.debug("%s %s", self.address_string(), redact(format % args, secrets_=(token,) if token else ()))


def _same(a: str, b: str) -> bool:
    return secrets.compare_digest(a.encode(), b.encode())


_HTML = "text/html; charset=utf-8"
_ROUTES: dict[str, tuple[str, Callable[[ConsortiumSnapshot], str]]] = {
    "/": (_HTML, render_dashboard),
    "/index.html": (_HTML, render_dashboard),
    "/metrics": (METRICS_CONTENT_TYPE, render_metrics),
    "/api/snapshot.json": ("application/json", lambda s: s.to_json()),
}
_PAGE_KEYS = ("rounds_page", "lineage_page")
_MAX_PAGE_DIGITS = 7


def _route(path: str, query: str) -> tuple[str, Callable[[ConsortiumSnapshot], str]] | None:
    """What answers `path`: a fixed route, or a study's page (its name of a shared
    pattern, checked before any snapshot is taken); None: no such path. ValueError:
    a page number that is none."""
    fixed = _ROUTES.get(path)
    if fixed is not None or not path.startswith(STUDIES_PATH):
        return fixed
    name = path[len(STUDIES_PATH):]
    if not linkable(name):  # '/', '..', '%', a space: no study is named so
        return None
    pages: dict[str, int] = {}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        if key not in _PAGE_KEYS:
            continue  # ?token= and whatever else a link carried
        text = values[-1]
        if not (text.isascii() and text.isdigit() and 0 < len(text) <= _MAX_PAGE_DIGITS and int(text) >= 1):
            raise ValueError(f"400 bad request: {key} must be a whole number from 1 (page 1 holds the newest rows)")
        pages[key] = int(text)
    return _HTML, lambda snapshot: render_study(snapshot, name=name, **pages)
