"""What an institution advertises for a round, bound by its signature: its two public
keys, a commitment to its self-mask seed, and a commitment to every Shamir share it
deals, and what survivors sign in the consistency round.

Commitments, and why hashes suffice (not Feldman): the shares are dealt when the keys
are advertised, at fixed points (the holders' x), so the dealer can commit to each
share with SHA-256 and sign the lot. A holder checks the share it decrypts against the
dealer's signed commitment (a dealer cannot hand it a share it did not commit to), and
the coordinator checks every revealed share against it (a holder cannot reveal a share
other than the one it got, and if it tries it is named). A share is a uniform element
of GF(2^521 - 1) even given the t - 1 others anyone could see, so its hash hides it as
well as SHA-256 preimage resistance goes; the seed (256 random bits) likewise. A
dealer whose committed shares do not lie on one polynomial is caught by the seed
commitment (or, for the mask key, by its public key) after reconstruction, and named.
Feldman VSS would also prove consistency at dealing time, but it needs a prime-order
group over the 521-bit share field; hashes need nothing new and cost one SHA-256 per
share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedcollab.secagg._identity import digest, encode_fields, names_digest
from fedcollab.secagg._shamir import Share

SELF_MASK_SEED = "self_mask_seed"
MASK_PRIVATE_KEY = "mask_private_key"
_VERSION = b"fedcollab/secagg/v2"


def round_context(round_id: bytes) -> bytes:
    return b"fedcollab/secagg/v1|" + round_id


def seed_commitment(*, round_id: bytes, owner: str, seed: bytes) -> bytes:
    return digest(_VERSION, b"seed", round_id, owner, seed)


def share_commitment(*, round_id: bytes, owner: str, kind: str, share: Share) -> bytes:
    return digest(_VERSION, b"share", round_id, owner, kind, share.to_bytes())


@dataclass(frozen=True)
class RoundShape:
    """What every signature of a round is bound to: a signature made for one round,
    or for a round shown with other participants or another threshold, fails in any
    other."""

    round_id: bytes
    round_number: int
    participants: tuple[str, ...]
    threshold: int
    degree: int

    def encode(self) -> bytes:
        return encode_fields(self.round_id, self.round_number, names_digest(self.participants), self.threshold,
                             self.degree)


@dataclass(frozen=True)
class Advertisement:
    """One institution's signed keys for one round."""

    name: str
    cipher_public_key: bytes
    mask_public_key: bytes
    seed_commitment: bytes
    # holder -> (commitment to its self-seed share, commitment to its mask-key share)
    share_commitments: Mapping[str, tuple[bytes, bytes]]
    certificate: bytes = b""
    signature: bytes = b""

    def signed_bytes(self, shape: RoundShape) -> bytes:
        parts: list[bytes | str | int] = [_VERSION, b"keys", shape.encode(), self.name, self.cipher_public_key,
                                          self.mask_public_key, self.seed_commitment]
        for holder in sorted(self.share_commitments):
            seed_c, key_c = self.share_commitments[holder]
            parts += [holder, seed_c, key_c]
        return encode_fields(*parts)

    def commitment(self, holder: str, kind: str) -> bytes | None:
        pair = self.share_commitments.get(holder)
        if pair is None:
            return None
        return pair[0] if kind == SELF_MASK_SEED else pair[1]


def survivors_bytes(*, shape: RoundShape, signer: str, survivors: Sequence[str]) -> bytes:
    """What a survivor signs in the consistency round: the list it was shown."""
    return encode_fields(_VERSION, b"survivors", shape.encode(), signer, names_digest(sorted(survivors)))
