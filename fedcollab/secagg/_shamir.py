"""Shamir secret sharing of 32-byte secrets (mask seeds and X25519 private keys), so
the coordinator can remove the masks of institutions that drop out after masking
once t of the survivors send it their shares, and learns nothing from fewer than t.

Arithmetic is in GF(2^521 - 1) (a Mersenne prime larger than any 32-byte secret);
coefficients come from `secrets`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

PRIME = 2**521 - 1
_SECRET_BYTES = 32
_SHARE_BYTES = 66  # 521 bits


@dataclass(frozen=True)
class Share:
    x: int  # 1..n: the holder's index, never 0 (the secret sits at x = 0)
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(4, "big") + self.y.to_bytes(_SHARE_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != 4 + _SHARE_BYTES:
            raise ValueError(f"a share is {4 + _SHARE_BYTES} bytes, got {len(data)}")
        x, y = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big")
        if not 0 < x < PRIME or not 0 <= y < PRIME:
            raise ValueError("share out of the field")
        return cls(x, y)


def split(secret: bytes, *, t: int, n: int | None = None, xs: Sequence[int] | None = None) -> list[Share]:
    """Shares at x = 1..n (or at the given distinct, nonzero `xs`), any t of which give
    back `secret`."""
    if len(secret) != _SECRET_BYTES:
        raise ValueError(f"secrets are {_SECRET_BYTES} bytes")
    points = list(xs) if xs is not None else list(range(1, (n or 0) + 1))
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ValueError("share points must be distinct and nonzero")
    if not 1 <= t <= len(points):
        raise ValueError(f"need 1 <= t <= n, got t={t}, n={len(points)}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in points:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def combine(shares: Sequence[Share], *, t: int) -> bytes:
    """The secret from at least t shares with distinct x (Lagrange at 0). With fewer
    than t it raises: a wrong secret would silently corrupt the unmasking."""
    distinct = {s.x: s for s in shares}
    if len(distinct) < t:
        raise ValueError(f"{len(distinct)} distinct shares, {t} needed")
    chosen = list(distinct.values())[:t]
    secret = 0
    for i, si in enumerate(chosen):
        num, den = 1, 1
        for j, sj in enumerate(chosen):
            if i != j:
                num = num * (-sj.x) % PRIME
                den = den * (si.x - sj.x) % PRIME
        secret = (secret + si.y * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * _SECRET_BYTES):
        # Garbled shares land on a random field element, almost never below 2^256.
        # Deliberately altered shares need authentication (signatures), not this check.
        raise ValueError("shares do not reconstruct a 32-byte secret (inconsistent or tampered shares)")
    return secret.to_bytes(_SECRET_BYTES, "big")
