"""Who may read the operators' page: the Host check (against DNS rebinding), browser
sessions (a random id in the cookie, never the operator token) and what log lines may
not show.

Why each:
- DNS rebinding: a page on `evil.example` re-resolves its own name to 127.0.0.1 and
  reads the open loopback dashboard as same-origin. The browser still sends
  `Host: evil.example`, so a page that answers only the names and addresses it is
  served on cannot be read that way.
- The operator token is also the gRPC operator credential over plaintext. A cookie
  that held it would hand the operator API to anything that reads the browser's
  cookies; a session id opens this page only, expires, and dies with the process.
- A `?token=` link, a Bearer header or a session cookie in a log line is a credential
  in a file that many people read.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

SESSION_COOKIE = "fedcollab_session"
DEFAULT_SESSION_TTL_S = 8 * 3600.0  # a working day; then the operator opens the ?token= link again
MAX_SESSIONS = 256  # the oldest is dropped beyond: a link opened in a loop cannot grow the table
_WILDCARDS = {"", "0.0.0.0", "::"}


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def host_of(header: str) -> str | None:
    """The host part of a Host header ("name", "name:port", "1.2.3.4:80", "[::1]:80"),
    lower-cased without a trailing dot; None when it is not of that form."""
    value = header.strip()
    if value.startswith("["):
        inside, sep, rest = value[1:].partition("]")
        if not sep or (rest and not re.fullmatch(r":[0-9]{1,5}", rest)) or _ip(inside) is None:
            return None
        return inside.lower()
    host, sep, port = value.rpartition(":")
    if not sep:
        host = value
    elif not re.fullmatch(r"[0-9]{1,5}", port):
        return None
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,253}", host):  # no ':' left: a bare IPv6 without brackets is no Host
        return None
    return host.rstrip(".").lower()


class HostCheck:
    """The Host names this page answers: loopback names and addresses when it is served
    on loopback or on every interface, the host it is bound to, on every interface the
    machine's own names and any IP address (an address in Host cannot be rebound), and
    `extra` names (a proxy's public name)."""

    def __init__(self, *, bound_host: str, extra: Iterable[str] = ()) -> None:
        bound = bound_host.strip("[]").lower()
        self._wildcard = bound in _WILDCARDS
        bound_ip = _ip(bound)
        self._bound_ip = bound_ip
        self._loopback = bound == "localhost" or (bound_ip is not None and bound_ip.is_loopback)
        names = {n.strip().rstrip(".").lower() for n in extra if n.strip()}
        if bound_ip is None and not self._wildcard:
            names.add(bound.rstrip("."))
        if self._loopback or self._wildcard:
            names.add("localhost")
        if self._wildcard:
            names.add(socket.gethostname().lower())  # no FQDN lookup: it can stall on a bad resolver
        self.names = frozenset(names)

    def allows(self, header: str | None) -> bool:
        host = host_of(header) if header else None
        if host is None:
            return False
        ip = _ip(host)
        if ip is None:
            return host in self.names
        if self._wildcard:
            return True
        return ip == self._bound_ip or (self._loopback and ip.is_loopback)

    def described(self) -> str:
        shown = sorted(self.names)
        if self._wildcard:
            shown.append("any IP address of this machine")
        elif self._bound_ip is not None:
            shown.append(str(self._bound_ip))
            if self._loopback:
                shown.append("any loopback address")
        return ", ".join(shown)


class Sessions:
    """Browser sessions: random ids handed out for the operator token, held here as
    SHA-256 digests with an expiry. Thread-safe."""

    def __init__(self, *, ttl_s: float = DEFAULT_SESSION_TTL_S, max_sessions: int = MAX_SESSIONS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0 or max_sessions < 1:
            raise ValueError(f"session ttl_s must be > 0 and max_sessions >= 1, got {ttl_s} and {max_sessions}")
        self.ttl_s = ttl_s
        self._max = max_sessions
        self._clock = clock
        self._expiry: OrderedDict[bytes, float] = OrderedDict()  # digest -> expiry, oldest first
        self._lock = threading.Lock()

    def issue(self) -> str:
        sid = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            self._drop_expired(now)
            while len(self._expiry) >= self._max:
                self._expiry.popitem(last=False)
            self._expiry[_digest(sid)] = now + self.ttl_s
        return sid

    def valid(self, sid: str) -> bool:
        # A dict lookup by digest: the time it takes tells nothing about a stored id.
        now = self._clock()
        with self._lock:
            expiry = self._expiry.get(_digest(sid))
            if expiry is None:
                return False
            if expiry <= now:
                del self._expiry[_digest(sid)]
                return False
            return True

    def __len__(self) -> int:
        with self._lock:
            self._drop_expired(self._clock())
            return len(self._expiry)

    def _drop_expired(self, now: float) -> None:
        for digest in [d for d, e in self._expiry.items() if e <= now]:
            del self._expiry[digest]


def _digest(sid: str) -> bytes:
    return hashlib.sha256(sid.encode("utf-8", "replace")).digest()


_QUERY = re.compile(r"\?[^\s'\"]*")
_TOKEN_PARAM = re.compile(r"(?i)token(=|%3d)[^\s&'\"]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\"]+")
_COOKIE = re.compile(r"(?i)(fedcollab_\w+=)[^;\s'\"]*")


def redact(text: str, *, secrets_: Iterable[str] = ()) -> str:
    """`text` without query strings, token parameters, Bearer credentials, our cookies'
    values or any of `secrets_` (the operator token itself, however it got there)."""
    for secret in secrets_:
        if secret:
            text = text.replace(secret, "<redacted>")
    text = _QUERY.sub("?<query redacted>", text)
    text = _TOKEN_PARAM.sub("token=<redacted>", text)
    text = _BEARER.sub(r"\1<redacted>", text)
    return _COOKIE.sub(r"\1<redacted>", text)
