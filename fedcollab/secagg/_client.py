"""One institution's side of a SecAgg+ round: its keys, its Shamir shares, its masks,
and what it reveals to unmask the sum.

Per round the institution makes two X25519 key pairs (one to encrypt shares, one to
agree on pairwise mask seeds) and a 32-byte self-mask seed. It splits the seed and the
mask private key into Shamir shares for itself and its neighbours, encrypted so that
only each holder can read its own. Its upload is

    y = x + PRG(self seed) + sum_{v after it} PRG(s_uv) - sum_{v before it} PRG(s_uv)  (mod 2^bits)

so pairwise masks cancel in the sum, and the coordinator needs t shares of each
survivor's self seed (never its mask key) to remove the self masks, and t shares of
each dropped institution's mask key (never its self seed) to remove the pairwise masks
its surviving neighbours added. A holder reveals at most one of the two secrets of any
institution, once per round, and only if at least t of its neighbourhood survived.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fedcollab.secagg._masks import apply_masks, pair_seed
from fedcollab.secagg._shamir import Share, split

SELF_MASK_SEED = "self_mask_seed"
MASK_PRIVATE_KEY = "mask_private_key"
_SHARE_BYTES = 70  # Share.to_bytes(): 4-byte x, 66-byte y


class SecAggError(Exception):
    """A step of the protocol that this institution must not take; `reason` is UPPER_SNAKE."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class RoundSetup:
    """What the coordinator told this institution about the round."""

    name: str
    round_id: bytes
    participants: tuple[str, ...]  # sorted; Shamir x = position + 1
    neighbours: tuple[str, ...]
    threshold: int
    bits: int

    def __post_init__(self) -> None:
        if len(self.round_id) != 16:
            raise SecAggError("SECAGG_BAD_PARAMS", "round_id must be 16 bytes")
        if list(self.participants) != sorted(set(self.participants)) or self.name not in self.participants:
            raise SecAggError("SECAGG_BAD_PARAMS",
                              "participants must be sorted, distinct, and include this institution")
        if self.name in self.neighbours or not set(self.neighbours) <= set(self.participants):
            raise SecAggError("SECAGG_BAD_PARAMS", "neighbours must be other participants of the round")
        if not 2 <= self.threshold <= len(self.neighbours) + 1:
            raise SecAggError("SECAGG_BAD_PARAMS",
                              f"threshold {self.threshold} is outside 2..{len(self.neighbours) + 1}")
        if not 2 <= self.bits <= 32:
            raise SecAggError("SECAGG_BAD_PARAMS", "bits must be in 2..32")

    def x_of(self, name: str) -> int:
        return self.participants.index(name) + 1


def round_context(round_id: bytes) -> bytes:
    return b"fedcollab/secagg/v1|" + round_id


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
    """The protocol state of one institution in one round, driven stage by stage."""

    def __init__(self, setup: RoundSetup) -> None:
        self.setup = setup
        self._cipher_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = secrets.token_bytes(32)
        self._peers: dict[str, tuple[bytes, bytes]] = {}  # name -> (cipher pk, mask pk), itself included
        self._held: dict[str, tuple[Share, Share]] = {}  # owner -> (self-seed share, mask-key share)
        self._add: list[bytes] = []
        self._subtract: list[bytes] = []
        self._masking_ready = False
        self._revealed = False

    @property
    def cipher_public_key(self) -> bytes:
        return raw_public(self._cipher_key)

    @property
    def mask_public_key(self) -> bytes:
        return raw_public(self._mask_key)

    # ------------------------------------------------------------ SHARE_KEYS
    def make_shares(self, peers: Mapping[str, tuple[bytes, bytes]]) -> list[tuple[str, bytes]]:
        """Shares of the self seed and the mask key for every neighbour that advertised
        keys (and itself, kept here), as (holder, ciphertext) pairs to send."""
        s = self.setup
        unknown = set(peers) - set(s.neighbours) - {s.name}
        if unknown:
            raise SecAggError("SECAGG_NOT_A_NEIGHBOUR", f"keys of non-neighbours {sorted(unknown)[:5]} were offered")
        mine = peers.get(s.name)
        if mine != (self.cipher_public_key, self.mask_public_key):
            raise SecAggError("SECAGG_KEY_MISMATCH", "the coordinator relayed other keys for this institution")
        for name, (cpk, mpk) in peers.items():
            if len(cpk) != 32 or len(mpk) != 32:
                raise SecAggError("SECAGG_BAD_KEY", f"{name}'s public keys are not 32-byte X25519 keys")
            if cpk == mpk and name != s.name:
                raise SecAggError("SECAGG_BAD_KEY", f"{name} uses one key for both purposes")
        if len(peers) < s.threshold:
            raise SecAggError("SECAGG_TOO_FEW_NEIGHBOURS",
                              f"{len(peers)} of this institution's neighbourhood advertised keys, {s.threshold} needed")
        self._peers = dict(peers)
        holders = sorted(peers)
        xs = [s.x_of(h) for h in holders]
        mask_key_bytes = self._mask_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        seed_shares = split(self._self_seed, t=s.threshold, xs=xs)
        key_shares = split(mask_key_bytes, t=s.threshold, xs=xs)
        out: list[tuple[str, bytes]] = []
        for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True):
            if holder == s.name:
                self._held[s.name] = (seed_share, key_share)
                continue
            aead = _share_key(self._cipher_key, peers[holder][0], s.round_id)
            nonce = secrets.token_bytes(12)
            plaintext = seed_share.to_bytes() + key_share.to_bytes()
            out.append((holder, nonce + aead.encrypt(nonce, plaintext, _share_aad(s.round_id, s.name, holder))))
        return out

    # ------------------------------------------------------------ MASKED_INPUT
    def receive_shares(self, shares: Sequence[tuple[str, bytes]]) -> None:
        """Decrypts the shares neighbours sent this institution; their senders are the
        neighbours it masks with (those that did not share have dropped out)."""
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
            aead = _share_key(self._cipher_key, self._peers[owner][0], s.round_id)
            try:
                plaintext = aead.decrypt(ciphertext[:12], ciphertext[12:], _share_aad(s.round_id, owner, s.name))
            except InvalidTag:
                raise SecAggError("SECAGG_BAD_SHARE", f"the share from {owner} does not decrypt") from None
            seed_share, key_share = (Share.from_bytes(plaintext[:_SHARE_BYTES]),
                                     Share.from_bytes(plaintext[_SHARE_BYTES:]))
            if seed_share.x != s.x_of(s.name) or key_share.x != s.x_of(s.name):
                raise SecAggError("SECAGG_BAD_SHARE", f"the share from {owner} is for another holder")
            self._held[owner] = (seed_share, key_share)
        maskers = [o for o in self._held if o != s.name]
        if len(maskers) + 1 < s.threshold:
            raise SecAggError("SECAGG_TOO_FEW_NEIGHBOURS", f"{len(maskers) + 1} of this institution's "
                                                           f"neighbourhood shared keys, {s.threshold} needed")
        me = s.x_of(s.name)
        self._add, self._subtract = [self._self_seed], []
        for v in maskers:
            seed = pair_seed(private_key=self._mask_key, peer_public_key=self._peers[v][1],
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

    # ------------------------------------------------------------ UNMASK
    def reveal(self, *, survivors: Sequence[str], dropped: Sequence[str]) -> list[tuple[str, str, bytes]]:
        """(owner, SELF_MASK_SEED | MASK_PRIVATE_KEY, share) to remove the masks: the
        self-seed share of each survivor and the mask-key share of each dropped
        neighbour. Refused if asked twice, if an institution is both, or if fewer than
        t of the neighbourhood survived (the sum would then be of too few updates)."""
        s = self.setup
        if self._revealed:
            raise SecAggError("SECAGG_ALREADY_REVEALED", "this institution already revealed its shares this round")
        surv, drop = set(survivors), set(dropped)
        if surv & drop:
            raise SecAggError("SECAGG_INCONSISTENT", f"{sorted(surv & drop)[:5]} are listed as survived and dropped")
        if s.name not in surv:
            raise SecAggError("SECAGG_INCONSISTENT", "this institution uploaded but is not listed as a survivor")
        unknown = (surv | drop) - set(self._held)
        if unknown:
            raise SecAggError("SECAGG_INCONSISTENT", f"no shares held for {sorted(unknown)[:5]}")
        missing = set(self._held) - surv - drop
        if missing:
            raise SecAggError("SECAGG_INCONSISTENT",
                              f"{sorted(missing)[:5]} shared keys but are listed neither as survived nor dropped")
        if len(surv) < s.threshold:
            raise SecAggError("SECAGG_TOO_FEW_SURVIVORS",
                              f"{len(surv)} of this institution's neighbourhood survived, {s.threshold} needed")
        self._revealed = True
        out = [(o, SELF_MASK_SEED, self._held[o][0].to_bytes()) for o in sorted(surv)]
        out += [(o, MASK_PRIVATE_KEY, self._held[o][1].to_bytes()) for o in sorted(drop)]
        return out
