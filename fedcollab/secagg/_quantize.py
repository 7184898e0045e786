"""Updates as integers mod 2^bits, so masks can be added and the sum taken exactly.

A value v becomes round(v * scale), stochastically rounded (unbiased), stored in
two's complement mod 2^bits. Sums wrap mod 2^bits like the masks do; the unmasked sum
is read back as a signed integer in [-2^(bits-1), 2^(bits-1)), which is the true sum
as long as it stays in that range. `for_range` picks the largest scale for which the
sum of `max_summands` values in [-clip, clip] (plus `noise_std` of integer noise, at
ten standard deviations) cannot leave it: 2^31 levels shared by 8 institutions and a
clip of 8 gives a resolution of 3e-8 per value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Quantizer:
    scale: float  # integer levels per unit of value
    bits: int

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 32:
            raise ValueError("bits must be in 2..32")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError("scale must be positive and finite")

    @classmethod
    def for_range(cls, *, clip: float, bits: int, max_summands: int, noise_std: float = 0.0) -> Quantizer:
        """The finest quantizer whose sum of `max_summands` values in [-clip, clip]
        (plus integer noise of std `noise_std` in units of the value) never wraps."""
        if not clip > 0:
            raise ValueError("clip must be positive")
        if max_summands < 1:
            raise ValueError("max_summands must be at least 1")
        half = (1 << (bits - 1)) - 1
        # Rounding can add up to one level per summand on top of the scaled values.
        scale = (half - max_summands) / (max_summands * clip + 10.0 * noise_std)
        if scale * clip < 1.0:
            raise ValueError(f"{bits} bits cannot hold the sum of {max_summands} values in [-{clip}, {clip}] "
                             "with any resolution; use more bits or fewer institutions per round")
        return cls(scale=scale, bits=bits)

    def scaled(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64) * self.scale

    def round(self, scaled: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
        """Unbiased stochastic rounding of already scaled values, as int64."""
        low = np.floor(scaled)
        return (low + (rng.random(scaled.shape) < (scaled - low))).astype(np.int64)

    def wrap(self, integers: np.ndarray) -> np.ndarray:
        """int64 -> uint32 in [0, 2^bits): two's complement mod 2^bits."""
        out = np.asarray(integers, dtype=np.int64).astype(np.uint32)  # wraps mod 2^32
        if self.bits < 32:
            out &= np.uint32((1 << self.bits) - 1)
        return out

    def encode(self, values: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
        """float values -> uint32 mod 2^bits, stochastically rounded (unbiased)."""
        return self.wrap(self.round(self.scaled(values), rng=rng))

    def signed(self, total: np.ndarray) -> np.ndarray:
        """A sum mod 2^bits, read as a signed integer in [-2^(bits-1), 2^(bits-1))."""
        t = np.asarray(total, dtype=np.int64)
        if self.bits < 32:
            t &= (1 << self.bits) - 1
        return np.where(t >= 1 << (self.bits - 1), t - (1 << self.bits), t)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """A sum mod 2^bits of encoded vectors -> the sum of their values (float64)."""
        return self.signed(total).astype(np.float64) / self.scale
