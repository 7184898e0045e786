from __future__ import annotations

import random

from fedcollab.institution._backoff import Backoff


def test_delays_grow_to_the_cap_with_full_jitter_and_reset() -> None:
    b = Backoff(initial_s=0.5, max_s=4.0, rng=random.Random(0))
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    delays = [b.next_delay() for _ in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays), "jitter spreads the retries"
    samples = [Backoff(initial_s=0.5, max_s=4.0, rng=random.Random(s)) for s in range(200)]
    for s in samples:
        for _ in range(5):
            s.next_delay()
    late = [s.next_delay() for s in samples]
    assert max(late) > 3.0 and min(late) < 1.0, "full jitter uses the whole [0, cap] range"
    b.reset()
    assert b.next_delay() <= 0.5
