"""A study's traffic totals that outlive the coordinator process: bytes received and
sent, and failed participations by reason (the Prometheus counters
fedcollab_received_bytes_total, fedcollab_sent_bytes_total and
fedcollab_participations_failed_total).

The engine counts in memory (a chunk costs an addition, not a write). The totals go
to the study's store in the same transaction as each round's close (commit or
failure) and once more at shutdown, and are loaded back at start. A coordinator
killed with `kill -9` loses at most what it counted since its last round closed; a
stopped one loses nothing. Counters that only grow are what Prometheus' rate() and
increase() expect; a reset at each restart would read as a drop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedcollab.coordinator._engine import RoundEngine
    from fedcollab.coordinator._store import Store

BYTES_IN = "bytes_in"
BYTES_OUT = "bytes_out"
FAILED_PREFIX = "failed:"  # + the participation's failure reason


def totals_of(engine: RoundEngine) -> dict[str, int]:
    """The engine's totals under their stored names. Plain reads: ints and one C-level
    copy of the Counter under the GIL, safe against the engine's updates."""
    failures = dict(engine.failures)
    return {BYTES_IN: int(engine.bytes_in), BYTES_OUT: int(engine.bytes_out),
            **{FAILED_PREFIX + reason: int(n) for reason, n in failures.items()}}


def attach(*, engine: RoundEngine, store: Store) -> None:
    """Starts `engine`'s totals from what `store` kept, and has the store write them
    with every round's close. Call before the engine serves anyone."""
    saved = store.counters()
    engine.bytes_in = saved.get(BYTES_IN, 0)
    engine.bytes_out = saved.get(BYTES_OUT, 0)
    engine.failures.clear()
    engine.failures.update({name[len(FAILED_PREFIX):]: n for name, n in saved.items()
                            if name.startswith(FAILED_PREFIX) and n > 0})
    store.counters_source = lambda: totals_of(engine)
