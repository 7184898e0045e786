"""The operators' page off loopback: the operator token or nothing (but /healthz)."""

from __future__ import annotations

import http.client
import time

from fedcollab.coordinator._http import OperatorHttpServer
from fedcollab.coordinator._snapshot import ConsortiumSnapshot

TOKEN = "s3cret-token"


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_every_route_but_healthz_needs_the_token() -> None:
    snapshot = ConsortiumSnapshot(federation="f", taken_at=time.time(), studies=[], institutions=[])
    with OperatorHttpServer(address="127.0.0.1:0", snapshot=lambda: snapshot, token=TOKEN) as server:
        port = server.port
        assert port is not None
        assert _get(port, "/healthz").status == 200
        for path in ("/", "/metrics", "/api/snapshot.json"):
            refused = _get(port, path)
            assert refused.status == 401 and refused.getheader("WWW-Authenticate", "").startswith("Bearer")
            assert _get(port, path, {"Authorization": "Bearer wrong"}).status == 401
            assert _get(port, path, {"Authorization": f"Bearer {TOKEN}"}).status == 200
        # A browser: the token once in the URL, then a cookie, and the URL without it.
        assert _get(port, "/?token=wrong").status == 401
        link = _get(port, "/?token=" + TOKEN)
        assert link.status == 303 and link.getheader("Location") == "/"
        cookie = link.getheader("Set-Cookie", "")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert _get(port, "/", {"Cookie": cookie.split(";")[0]}).status == 200
        assert _get(port, "/", {"Cookie": "fedcollab_operator=nope"}).status == 401
        assert _get(port, "/", {"Cookie": "\x00garbage;;=="}).status == 401


def test_without_a_token_the_page_is_open_as_on_loopback() -> None:
    snapshot = ConsortiumSnapshot(federation="f", taken_at=time.time(), studies=[], institutions=[])
    with OperatorHttpServer(address="127.0.0.1:0", snapshot=lambda: snapshot) as server:
        assert server.port is not None and _get(server.port, "/metrics").status == 200
