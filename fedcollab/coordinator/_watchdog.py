"""Deadlines between the messages of a stream: one thread for all streams.

A sync gRPC handler blocked on a client stream's next message (or on sending to a
client that stopped reading) holds its thread until a message comes. A caller that
opens a stream and goes quiet would hold it for good. Each stream has a timer, armed
while the handler waits and disarmed when the message comes; the watchdog thread
sleeps until the earliest deadline of a heap and, when one passes, calls the timer's
`on_expire` (the call's `context.cancel()`, which wakes the blocked handler).

One heap entry per timer is kept alive however often it is re-armed: re-arming only
moves the timer's own deadline later, and the entry is pushed back with it when it
comes up early (a million chunks do not make a million entries).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from fedcollab.errors import Rejected

log = logging.getLogger("fedcollab.coordinator")


class StreamTimer:
    """One stream's deadline. `arm(s)`: expire s seconds from now unless disarmed or
    re-armed first; `expired` tells whether it fired (then `on_expire` has run)."""

    __slots__ = ("_deadline", "_heap_deadline", "_on_expire", "_watchdog", "expired")

    def __init__(self, watchdog: Watchdog, on_expire: Callable[[], None]) -> None:
        self._watchdog = watchdog
        self._on_expire = on_expire
        self._deadline: float | None = None  # None: disarmed
        self._heap_deadline: float | None = None  # the deadline of its live heap entry
        self.expired = False

    def arm(self, timeout_s: float) -> None:
        self._watchdog._arm(self, time.monotonic() + timeout_s)

    def disarm(self) -> None:
        self._watchdog._disarm(self)


class Watchdog:
    """Starts its thread on first use; `close()` stops it (timers then never fire)."""

    def __init__(self, *, name: str = "stream-watchdog") -> None:
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, StreamTimer]] = []
        self._seq = itertools.count()  # ties in the heap never compare timers
        self._thread: threading.Thread | None = None
        self._closed = False
        self.fired = 0  # timers that expired, since start: for tests and metrics

    def timer(self, on_expire: Callable[[], None]) -> StreamTimer:
        return StreamTimer(self, on_expire)

    def pending(self) -> int:
        """Heap entries now: about one per stream armed in the last timeout."""
        with self._cond:
            return len(self._heap)

    def _arm(self, timer: StreamTimer, deadline: float) -> None:
        with self._cond:
            if self._closed or timer.expired:
                return
            timer._deadline = deadline
            if timer._heap_deadline is None or deadline < timer._heap_deadline:
                # No entry yet, or a shorter timeout than the one queued: an entry of its
                # own (the old one is skipped when it comes up).
                timer._heap_deadline = deadline
                heapq.heappush(self._heap, (deadline, next(self._seq), timer))
                if self._heap[0][2] is timer:
                    self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _disarm(self, timer: StreamTimer) -> None:
        with self._cond:
            timer._deadline = None  # its entry, if any, is dropped when it comes up

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            due: list[StreamTimer] = []
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    at, _, timer = heapq.heappop(self._heap)
                    if at != timer._heap_deadline:
                        continue  # superseded by an earlier entry of the same timer
                    timer._heap_deadline = None
                    if timer._deadline is None:
                        continue  # disarmed
                    if timer._deadline > now:  # re-armed later since: queue it again
                        timer._heap_deadline = timer._deadline
                        heapq.heappush(self._heap, (timer._deadline, next(self._seq), timer))
                        continue
                    timer._deadline = None
                    timer.expired = True
                    self.fired += 1
                    due.append(timer)
                if not due:
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
                    continue
            for timer in due:  # outside the lock: cancelling a call takes gRPC's own locks
                try:
                    timer._on_expire()
                except Exception:
                    log.exception("cancelling a stalled stream failed")


@dataclass(frozen=True)
class StreamDeadlines:
    """server.stream_first_message_timeout_s and server.stream_idle_timeout_s."""

    first_message_s: float = 15.0
    idle_s: float = 60.0


def _stalled(*, upload: bool, first: bool, after_s: float) -> Rejected:
    what = "no header" if first and upload else "no first message" if first else "no message"
    return Rejected(code=grpc.StatusCode.DEADLINE_EXCEEDED, reason="UPLOAD_STALLED" if upload else "STREAM_STALLED",
                    message=f"{what} came for {after_s:g} s: the stream was cut off (server.stream_"
                            f"{'first_message' if first else 'idle'}_timeout_s); send the whole stream without pauses",
                    metadata={"timeout_seconds": f"{after_s:g}"})


def watched_requests(requests: Iterator[Any], *, timer: StreamTimer, deadlines: StreamDeadlines, upload: bool,
                     on_first: Callable[[Any], None] | None = None) -> Iterator[Any]:
    """`requests` (a client stream), each message awaited under a deadline. When the
    deadline passes the watchdog cancels the call, which ends the wait either way gRPC
    reports it (a short stream or an RpcError): both become Rejected UPLOAD_STALLED
    (STREAM_STALLED for other streams), for the handler to record. `on_first` sees the
    first message before the handler does (and may refuse it)."""
    count = 0
    while True:
        after = deadlines.first_message_s if count == 0 else deadlines.idle_s
        timer.arm(after)
        try:
            message = next(requests)
        except StopIteration:
            timer.disarm()
            if timer.expired:
                raise _stalled(upload=upload, first=count == 0, after_s=after) from None
            return
        except grpc.RpcError:  # the client went away (or the watchdog cancelled the call)
            timer.disarm()
            if timer.expired:
                raise _stalled(upload=upload, first=count == 0, after_s=after) from None
            raise
        timer.disarm()
        if timer.expired:  # it came as the call was being cancelled: the call is gone all the same
            raise _stalled(upload=upload, first=count == 0, after_s=after)
        if count == 0 and on_first is not None:
            on_first(message)
        count += 1
        yield message


def watched_responses(responses: Iterator[Any], *, timer: StreamTimer, deadlines: StreamDeadlines,
                      what: Callable[[], str]) -> Iterator[Any]:
    """`responses` (a server stream), each send under the idle deadline: gRPC asks for
    the next message once the last one is sent, so a client that stops reading (its
    flow-control window full) stops that, and the watchdog cancels the call."""
    try:
        for response in responses:
            timer.arm(deadlines.idle_s)
            yield response
            timer.disarm()
    finally:
        timer.disarm()
        if timer.expired:
            log.warning("%s: cut off, the client read nothing for %g s (STREAM_STALLED)", what(), deadlines.idle_s)
