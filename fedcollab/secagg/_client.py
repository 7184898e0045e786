"""One institution's side of a SecAgg+ round: its keys, its Shamir shares, its masks,
and what it reveals to unmask the sum, checked against a coordinator that lies.

Per round the institution makes two X25519 key pairs (one to encrypt shares, one to
agree on pairwise mask seeds) and a 32-byte self-mask seed, splits the seed and the
mask private key into Shamir shares for itself and its neighbours, commits to every
share and to the seed, and signs all of it with its certificate's key. Its upload is

    y = x + PRG(self seed) + sum_{v after it} PRG(s_uv) - sum_{v before it} PRG(s_uv)  (mod 2^bits)

so pairwise masks cancel in the sum, and the coordinator needs t shares of each
survivor's self seed (never its mask key) to remove the self masks, and t shares of
each dropped institution's mask key (never its self seed) to remove the pairwise masks
its surviving neighbours added.

What the institution refuses, so that a lying coordinator learns no single update:
- a round whose threshold is not above half of its neighbourhood, whose graph is not
  the one the round id and the participants imply, or sparser than the study's size
  calls for (the coordinator could otherwise pick who holds the shares, or how few);
- a peer's keys not signed by that peer's federation certificate (key substitution);
- revealing anything before it holds t valid signatures, from the neighbourhood of
  every institution it reveals a share of, on the one survivor list it signed itself
  (Bell et al. 2020's consistency round: without it the coordinator could show some
  holders an institution as alive and others as dropped and collect both secrets);
- revealing twice, or both secrets of one institution.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fedcollab.secagg._advert import (
    MASK_PRIVATE_KEY,
    SELF_MASK_SEED,
    Advertisement,
    RoundShape,
    round_context,
    seed_commitment,
    share_commitment,
    survivors_bytes,
)
from fedcollab.secagg._graph import degree_for, neighbour_graph
from fedcollab.secagg._identity import PeerVerifier, SignatureProblem, SigningIdentity
from fedcollab.secagg._masks import apply_masks, pair_seed
from fedcollab.secagg._shamir import Share, split

_SHARE_BYTES = 70  # Share.to_bytes(): 4-byte x, 66-byte y
__all__ = ["MASK_PRIVATE_KEY", "SELF_MASK_SEED", "InstitutionSecAgg", "RoundSetup", "SecAggError", "pair_context",
           "raw_public", "round_context"]


class SecAggError(Exception):
    """A step of the protocol that this institution must not take; `reason` is UPPER_SNAKE."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class RoundSetup:
    """What the coordinator told this institution about the round, checked here."""

    name: str
    round_id: bytes
    participants: tuple[str, ...]  # sorted; Shamir x = position + 1
    neighbours: tuple[str, ...]
    threshold: int
    bits: int
    round_number: int = 0

    def __post_init__(self) -> None:
        if len(self.round_id) != 16:
            raise SecAggError("SECAGG_BAD_PARAMS", "round_id must be 16 bytes")
        if list(self.participants) != sorted(set(self.participants)) or self.name not in self.participants:
            raise SecAggError("SECAGG_BAD_PARAMS",
                              "participants must be sorted, distinct, and include this institution")
        if self.name in self.neighbours or not set(self.neighbours) <= set(self.participants):
            raise SecAggError("SECAGG_BAD_PARAMS", "neighbours must be other participants of the round")
        hood = len(self.neighbours) + 1
        if not 2 <= self.threshold <= hood:
            raise SecAggError("SECAGG_BAD_PARAMS", f"threshold {self.threshold} is outside 2..{hood}")
        if 2 * self.threshold <= hood:
            # With t <= half, two disjoint groups of t holders exist: one shown this
            # institution as alive, one as dropped, would hand over both its secrets.
            raise SecAggError("SECAGG_WEAK_THRESHOLD", f"threshold {self.threshold} is not above half of this "
                              f"institution's neighbourhood of {hood}; it needs at least {hood // 2 + 1}")
        n = len(self.participants)
        if len(self.neighbours) < degree_for(n, "auto"):
            raise SecAggError("SECAGG_WEAK_GRAPH", f"{len(self.neighbours)} neighbours in a round of {n}; a round "
                              f"of that size masks with at least {degree_for(n, 'auto')}")
        if not 2 <= self.bits <= 32:
            raise SecAggError("SECAGG_BAD_PARAMS", "bits must be in 2..32")

    def x_of(self, name: str) -> int:
        return self.participants.index(name) + 1

    @property
    def shape(self) -> RoundShape:
        return RoundShape(round_id=self.round_id, round_number=self.round_number, participants=self.participants,
                          threshold=self.threshold, degree=len(self.neighbours))


def pair_context(round_id: bytes, a: str, b: str) -> bytes:
    first, second = sorted((a, b))
    return round_context(round_id) + b"|" + first.encode() + b"|" + second.encode()


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _share_key(private_key: X25519PrivateKey, peer_public_key: bytes, round_id: bytes) -> AESGCM:
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"fedcollab/secagg/share/v1|" + round_context(round_id)).derive(shared)
    return AESGCM(key)


def _share_aad(round_id: bytes, owner: str, holder: str) -> bytes:
    return round_context(round_id) + b"|" + owner.encode() + b"->" + holder.encode()


class InstitutionSecAgg:
    """The protocol state of one institution in one round, driven stage by stage.

    With `identity` and `verifier` (an institution with a federation certificate) it
    signs what it sends and verifies what its peers sent; without both it runs the
    protocol unsigned, which protects against an honest-but-curious coordinator only
    (the caller says so loudly)."""

    def __init__(self, setup: RoundSetup, *, identity: SigningIdentity | None = None,
                 verifier: PeerVerifier | None = None) -> None:
        if (identity is None) != (verifier is None):
            raise ValueError("pass both identity and verifier (signed), or neither (unsigned)")
        self.setup = setup
        s = setup
        self.graph = neighbour_graph(s.participants, degree=len(s.neighbours), seed=s.round_id)
        if self.graph[s.name] != sorted(s.neighbours):
            raise SecAggError("SECAGG_WEAK_GRAPH", "these neighbours are not this institution's in the graph the "
                                                   "round id and participants imply; the coordinator chose them")
        self._identity, self._verifier = identity, verifier
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = secrets.token_bytes(32)
        holders = sorted({s.name, *s.neighbours})
        xs = [s.x_of(h) for h in holders]
        mask_key_bytes = self._mask_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self._dealt = {h: pair for h, pair in zip(holders, zip(split(self._self_seed, t=s.threshold, xs=xs),
                                                               split(mask_key_bytes, t=s.threshold, xs=xs),
                                                               strict=True), strict=True)}
        commitments = {h: (share_commitment(round_id=s.round_id, owner=s.name, kind=SELF_MASK_SEED, share=a),
                           share_commitment(round_id=s.round_id, owner=s.name, kind=MASK_PRIVATE_KEY, share=b))
                       for h, (a, b) in self._dealt.items()}
        unsigned = Advertisement(name=s.name, cipher_public_key=raw_public(self._cipher_key),
                                 mask_public_key=raw_public(self._mask_key),
                                 seed_commitment=seed_commitment(round_id=s.round_id, owner=s.name,
                                                                 seed=self._self_seed),
                                 share_commitments=commitments)
        if identity is not None:
            unsigned = replace(unsigned, certificate=identity.certificate_pem,
                               signature=identity.sign(unsigned.signed_bytes(s.shape)))
        self.advertisement = unsigned
        self._peers: dict[str, Advertisement] = {}  # itself included
        self._held: dict[str, tuple[Share, Share]] = {}  # owner -> (self-seed share, mask-key share)
        self._add: list[bytes] = []
        self._subtract: list[bytes] = []
        self._masking_ready = False
        self._signed: tuple[str, ...] | None = None
        self._revealed = False

    @property
    def signed(self) -> bool:
        return self._identity is not None

    @property
    def cipher_public_key(self) -> bytes:
        return self.advertisement.cipher_public_key

    @property
    def mask_public_key(self) -> bytes:
        return self.advertisement.mask_public_key

    def _verify(self, *, name: str, certificate: bytes, data: bytes, signature: bytes, what: str) -> None:
        assert self._verifier is not None
        try:
            self._verifier.check(name=name, certificate_pem=certificate, data=data, signature=signature, what=what)
        except SignatureProblem as e:
            raise SecAggError(e.reason, e.message) from None

    # ------------------------------------------------------------ SHARE_KEYS
    def make_shares(self, peers: Mapping[str, Advertisement]) -> list[tuple[str, bytes]]:
        """Shares of the self seed and the mask key for every neighbour that advertised
        keys (and itself, kept here), as (holder, ciphertext) pairs to send. Every
        peer's advertisement is verified first: one that fails ends this institution's
        part in the round before anything of it is encrypted to anyone."""
        s = self.setup
        unknown = set(peers) - set(s.neighbours) - {s.name}
        if unknown:
            raise SecAggError("SECAGG_NOT_A_NEIGHBOUR", f"keys of non-neighbours {sorted(unknown)[:5]} were offered")
        if peers.get(s.name) != self.advertisement:
            raise SecAggError("SECAGG_KEY_MISMATCH", "the coordinator relayed other keys for this institution")
        for name, ad in peers.items():
            if ad.name != name:
                raise SecAggError("SECAGG_KEY_MISMATCH", f"keys relayed as {name}'s are labelled {ad.name}'s")
            if len(ad.cipher_public_key) != 32 or len(ad.mask_public_key) != 32:
                raise SecAggError("SECAGG_BAD_KEY", f"{name}'s public keys are not 32-byte X25519 keys")
            if ad.cipher_public_key == ad.mask_public_key and name != s.name:
                raise SecAggError("SECAGG_BAD_KEY", f"{name} uses one key for both purposes")
            if name != s.name and self._verifier is not None:
                self._verify(name=name, certificate=ad.certificate, data=ad.signed_bytes(s.shape),
                             signature=ad.signature, what="keys")
            if s.name not in ad.share_commitments or len(ad.seed_commitment) != 32:
                raise SecAggError("SECAGG_BAD_KEY", f"{name} committed to no share for this institution")
        if len(peers) < s.threshold:
            raise SecAggError("SECAGG_TOO_FEW_NEIGHBOURS",
                              f"{len(peers)} of this institution's neighbourhood advertised keys, {s.threshold} needed")
        self._peers = dict(peers)
        out: list[tuple[str, bytes]] = []
        for holder in sorted(peers):
            seed_share, key_share = self._dealt[holder]
            if holder == s.name:
                self._held[s.name] = (seed_share, key_share)
                continue
            aead = _share_key(self._cipher_key, peers[holder].cipher_public_key, s.round_id)
            nonce = secrets.token_bytes(12)
            plaintext = seed_share.to_bytes() + key_share.to_bytes()
            out.append((holder, nonce + aead.encrypt(nonce, plaintext, _share_aad(s.round_id, s.name, holder))))
        return out

    # ------------------------------------------------------------ MASKED_INPUT
    def receive_shares(self, shares: Sequence[tuple[str, bytes]]) -> None:
        """Decrypts the shares neighbours sent this institution and checks each against
        its dealer's signed commitment; their senders are the neighbours it masks with
        (those that did not share have dropped out)."""
        s = self.setup
        if not self._peers:
            raise SecAggError("SECAGG_OUT_OF_ORDER", "shares arrived before this institution shared its own")
        for owner, ciphertext in shares:
            if owner == s.name or owner not in self._peers:
                raise SecAggError("SECAGG_NOT_A_NEIGHBOUR",
                                  f"a share from {owner!r}, which is not a neighbour with keys")
            if owner in self._held:
                raise SecAggError("SECAGG_DUPLICATE_SHARE", f"two shares from {owner}")
            if len(ciphertext) != 12 + 2 * _SHARE_BYTES + 16:
                raise SecAggError("SECAGG_BAD_SHARE", f"the share from {owner} has the wrong length")
            aead = _share_key(self._cipher_key, self._peers[owner].cipher_public_key, s.round_id)
            try:
                plaintext = aead.decrypt(ciphertext[:12], ciphertext[12:], _share_aad(s.round_id, owner, s.name))
            except InvalidTag:
                raise SecAggError("SECAGG_BAD_SHARE", f"the share from {owner} does not decrypt") from None
            seed_share, key_share = (Share.from_bytes(plaintext[:_SHARE_BYTES]),
                                     Share.from_bytes(plaintext[_SHARE_BYTES:]))
            if seed_share.x != s.x_of(s.name) or key_share.x != s.x_of(s.name):
                raise SecAggError("SECAGG_BAD_SHARE", f"the share from {owner} is for another holder")
            ad = self._peers[owner]
            for kind, share in ((SELF_MASK_SEED, seed_share), (MASK_PRIVATE_KEY, key_share)):
                if share_commitment(round_id=s.round_id, owner=owner, kind=kind, share=share) != \
                        ad.commitment(s.name, kind):
                    raise SecAggError("SECAGG_BAD_SHARE", f"{owner} dealt this institution a share it did not "
                                                          "commit to")
            self._held[owner] = (seed_share, key_share)
        maskers = [o for o in self._held if o != s.name]
        if len(maskers) + 1 < s.threshold:
            raise SecAggError("SECAGG_TOO_FEW_NEIGHBOURS", f"{len(maskers) + 1} of this institution's "
                                                           f"neighbourhood shared keys, {s.threshold} needed")
        me = s.x_of(s.name)
        self._add, self._subtract = [self._self_seed], []
        for v in maskers:
            seed = pair_seed(private_key=self._mask_key, peer_public_key=self._peers[v].mask_public_key,
                             context=pair_context(s.round_id, s.name, v))
            (self._add if me < s.x_of(v) else self._subtract).append(seed)
        self._masking_ready = True

    @property
    def maskers(self) -> list[str]:
        return sorted(o for o in self._held if o != self.setup.name)

    def mask(self, encoded: np.ndarray, *, start: int) -> np.ndarray:
        """Elements [start, start + len(encoded)) of the masked update (uint32 mod 2^bits)."""
        if not self._masking_ready:
            raise SecAggError("SECAGG_OUT_OF_ORDER", "masking needs the neighbours' shares first")
        return apply_masks(encoded, start=start, bits=self.setup.bits, add=self._add, subtract=self._subtract)

    # ------------------------------------------------------------ CONSISTENCY_CHECK
    def sign_survivors(self, survivors: Sequence[str]) -> tuple[bytes, bytes]:
        """(certificate, signature) on the round's survivor list; (b"", b"") unsigned.
        An institution signs one list per round, and only one that lists it."""
        s = self.setup
        listed = tuple(sorted(set(survivors)))
        if not self._masking_ready:
            raise SecAggError("SECAGG_OUT_OF_ORDER", "the survivor list comes after the masked input")
        if s.name not in listed or not set(listed) <= set(s.participants) or len(listed) != len(survivors):
            raise SecAggError("SECAGG_INCONSISTENT", "the survivor list must be distinct participants, this "
                                                     "institution among them")
        if self._signed is not None and self._signed != listed:
            raise SecAggError("SECAGG_ALREADY_SIGNED", "this institution already signed another survivor list")
        self._signed = listed
        if self._identity is None:
            return b"", b""
        return self._identity.certificate_pem, self._identity.sign(
            survivors_bytes(shape=s.shape, signer=s.name, survivors=listed))

    # ------------------------------------------------------------ UNMASK
    def reveal(self, *, survivors: Sequence[str],
               signatures: Mapping[str, tuple[bytes, bytes]]) -> list[tuple[str, str, bytes]]:
        """(owner, SELF_MASK_SEED | MASK_PRIVATE_KEY, share) to remove the masks: the
        self-seed share of each neighbour in `survivors` (the round's list, the one
        this institution signed) and the mask-key share of each neighbour that shared
        but is not in it. `signatures[name] = (certificate, signature)` on that list.
        Refused if asked twice, for another list than the one signed, if fewer than t
        of the neighbourhood survived, or (signed) without t valid signatures on the
        list from the neighbourhood of every institution a share is revealed of."""
        s = self.setup
        if self._revealed:
            raise SecAggError("SECAGG_ALREADY_REVEALED", "this institution already revealed its shares this round")
        listed = tuple(sorted(set(survivors)))
        if self._signed is None:
            raise SecAggError("SECAGG_OUT_OF_ORDER", "shares are revealed only after signing the survivor list")
        if listed != self._signed or len(listed) != len(survivors):
            raise SecAggError("SECAGG_INCONSISTENT", "the survivor list to unmask is not the one this institution "
                                                     "signed")
        hood = {s.name, *s.neighbours}
        surv = hood & set(listed)
        unknown = surv - set(self._held)
        if unknown:
            raise SecAggError("SECAGG_INCONSISTENT", f"no shares held for {sorted(unknown)[:5]}")
        drop = set(self._held) - surv
        if len(surv) < s.threshold:
            raise SecAggError("SECAGG_TOO_FEW_SURVIVORS",
                              f"{len(surv)} of this institution's neighbourhood survived, {s.threshold} needed")
        if self._verifier is not None:
            valid = set()
            for signer, (certificate, signature) in signatures.items():
                if signer not in listed:
                    continue
                try:
                    self._verify(name=signer, certificate=certificate, signature=signature, what="survivor list",
                                 data=survivors_bytes(shape=s.shape, signer=signer, survivors=listed))
                except SecAggError:
                    continue  # not counted: a signature on another list is the equivocation this stops
                valid.add(signer)
            for owner in sorted(self._held):
                signers = valid & {owner, *self.graph[owner]}
                if len(signers) < s.threshold:
                    raise SecAggError("SECAGG_TOO_FEW_SIGNATURES", f"{len(signers)} of {owner}'s neighbourhood "
                                      f"signed the survivor list, {s.threshold} needed before revealing its share")
        self._revealed = True
        out = [(o, SELF_MASK_SEED, self._held[o][0].to_bytes()) for o in sorted(surv)]
        out += [(o, MASK_PRIVATE_KEY, self._held[o][1].to_bytes()) for o in sorted(drop)]
        return out
