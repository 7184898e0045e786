"""Crash injection for the crash-resume harness: a process kills itself (SIGKILL, as
`kill -9` would) when it reaches a named point for the n-th time.

    FEDCOLLAB_CRASH_AT="coordinator.commit_written:3"   # the 3rd time that point is reached

Unset, which is every run but the harness's, `crash_point` is one comparison. Timed
kills from outside cannot land reliably inside a commit that takes milliseconds; these
points can. The names are listed in POINTS, so a misspelt one fails at start-up rather
than never firing.
"""

from __future__ import annotations

import os
import signal
import threading

POINTS: frozenset[str] = frozenset({
    "coordinator.upload_chunk",  # a chunk of an update was folded into the round's sum
    "coordinator.aggregated",  # the round's new model is computed, nothing written yet
    "coordinator.commit_written",  # the new model's file is durable, the store does not name it yet
    "coordinator.commit_recorded",  # the store committed the round, its lineage copy is not written
    "institution.download_chunk",  # a chunk of the model was written to the partial file
    "institution.trained",  # local training finished, nothing sent yet
    "institution.upload_chunk",  # a chunk of the update was handed to gRPC
})


def _parse(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, count = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"FEDCOLLAB_CRASH_AT names {name!r}, not a crash point; known: {', '.join(sorted(POINTS))}")
    try:
        n = int(count or "1")
    except ValueError:
        raise ValueError(f"FEDCOLLAB_CRASH_AT={spec!r}: the count after ':' must be a positive integer") from None
    if n < 1:
        raise ValueError(f"FEDCOLLAB_CRASH_AT={spec!r}: the count after ':' must be a positive integer")
    return name, n


_TARGET = _parse(os.environ.get("FEDCOLLAB_CRASH_AT", ""))
_hits = 0
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Kills this process if it is the configured point's n-th hit."""
    global _hits
    if _TARGET is None or name != _TARGET[0]:
        return
    with _lock:
        _hits += 1
        if _hits == _TARGET[1]:
            os.kill(os.getpid(), signal.SIGKILL)
