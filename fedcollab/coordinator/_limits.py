"""How many calls one identity may hold open at once, so that no caller can take the
coordinator's RPC threads (a sync gRPC server: each open call holds one).

The interceptor (_auth.py) asks for a permit before a handler takes any work and
gives it back when the call ends, a stream included (in a `finally` and in the call's
termination callback, whichever comes first). Limits are counted per identity (the
certificate's role and name under mutual TLS), per kind of call within it (uploads,
long-polls, downloads) and, for long-polls, per session. Beyond a limit the call is
refused RESOURCE_EXHAUSTED / TOO_MANY_CALLS with a retry delay; an honest daemon
never gets there (it holds a long-poll and a heartbeat per study, an upload or a
download at a time, see fedcollab/institution/).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc

from fedcollab.errors import Rejected

# The methods whose calls last: each counts against its kind's limit as well as the total.
UPLOAD, POLL, DOWNLOAD = "upload", "poll", "download"
KIND_OF_METHOD = {
    "/fedcollab.v1.CoordinatorService/UploadUpdate": UPLOAD,
    "/fedcollab.v1.CoordinatorService/PollTask": POLL,
    "/fedcollab.v1.CoordinatorService/SecAggPoll": POLL,
    "/fedcollab.v1.CoordinatorService/DownloadModel": DOWNLOAD,
    "/fedcollab.v1.CoordinatorService/PullModel": DOWNLOAD,
}
# What a refused caller is told to wait: long enough for one of its own calls to end
# (a long-poll answers within server.max_poll_wait_s), short against a round.
RETRY_AFTER_S = 2


@dataclass(frozen=True)
class Limits:
    """Concurrent calls allowed. `calls_per_identity` covers every call of an identity;
    the others narrow one kind within it."""

    calls_per_identity: int
    uploads_per_identity: int
    polls_per_identity: int
    polls_per_session: int
    downloads_per_identity: int

    def __post_init__(self) -> None:
        bad = [f"{k} = {v}" for k, v in vars(self).items() if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"call limits must be at least 1: {', '.join(bad)}")


class Permit:
    """One call's share of the limits; `release()` may be called any number of times."""

    __slots__ = ("_keys", "_limiter", "_released")

    def __init__(self, limiter: CallLimits, keys: tuple[tuple[str, str], ...]) -> None:
        self._limiter, self._keys, self._released = limiter, keys, False

    def release(self) -> None:
        limiter = self._limiter
        with limiter._lock:
            if self._released:
                return
            self._released = True
            for key in self._keys:
                n = limiter._open[key] - 1
                if n:
                    limiter._open[key] = n
                else:
                    del limiter._open[key]  # only keys with open calls are kept: bounded memory


class CallLimits:
    """Counts open calls. One lock, a dict of counters: a permit costs a few dict
    operations, next to the handler's own work."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], int] = {}

    def acquire(self, *, identity: str, kind: str | None = None, session: str = "") -> Permit:
        """A permit for one call of `identity` (a method of `kind`, naming `session`),
        or Rejected RESOURCE_EXHAUSTED / TOO_MANY_CALLS when a limit is reached."""
        lim = self.limits
        wanted: list[tuple[tuple[str, str], int, str, str]] = [
            (("calls", identity), lim.calls_per_identity, "calls", "server.max_calls_per_identity")]
        if kind == UPLOAD:
            wanted.append(((UPLOAD, identity), lim.uploads_per_identity, "uploads", "server.max_uploads_per_identity"))
        elif kind == DOWNLOAD:
            wanted.append(((DOWNLOAD, identity), lim.downloads_per_identity, "downloads",
                           "server.max_downloads_per_identity"))
        elif kind == POLL:
            wanted.append(((POLL, identity), lim.polls_per_identity, "long-polls", "server.max_polls_per_identity"))
            if session:
                wanted.append((("session-poll", session), lim.polls_per_session, "long-polls on one session",
                               "server.max_polls_per_session"))
        with self._lock:
            for key, limit, what, setting in wanted:
                if self._open.get(key, 0) >= limit:
                    raise Rejected(
                        code=grpc.StatusCode.RESOURCE_EXHAUSTED, reason="TOO_MANY_CALLS",
                        message=f"{identity} has {limit} {what} open at once, the most this coordinator allows "
                                f"({setting}): let one end before opening another; retry in {RETRY_AFTER_S} s",
                        metadata={"limit": limit, "kind": what, "retry_after_seconds": RETRY_AFTER_S})
            for key, _, _, _ in wanted:
                self._open[key] = self._open.get(key, 0) + 1
        return Permit(self, tuple(key for key, _, _, _ in wanted))

    def open_calls(self, identity: str, kind: str = "calls") -> int:
        """Calls of `identity` open now (of one kind: upload, poll, download)."""
        with self._lock:
            return self._open.get((kind, identity), 0)
