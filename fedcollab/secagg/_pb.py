"""Advertisements to and from their protobuf messages (PeerKeys)."""

from __future__ import annotations

from fedcollab.secagg._advert import Advertisement
from fedcollab.v1 import coordinator_service_pb2 as pb


def advert_to_pb(ad: Advertisement) -> pb.PeerKeys:
    return pb.PeerKeys(
        institution=ad.name, cipher_public_key=ad.cipher_public_key, mask_public_key=ad.mask_public_key,
        seed_commitment=ad.seed_commitment, certificate=ad.certificate, signature=ad.signature,
        share_commitments=[pb.ShareCommitment(holder=h, self_mask_seed=s, mask_private_key=k)
                           for h, (s, k) in sorted(ad.share_commitments.items())])


def advert_from_pb(keys: pb.PeerKeys, *, name: str | None = None) -> Advertisement:
    """`name` overrides keys.institution (the coordinator fills it from the session)."""
    return Advertisement(
        name=keys.institution if name is None else name, cipher_public_key=bytes(keys.cipher_public_key),
        mask_public_key=bytes(keys.mask_public_key), seed_commitment=bytes(keys.seed_commitment),
        share_commitments={c.holder: (bytes(c.self_mask_seed), bytes(c.mask_private_key))
                           for c in keys.share_commitments},
        certificate=bytes(keys.certificate), signature=bytes(keys.signature))
