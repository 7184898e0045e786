"""Secure-aggregation primitives: masks that cancel, chunk-addressable streams,
uniform-looking masked values, and Shamir sharing with threshold t."""

from __future__ import annotations

import itertools
import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedcollab.secagg import Share, apply_masks, combine, mask, pair_seed, split


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_both_ends_of_a_pair_derive_the_same_seed_bound_to_its_context() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ab = pair_seed(private_key=a, peer_public_key=_public(b), context=b"study|r1|a|b")
    ba = pair_seed(private_key=b, peer_public_key=_public(a), context=b"study|r1|a|b")
    assert ab == ba and len(ab) == 32
    assert ab != pair_seed(private_key=a, peer_public_key=_public(b), context=b"study|r2|a|b")


@pytest.mark.parametrize("bits", [16, 20, 32])
def test_the_mask_stream_is_the_same_however_it_is_chunked(bits: int) -> None:
    seed = secrets.token_bytes(32)
    whole = mask(seed, start=0, count=10_001, bits=bits)
    pieces = [mask(seed, start=s, count=min(777, 10_001 - s), bits=bits) for s in range(0, 10_001, 777)]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    assert whole.max() < 2**bits
    np.testing.assert_array_equal(mask(seed, start=5, count=3, bits=bits), whole[5:8])  # odd offsets too


def test_pairwise_masks_cancel_in_the_sum_of_all_institutions() -> None:
    bits, n, size = 24, 5, 4_096
    rng = np.random.default_rng(0)
    values = [rng.integers(0, 2**10, size, dtype=np.uint64) for _ in range(n)]
    seeds = {(i, j): secrets.token_bytes(32) for i, j in itertools.combinations(range(n), 2)}
    masked = []
    for i in range(n):
        add = [seeds[(i, j)] for j in range(i + 1, n)]
        subtract = [seeds[(j, i)] for j in range(i)]
        masked.append(apply_masks(values[i], start=0, bits=bits, add=add, subtract=subtract))
    total = np.zeros(size, dtype=np.uint64)
    for m in masked:
        total = (total + m) % np.uint64(2**bits)
    np.testing.assert_array_equal(total, sum(values) % np.uint64(2**bits))


def test_one_masked_upload_is_indistinguishable_from_uniform() -> None:
    """Chi-square over 256 bins of a masked all-zero update: a mask that leaked
    structure (or a biased reduction) would fail this by far."""
    bits, size = 16, 1 << 18
    masked = apply_masks(np.zeros(size, dtype=np.uint64), start=0, bits=bits,
                         add=[secrets.token_bytes(32)], subtract=[secrets.token_bytes(32)])
    counts = np.bincount((masked >> np.uint64(bits - 8)).astype(np.int64), minlength=256)
    expected = size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 340, chi2  # 255 degrees of freedom: p < 3e-4 above 340


def test_any_t_shares_give_the_secret_back_and_fewer_refuse() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, n=7, t=4)
    for subset in itertools.combinations(shares, 4):
        assert combine(list(subset), t=4) == secret
    with pytest.raises(ValueError, match="3 distinct shares, 4 needed"):
        combine(shares[:3], t=4)
    assert combine([Share.from_bytes(s.to_bytes()) for s in shares[2:6]], t=4) == secret


def test_a_corrupted_share_does_not_pass_as_a_secret() -> None:
    """A share garbled in storage or transit reconstructs a field element far above
    2^256 (all but certainly); deliberate tampering is for signatures to catch."""
    shares = split(secrets.token_bytes(32), n=5, t=3)
    bad = [shares[0], shares[1], Share(shares[2].x, secrets.randbelow(2**521 - 1))]
    with pytest.raises(ValueError, match="inconsistent or tampered"):
        combine(bad, t=3)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        split(b"short", n=3, t=2)
    with pytest.raises(ValueError):
        split(secrets.token_bytes(32), n=3, t=4)
    with pytest.raises(ValueError):
        mask(b"x" * 31, start=0, count=1, bits=16)
    with pytest.raises(ValueError):
        mask(secrets.token_bytes(32), start=0, count=1, bits=33)


def test_the_unmasked_sum_equals_the_plain_sum_within_the_quantization_error() -> None:
    from fedcollab.secagg import Quantizer

    n, size, bits = 8, 20_000, 24
    q = Quantizer.for_range(clip=1.0, bits=bits, max_summands=n)
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 0.3, size) for _ in range(n)]
    seeds = {(i, j): secrets.token_bytes(32) for i, j in itertools.combinations(range(n), 2)}
    total = np.zeros(size, dtype=np.uint32)
    for i in range(n):
        encoded = q.encode(np.clip(updates[i], -1, 1), rng=rng)
        masked = apply_masks(encoded, start=0, bits=bits, add=[seeds[(i, j)] for j in range(i + 1, n)],
                             subtract=[seeds[(j, i)] for j in range(i)])
        total = (total + masked) & np.uint32(2**bits - 1)
    decoded = q.decode(total)
    plain = np.clip(np.stack(updates), -1, 1).sum(axis=0)
    assert np.abs(decoded - plain).max() <= n / q.scale  # at most one level per summand
    assert abs(float((decoded - plain).mean())) < 0.05 / q.scale * n  # stochastic rounding is unbiased


def test_a_quantizer_without_room_for_the_sum_is_refused() -> None:
    from fedcollab.secagg import Quantizer

    with pytest.raises(ValueError, match="cannot hold the sum of 1024"):
        Quantizer.for_range(clip=1.0, bits=10, max_summands=1024)
    q = Quantizer.for_range(clip=1.0, bits=16, max_summands=4)
    # The sum wraps mod 2^bits like the masks, and reads back signed.
    total = q.wrap(np.array([-3, 5], dtype=np.int64) * 4)
    np.testing.assert_array_equal(q.signed(total), [-12, 20])
