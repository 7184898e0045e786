"""The call limits and the stream watchdog on their own (no gRPC): what is counted,
what is refused and with what, what is given back; deadlines that fire once, late
re-arms that move them, and a heap that does not grow with every message."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from fedcollab.config import ServerConfig
from fedcollab.coordinator._limits import DOWNLOAD, POLL, UPLOAD, CallLimits, Limits
from fedcollab.coordinator._watchdog import StreamDeadlines, Watchdog, watched_requests, watched_responses
from fedcollab.errors import Rejected

LIMITS = Limits(calls_per_identity=5, uploads_per_identity=2, polls_per_identity=3, polls_per_session=2,
                downloads_per_identity=1)


def _refused(call: Any) -> Rejected:
    with pytest.raises(Rejected) as e:
        call()
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.reason == "TOO_MANY_CALLS"
    assert e.value.metadata["retry_after_seconds"] == "2"
    return e.value


@pytest.mark.parametrize(("kind", "limit", "setting"), [
    (UPLOAD, 2, "server.max_uploads_per_identity"),
    (DOWNLOAD, 1, "server.max_downloads_per_identity"),
    (None, 5, "server.max_calls_per_identity"),
])
def test_each_kind_is_limited_per_identity(kind: str | None, limit: int, setting: str) -> None:
    limits = CallLimits(LIMITS)
    permits = [limits.acquire(identity="mallory", kind=kind) for _ in range(limit)]
    error = _refused(lambda: limits.acquire(identity="mallory", kind=kind))
    assert setting in error.message and error.metadata["limit"] == str(limit)
    assert limits.acquire(identity="hospital-a", kind=kind)  # another identity is not affected
    permits[0].release()
    assert limits.acquire(identity="mallory", kind=kind)  # one ended: one more may open


def test_long_polls_are_limited_per_session_and_per_identity() -> None:
    limits = CallLimits(LIMITS)
    limits.acquire(identity="mallory", kind=POLL, session="s1")
    limits.acquire(identity="mallory", kind=POLL, session="s1")
    assert "server.max_polls_per_session" in _refused(
        lambda: limits.acquire(identity="mallory", kind=POLL, session="s1")).message
    limits.acquire(identity="mallory", kind=POLL, session="s2")
    assert "server.max_polls_per_identity" in _refused(
        lambda: limits.acquire(identity="mallory", kind=POLL, session="s3")).message


def test_every_kind_counts_against_the_total_and_a_refusal_takes_nothing() -> None:
    limits = CallLimits(LIMITS)
    for kind in (UPLOAD, UPLOAD, DOWNLOAD, POLL, None):
        limits.acquire(identity="mallory", kind=kind, session="s")
    assert limits.open_calls("mallory") == 5
    _refused(lambda: limits.acquire(identity="mallory", kind=POLL, session="s"))
    assert (limits.open_calls("mallory"), limits.open_calls("mallory", POLL)) == (5, 1)


def test_a_permit_is_given_back_once_and_nothing_is_kept_of_ended_calls() -> None:
    limits = CallLimits(LIMITS)
    permit = limits.acquire(identity="mallory", kind=POLL, session="s")
    other = limits.acquire(identity="mallory", kind=POLL, session="s")
    permit.release()
    permit.release()  # the finally and the termination callback both call it
    assert limits.open_calls("mallory", POLL) == 1
    other.release()
    assert limits._open == {}


def test_concurrent_acquires_never_exceed_the_limit() -> None:
    limits = CallLimits(LIMITS)
    granted: list[Any] = []
    barrier = threading.Barrier(20)

    def take() -> None:
        barrier.wait()
        try:
            granted.append(limits.acquire(identity="mallory", kind=UPLOAD))
        except Rejected:
            pass

    threads = [threading.Thread(target=take) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 2


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="uploads_per_identity = 0"):
        Limits(calls_per_identity=5, uploads_per_identity=0, polls_per_identity=1, polls_per_session=1,
               downloads_per_identity=1)


def test_the_total_per_identity_stays_at_most_half_the_threads() -> None:
    assert ServerConfig().calls_per_identity == 24  # of 256 threads
    assert ServerConfig(max_workers=16).calls_per_identity == 8
    assert ServerConfig(max_workers=4).calls_per_identity == 2
    assert ServerConfig(max_workers=16, max_calls_per_identity=8).calls_per_identity == 8
    with pytest.raises(ValueError, match="at most half of max_workers"):
        ServerConfig(max_workers=16, max_calls_per_identity=9)


# ------------------------------------------------------------------ watchdog
def test_a_timer_fires_once_after_its_timeout() -> None:
    dog = Watchdog()
    fired = threading.Event()
    calls: list[float] = []
    timer = dog.timer(lambda: (calls.append(time.monotonic()), fired.set()))
    start = time.monotonic()
    timer.arm(0.1)
    assert fired.wait(5)
    assert timer.expired and 0.09 <= calls[0] - start < 2
    timer.arm(0.05)  # an expired timer stays expired
    time.sleep(0.2)
    assert len(calls) == 1 and dog.fired == 1
    dog.close()


def test_a_disarmed_timer_does_not_fire_and_a_rearmed_one_fires_later() -> None:
    dog = Watchdog()
    quiet, late = threading.Event(), threading.Event()
    a, b = dog.timer(quiet.set), dog.timer(late.set)
    a.arm(0.05)
    a.disarm()
    start = time.monotonic()
    b.arm(0.1)
    time.sleep(0.05)
    b.arm(0.3)  # moved later: not at 0.1 s
    assert late.wait(5)
    assert time.monotonic() - start >= 0.34
    assert not quiet.is_set() and not a.expired
    dog.close()


def test_a_shorter_rearm_fires_at_the_shorter_deadline() -> None:
    dog = Watchdog()
    fired = threading.Event()
    timer = dog.timer(fired.set)
    timer.arm(30)  # the first message's deadline
    start = time.monotonic()
    timer.arm(0.1)  # then the idle one, shorter
    assert fired.wait(5) and time.monotonic() - start < 5
    dog.close()


def test_the_heap_holds_one_entry_per_stream_however_often_it_is_rearmed() -> None:
    dog = Watchdog()
    timers = [dog.timer(lambda: None) for _ in range(10)]
    for _ in range(1000):
        for t in timers:
            t.arm(60)
            t.disarm()
    assert dog.pending() == 10
    dog.close()


class _Stream:
    """A client stream: messages put in a queue; `cancel()` ends it as gRPC does."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self.queue.get(timeout=10)
        if item is None:
            raise StopIteration
        return item

    def cancel(self) -> None:
        self.queue.put(None)


def test_a_stream_that_goes_quiet_is_cancelled_and_refused_as_stalled() -> None:
    dog = Watchdog()
    stream = _Stream()
    messages = watched_requests(stream, timer=dog.timer(stream.cancel), upload=True,
                                deadlines=StreamDeadlines(first_message_s=0.2, idle_s=0.1))
    stream.queue.put("header")
    assert next(messages) == "header"
    start = time.monotonic()
    with pytest.raises(Rejected) as e:
        next(messages)  # nothing more comes
    assert e.value.reason == "UPLOAD_STALLED" and e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stream_idle_timeout_s" in e.value.message and time.monotonic() - start < 5
    dog.close()


def test_no_first_message_is_stalled_too_and_a_stream_that_ends_is_not() -> None:
    dog = Watchdog()
    silent = _Stream()
    with pytest.raises(Rejected, match="no header came for 0.1 s") as e:
        next(watched_requests(silent, timer=dog.timer(silent.cancel), upload=True,
                              deadlines=StreamDeadlines(first_message_s=0.1, idle_s=10)))
    assert "stream_first_message_timeout_s" in e.value.message
    whole = _Stream()
    for item in ("header", "chunk", None):
        whole.queue.put(item)
    timer = dog.timer(whole.cancel)
    assert list(watched_requests(whole, timer=timer, upload=True, deadlines=StreamDeadlines(0.1, 0.1))) == [
        "header", "chunk"]
    time.sleep(0.2)
    assert not timer.expired  # disarmed when the stream ended
    dog.close()


def test_the_first_message_may_be_refused_before_the_handler_sees_it() -> None:
    stream = _Stream()
    stream.queue.put("header")

    def refuse(message: Any) -> None:
        raise Rejected(code=grpc.StatusCode.RESOURCE_EXHAUSTED, reason="TOO_MANY_CALLS", message=message)

    dog = Watchdog()
    with pytest.raises(Rejected, match="TOO_MANY_CALLS"):
        next(watched_requests(stream, timer=dog.timer(stream.cancel), upload=True, deadlines=StreamDeadlines(),
                              on_first=refuse))
    dog.close()


def test_a_server_stream_is_timed_only_while_its_message_is_being_sent() -> None:
    dog = Watchdog()
    cancelled = threading.Event()
    timer = dog.timer(cancelled.set)
    responses = watched_responses(iter(["a", "b"]), timer=timer, deadlines=StreamDeadlines(idle_s=0.1),
                                  what=lambda: "test")
    assert next(responses) == "a"
    assert cancelled.wait(5)  # the client did not take "a" within 0.1 s: cut off
    timer2 = dog.timer(lambda: None)
    slow_source = watched_responses((time.sleep(0.3) or x for x in "ab"), timer=timer2,
                                    deadlines=StreamDeadlines(idle_s=0.1), what=lambda: "test")
    assert list(slow_source) == ["a", "b"]  # the handler's own work between messages is not timed
    assert not timer2.expired
    dog.close()


class _Broken(grpc.RpcError):
    pass


def test_a_client_that_goes_away_is_still_an_interruption_not_a_stall() -> None:
    """gRPC reports a cancelled call to the handler's iterator as an RpcError: the
    servicer records that as UPLOAD_INTERRUPTED, unless the watchdog did the cancelling."""
    def gone() -> Iterator[Any]:
        yield "header"
        raise _Broken()

    dog = Watchdog()
    messages = watched_requests(gone(), timer=dog.timer(lambda: None), upload=True, deadlines=StreamDeadlines(5, 5))
    assert next(messages) == "header"
    with pytest.raises(_Broken):
        next(messages)
    stalled = _Stream()
    stalled.queue.put("header")

    def cut() -> Iterator[Any]:
        yield from stalled
        raise _Broken()  # as gRPC ends a cancelled call's stream

    messages = watched_requests(cut(), timer=dog.timer(stalled.cancel), upload=True, deadlines=StreamDeadlines(5, 0.1))
    assert next(messages) == "header"
    with pytest.raises(Rejected, match="UPLOAD_STALLED"):
        next(messages)
    dog.close()
