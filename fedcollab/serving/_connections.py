"""How many HTTP connections the model server holds, and for how long.

The standard library's ThreadingHTTPServer gives every connection a thread for as long
as the client keeps it open, without bound. Here a connection holds one of
`max_connections` slots. A connection that waits for its next request (idle keep-alive,
or opened and silent) gives its slot up to a newcomer when all are taken, oldest first;
so does one still sending its headers past `header_timeout_s`; only when every slot is
doing real work is the newcomer refused, with 503. That keeps a flood of idle sockets
from locking out a real request, while the thread count stays bounded.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fedcollab.serving")

IDLE, HEADERS, WORKING = "idle", "headers", "working"


@dataclass(frozen=True, kw_only=True)
class HttpLimits:
    """Limits of the HTTP front end. `read_timeout_s`: the longest wait for the next
    bytes of a request (a body shorter than its Content-Length is a 400 after it);
    `idle_timeout_s`: how long a connection may wait for its next request;
    `header_timeout_s`: how long a request line and headers may take before, under
    pressure, the connection is reclaimed; `min_body_rate`: bytes/s a body must keep
    on average (a trickle does not hold a thread for long)."""

    max_connections: int = 64
    read_timeout_s: float = 5.0
    idle_timeout_s: float = 5.0
    header_timeout_s: float = 10.0
    min_body_rate: float = 256 * 1024

    def __post_init__(self) -> None:
        problems = [f"{name} must be > 0, got {getattr(self, name)}" for name in
                    ("max_connections", "read_timeout_s", "idle_timeout_s", "header_timeout_s", "min_body_rate")
                    if not getattr(self, name) > 0]
        if problems:
            raise ValueError("HttpLimits: " + "; ".join(problems))

    def body_deadline_s(self, length: int) -> float:
        return self.read_timeout_s + length / self.min_body_rate


@dataclass
class _Slot:
    state: str
    since: float


_BUSY_BODY = json.dumps({"error": {"reason": "SERVER_BUSY", "message": "every connection of this model server is "
                                   "busy with a request; retry in a second, or reuse a keep-alive connection"}}
                        ).encode()
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                 b"Connection: close\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class ConnectionSlots:
    """The slots, keyed by socket. Thread-safe; `admit` runs in the accept loop."""

    def __init__(self, *, limits: HttpLimits) -> None:
        self.limits = limits
        self._slots: dict[Any, _Slot] = {}
        self._lock = threading.Lock()
        self.refused = 0
        self.reclaimed = 0
        self._last_warning = 0.0

    def admit(self, sock: Any) -> bool:
        """True when `sock` got a slot (perhaps one reclaimed from an idle connection)."""
        now = time.monotonic()
        with self._lock:
            if len(self._slots) >= self.limits.max_connections:
                victim = self._reclaimable(now)
                if victim is None:
                    self.refused += 1
                    self._warn(now)
                    return False
                del self._slots[victim]
                self.reclaimed += 1
                _hang_up(victim)
            self._slots[sock] = _Slot(state=IDLE, since=now)
            return True

    def mark(self, sock: Any, state: str) -> bool:
        """Moves `sock` to `state`; False when its slot was taken back (hang up)."""
        with self._lock:
            slot = self._slots.get(sock)
            if slot is None:
                return False
            slot.state, slot.since = state, time.monotonic()
            return True

    def release(self, sock: Any) -> None:
        with self._lock:
            self._slots.pop(sock, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def states(self) -> dict[str, int]:
        """How many connections are idle, sending headers, or working (for status and tests)."""
        with self._lock:
            counts = {IDLE: 0, HEADERS: 0, WORKING: 0}
            for slot in self._slots.values():
                counts[slot.state] += 1
            return counts

    def _reclaimable(self, now: float) -> Any | None:
        idle = [(s.since, id(k), k) for k, s in self._slots.items() if s.state == IDLE]
        if idle:
            return min(idle)[2]
        stale = [(s.since, id(k), k) for k, s in self._slots.items()
                 if s.state == HEADERS and now - s.since > self.limits.header_timeout_s]
        return min(stale)[2] if stale else None

    def _warn(self, now: float) -> None:
        if now - self._last_warning >= 10.0:  # one line per 10 s: a flood does not fill the log
            self._last_warning = now
            log.warning("model server HTTP: all %d connections are busy; refused %d connection(s) with 503 so far "
                        "(raise HttpLimits.max_connections if this is real load)", self.limits.max_connections,
                        self.refused)


def _hang_up(sock: Any) -> None:
    # The fd-level shutdown wakes the connection's thread out of its blocking read (EOF),
    # TLS or not, and it exits; closing the socket is left to that thread.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def refuse(sock: Any) -> None:
    """Answers 503 on a connection that got no slot (plaintext only: a TLS one has not
    shaken hands and is just closed) and closes it."""
    if not isinstance(sock, ssl.SSLSocket):
        try:
            sock.setblocking(False)  # a fresh socket's send buffer is empty: this never waits
            sock.send(BUSY_RESPONSE)
        except OSError:
            pass
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
    except OSError:
        pass
    sock.close()
