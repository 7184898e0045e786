"""Updates as integers mod 2^bits, so masks can be added and the sum taken exactly.

Each value is clipped to [-clip, clip] and mapped with unbiased stochastic rounding to
an integer in [0, levels], where levels leaves room for the sum of `max_summands`
values below 2^bits: the modular sum of the institutions' integers is then their true
integer sum, and it decodes to the sum of the updates within max_summands / scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Quantizer:
    clip: float
    bits: int
    max_summands: int

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError("clip must be positive")
        if not 2 <= self.bits <= 32:
            raise ValueError("bits must be in 2..32")
        headroom = math.ceil(math.log2(max(self.max_summands, 1))) if self.max_summands > 1 else 0
        if self.bits - headroom < 2:
            raise ValueError(f"{self.bits} bits leave no room for the sum of {self.max_summands} values; "
                             "use more bits or fewer institutions per round")

    @property
    def levels(self) -> int:
        """Largest integer one value maps to."""
        headroom = math.ceil(math.log2(self.max_summands)) if self.max_summands > 1 else 0
        return (1 << (self.bits - headroom)) - 1

    @property
    def scale(self) -> float:
        return self.levels / (2 * self.clip)

    def encode(self, values: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
        """float values -> uint32 in [0, levels], stochastically rounded (unbiased)."""
        x = (np.clip(np.asarray(values, dtype=np.float64), -self.clip, self.clip) + self.clip) * self.scale
        low = np.floor(x)
        q = low + (rng.random(x.shape) < (x - low))
        return np.minimum(q, self.levels).astype(np.uint32)

    def decode_sum(self, total: np.ndarray, *, summands: int) -> np.ndarray:
        """The modular sum of `summands` encoded vectors -> the sum of their values."""
        if not 1 <= summands <= self.max_summands:
            raise ValueError(f"summands must be in 1..{self.max_summands}")
        return np.asarray(total, dtype=np.float64) / self.scale - summands * self.clip
