"""The coordinator's side of unmasking: from the revealed Shamir shares to the mask
seeds whose streams, added to or subtracted from the masked sum, leave the plain sum.

Survivors' self masks are subtracted (their seeds rebuilt from t shares each). For an
institution that shared keys but sent no update, its mask private key is rebuilt, and
the pairwise mask each surviving neighbour added or subtracted for it is taken back
out.

Every revealed share is checked against the commitment its dealer signed when it
advertised its keys, so a holder that reveals a crafted share is named and its share
left out (the secret is rebuilt from the good ones when t remain); and every rebuilt
secret is checked against the dealer's commitment (the seed's hash, the mask key's
public key), so a dealer whose shares do not lie on one polynomial is named too. A
wrong share can therefore never shift a seed silently.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcollab.secagg._advert import MASK_PRIVATE_KEY, SELF_MASK_SEED, Advertisement, seed_commitment, share_commitment
from fedcollab.secagg._client import SecAggError, pair_context, raw_public
from fedcollab.secagg._masks import pair_seed
from fedcollab.secagg._shamir import Share, combine


@dataclass
class Removal:
    add: list[bytes] = field(default_factory=list)
    subtract: list[bytes] = field(default_factory=list)
    # holder -> why: holders whose revealed share did not match its dealer's commitment
    bad_shares: dict[str, str] = field(default_factory=dict)


def removal_seeds(
    *,
    round_id: bytes,
    participants: Sequence[str],
    graph: Mapping[str, Sequence[str]],
    adverts: Mapping[str, Advertisement],
    survivors: Collection[str],
    dropped: Collection[str],
    revealed: Mapping[tuple[str, str], Sequence[tuple[str, Share]]],
    threshold: int,
) -> Removal:
    """The seeds whose mask streams remove every mask from the sum of the survivors'
    uploads. `revealed[(owner, kind)]` holds the (holder, share) pairs received for it.
    SecAggError (SECAGG_UNMASK_FAILED) names who is at fault when it cannot."""
    index = {name: i for i, name in enumerate(participants)}
    out = Removal()
    for u in sorted(survivors):
        out.subtract.append(_rebuild(round_id, participants, adverts, revealed, u, SELF_MASK_SEED, threshold,
                                     out.bad_shares))
    survived = set(survivors)
    for v in sorted(dropped):
        key = X25519PrivateKey.from_private_bytes(
            _rebuild(round_id, participants, adverts, revealed, v, MASK_PRIVATE_KEY, threshold, out.bad_shares))
        for u in graph[v]:
            if u not in survived:
                continue
            seed = pair_seed(private_key=key, peer_public_key=adverts[u].mask_public_key,
                             context=pair_context(round_id, u, v))
            # u added this stream if it comes first, else subtracted it: undo that.
            (out.subtract if index[u] < index[v] else out.add).append(seed)
    return out


def _rebuild(round_id: bytes, participants: Sequence[str], adverts: Mapping[str, Advertisement],
             revealed: Mapping[tuple[str, str], Sequence[tuple[str, Share]]], owner: str, kind: str, threshold: int,
             bad: dict[str, str]) -> bytes:
    what = f"{owner}'s {kind.replace('_', ' ')}"
    ad = adverts[owner]
    good: list[Share] = []
    for holder, share in revealed.get((owner, kind), ()):
        committed = ad.commitment(holder, kind)
        if share.x != participants.index(holder) + 1 or committed is None or \
                share_commitment(round_id=round_id, owner=owner, kind=kind, share=share) != committed:
            bad[holder] = f"its share of {what} does not match the commitment {owner} signed"
            continue
        good.append(share)
    if len({s.x for s in good}) < threshold:
        culprits = sorted(h for h, why in bad.items() if what in why)
        raise SecAggError("SECAGG_UNMASK_FAILED", f"{len(good)} good shares of {what} arrived, {threshold} needed"
                          + (f"; wrong shares came from {', '.join(culprits)}" if culprits else ""))
    try:
        secret = combine(good, t=threshold)
    except ValueError:
        secret = b""
    if kind == SELF_MASK_SEED:
        ok = secret != b"" and seed_commitment(round_id=round_id, owner=owner, seed=secret) == ad.seed_commitment
    else:
        ok = secret != b"" and raw_public(X25519PrivateKey.from_private_bytes(secret)) == ad.mask_public_key
    if not ok:
        # Every share matched what the dealer committed to, so the dealer dealt them inconsistently.
        raise SecAggError("SECAGG_UNMASK_FAILED", f"the committed shares of {what} rebuild another secret than "
                          f"{owner} committed to: {owner} dealt inconsistent shares")
    return secret
