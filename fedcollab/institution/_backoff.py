"""Exponential backoff with full jitter (AWS architecture blog, 2015): spreads the
reconnects of many institutions after a coordinator restart."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, *, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self._initial, self._max = initial_s, max_s
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self._max, self._initial * (2 ** self._attempt))
        self._attempt += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self._attempt = 0
