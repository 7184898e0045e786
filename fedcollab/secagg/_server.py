"""The coordinator's side of unmasking: from the revealed Shamir shares to the mask
seeds whose streams, added to or subtracted from the masked sum, leave the plain sum.

Survivors' self masks are subtracted (their seeds rebuilt from t shares each). For an
institution that shared keys but sent no update, its mask private key is rebuilt, and
the pairwise mask each surviving neighbour added or subtracted for it is taken back
out. A rebuilt mask key must match the public key it advertised, so wrong shares are
caught before they corrupt the sum.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcollab.secagg._client import MASK_PRIVATE_KEY, SELF_MASK_SEED, SecAggError, pair_context, raw_public
from fedcollab.secagg._masks import pair_seed
from fedcollab.secagg._shamir import Share, combine


def removal_seeds(
    *,
    round_id: bytes,
    participants: Sequence[str],
    graph: Mapping[str, Sequence[str]],
    mask_keys: Mapping[str, bytes],
    survivors: Collection[str],
    dropped: Collection[str],
    revealed: Mapping[tuple[str, str], Sequence[Share]],
    threshold: int,
) -> tuple[list[bytes], list[bytes]]:
    """(add, subtract): seeds whose mask streams remove every mask from the sum of the
    survivors' uploads. `revealed[(owner, kind)]` holds the shares received for it."""
    index = {name: i for i, name in enumerate(participants)}
    add: list[bytes] = []
    subtract: list[bytes] = []
    for u in sorted(survivors):
        subtract.append(_rebuild(revealed, u, SELF_MASK_SEED, threshold))
    survived = set(survivors)
    for v in sorted(dropped):
        key_bytes = _rebuild(revealed, v, MASK_PRIVATE_KEY, threshold)
        key = X25519PrivateKey.from_private_bytes(key_bytes)
        if raw_public(key) != mask_keys[v]:
            raise SecAggError("SECAGG_UNMASK_FAILED", f"the shares of {v}'s mask key rebuild another key than it "
                                                      "advertised (a holder sent a wrong share)")
        for u in graph[v]:
            if u not in survived:
                continue
            seed = pair_seed(private_key=key, peer_public_key=mask_keys[u], context=pair_context(round_id, u, v))
            # u added this stream if it comes first, else subtracted it: undo that.
            (subtract if index[u] < index[v] else add).append(seed)
    return add, subtract


def _rebuild(revealed: Mapping[tuple[str, str], Sequence[Share]], owner: str, kind: str, threshold: int) -> bytes:
    shares = revealed.get((owner, kind), ())
    if len({s.x for s in shares}) < threshold:
        raise SecAggError("SECAGG_UNMASK_FAILED",
                          f"{len(shares)} shares of {owner}'s {kind.replace('_', ' ')} arrived, {threshold} needed")
    try:
        return combine(shares, t=threshold)
    except ValueError as e:
        raise SecAggError("SECAGG_UNMASK_FAILED", f"{owner}'s {kind.replace('_', ' ')}: {e}") from None
