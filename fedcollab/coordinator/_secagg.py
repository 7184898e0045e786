"""The coordinator's bookkeeping of one secure-aggregation round: stages, who is still
in, what each institution submitted, and what each one is handed when it polls.

Stages: ADVERTISE_KEYS, SHARE_KEYS, MASKED_INPUT, CONSISTENCY_CHECK (the survivors
sign the list of survivors), UNMASK, DONE. Every submission is checked against the
stage and the sender's place in the graph before it is stored (keys must carry a
seed commitment and one share commitment per holder; a signature, when there is one,
must be the sender's, against the federation CA under TLS), so one misbehaving
institution is refused (and eventually timed out of the round) without touching
anyone else's part. The institutions check what they are handed themselves
(fedcollab/secagg/_client.py): this bookkeeping is not trusted by them. The engine holds its lock
around every call; nothing here blocks or computes masks.
"""

from __future__ import annotations

import grpc

from fedcollab.config import SecureAggregationConfig
from fedcollab.errors import Rejected
from fedcollab.secagg import (
    MASK_PRIVATE_KEY,
    SELF_MASK_SEED,
    Advertisement,
    PeerVerifier,
    Removal,
    RoundShape,
    SecAggError,
    Share,
    SignatureProblem,
    degree_for,
    neighbour_graph,
    removal_seeds,
    survivors_bytes,
    threshold_for,
)
from fedcollab.secagg._identity import signed_by_sender
from fedcollab.secagg._pb import advert_from_pb, advert_to_pb
from fedcollab.v1 import coordinator_service_pb2 as pb

ADVERTISE = pb.SEC_AGG_STAGE_ADVERTISE_KEYS
SHARE = pb.SEC_AGG_STAGE_SHARE_KEYS
MASKED = pb.SEC_AGG_STAGE_MASKED_INPUT
CONSISTENCY = pb.SEC_AGG_STAGE_CONSISTENCY_CHECK
UNMASK = pb.SEC_AGG_STAGE_UNMASK
DONE = pb.SEC_AGG_STAGE_DONE
# The stages in the order they run (CONSISTENCY_CHECK was added to the enum last).
ORDER: dict[int, int] = {ADVERTISE: 0, SHARE: 1, MASKED: 2, CONSISTENCY: 3, UNMASK: 4, DONE: 5}
_CIPHERTEXT_BYTES = 12 + 2 * 70 + 16  # nonce, two shares, GCM tag
_MAX_CERTIFICATE_BYTES = 16 * 1024
_KIND = {pb.SECRET_KIND_SELF_MASK_SEED: SELF_MASK_SEED, pb.SECRET_KIND_MASK_PRIVATE_KEY: MASK_PRIVATE_KEY}


def _refuse(reason: str, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> Rejected:
    return Rejected(code=code, reason=reason, message=message)


class SecAggRound:
    def __init__(self, *, names: list[str], config: SecureAggregationConfig, round_id: bytes,
                 params: pb.SecAggParams, round_number: int = 0, verifier: PeerVerifier | None = None) -> None:
        self.participants = sorted(names)
        self.round_id = round_id
        self.round_number = round_number
        self.degree = degree_for(len(self.participants), config.neighbours)
        self.graph = neighbour_graph(self.participants, degree=self.degree, seed=round_id)
        self.threshold = threshold_for(self.degree + 1, config.reconstruction_threshold)
        self.shape = RoundShape(round_id=round_id, round_number=round_number, participants=tuple(self.participants),
                                threshold=self.threshold, degree=self.degree)
        self._params = params
        self._verifier = verifier
        self.stage = ADVERTISE
        self.stage_deadline = float("inf")
        self.keys: dict[str, pb.PeerKeys] = {}
        self.adverts: dict[str, Advertisement] = {}
        self.shares: dict[str, list[pb.EncryptedShare]] = {}
        self.u1: set[str] = set()
        self.u2: set[str] = set()
        self.u3: set[str] = set()
        self.signatures: dict[str, pb.SurvivorSignature] = {}
        self.revealed: dict[tuple[str, str], list[tuple[str, Share]]] = {}
        self.revealers: set[str] = set()
        self.bad_shares: dict[str, str] = {}
        self.failure = ""

    def hood(self, name: str) -> set[str]:
        return {name, *self.graph[name]}

    def params_for(self, name: str) -> pb.SecAggParams:
        p = pb.SecAggParams()
        p.CopyFrom(self._params)
        p.round_id = self.round_id
        p.participants[:] = self.participants
        p.neighbours[:] = self.graph[name]
        p.threshold = self.threshold
        p.round = self.round_number
        return p

    def _signed(self, *, name: str, certificate: bytes, signature: bytes, data: bytes, what: str) -> None:
        """A signature, when there is one, must be the sender's (unsigned submissions
        come from institutions without a certificate; signed peers refuse them)."""
        if not certificate and not signature:
            return
        if len(certificate) > _MAX_CERTIFICATE_BYTES or not certificate or not signature:
            raise _refuse("SECAGG_BAD_SIGNATURE", f"send the {what}'s certificate (PEM, at most "
                          f"{_MAX_CERTIFICATE_BYTES} bytes) and signature together, or neither")
        if self._verifier is not None:
            try:
                self._verifier.check(name=name, certificate_pem=certificate, data=data, signature=signature, what=what)
            except SignatureProblem as e:
                raise _refuse(e.reason, e.message) from None
        elif not signed_by_sender(name=name, certificate_pem=certificate, data=data, signature=signature):
            raise _refuse("SECAGG_BAD_SIGNATURE", f"the {what}'s signature is not {name}'s: sign with the key of "
                          "this institution's own certificate")

    # ------------------------------------------------------------ submissions
    def _expect(self, stage: int, name: str, members: set[str] | None) -> None:
        if self.stage != stage:
            raise _refuse("SECAGG_WRONG_STAGE", f"the round is at stage {pb.SecAggStage.Name(self.stage)}, not "
                          f"{pb.SecAggStage.Name(stage)}", grpc.StatusCode.FAILED_PRECONDITION)
        if members is not None and name not in members:
            raise _refuse("SECAGG_EXCLUDED", f"{name} is no longer part of this round's secure aggregation",
                          grpc.StatusCode.FAILED_PRECONDITION)

    def submit_keys(self, name: str, keys: pb.PeerKeys) -> None:
        self._expect(ADVERTISE, name, None)
        if name in self.keys:
            raise _refuse("SECAGG_ALREADY_SUBMITTED", "keys for this round were already advertised (a restarted "
                          "daemon cannot rejoin a round it began)", grpc.StatusCode.ALREADY_EXISTS)
        ad = advert_from_pb(keys, name=name)
        c, m = ad.cipher_public_key, ad.mask_public_key
        if len(c) != 32 or len(m) != 32 or c == m:
            raise _refuse("SECAGG_BAD_KEY", "advertise two distinct 32-byte X25519 public keys")
        if any(m == k.mask_public_key or c == k.cipher_public_key for k in self.adverts.values()):
            raise _refuse("SECAGG_BAD_KEY", "these public keys were already advertised by another institution")
        holders = [h.holder for h in keys.share_commitments]
        if len(ad.seed_commitment) != 32 or sorted(holders) != sorted(self.hood(name)) or any(
                len(x) != 32 for pair in ad.share_commitments.values() for x in pair):
            raise _refuse("SECAGG_BAD_COMMITMENT", "commit to the self-mask seed and to each share dealt, one "
                          f"32-byte hash each, for exactly the holders {sorted(self.hood(name))[:10]}")
        self._signed(name=name, certificate=ad.certificate, signature=ad.signature, data=ad.signed_bytes(self.shape),
                     what="keys")
        self.adverts[name] = ad
        self.keys[name] = advert_to_pb(ad)

    def submit_shares(self, name: str, payload: pb.ShareKeysPayload) -> None:
        self._expect(SHARE, name, self.u1)
        if name in self.shares:
            raise _refuse("SECAGG_ALREADY_SUBMITTED", "shares were already sent", grpc.StatusCode.ALREADY_EXISTS)
        expected = (self.hood(name) & self.u1) - {name}
        holders = [s.holder for s in payload.shares]
        if len(set(holders)) != len(holders) or set(holders) != expected:
            raise _refuse("SECAGG_BAD_SHARES", f"send exactly one share to each neighbour with keys: "
                          f"{sorted(expected)[:10]}")
        for s in payload.shares:
            if s.owner != name or len(s.ciphertext) != _CIPHERTEXT_BYTES:
                raise _refuse("SECAGG_BAD_SHARES", f"each share is owned by its sender and {_CIPHERTEXT_BYTES} bytes")
        self.shares[name] = list(payload.shares)

    def submit_consistency(self, name: str, payload: pb.ConsistencyPayload) -> None:
        self._expect(CONSISTENCY, name, self.u3)
        if name in self.signatures:
            raise _refuse("SECAGG_ALREADY_SUBMITTED", "the survivor list was already signed",
                          grpc.StatusCode.ALREADY_EXISTS)
        certificate, signature = bytes(payload.certificate), bytes(payload.signature)
        self._signed(name=name, certificate=certificate, signature=signature, what="survivor list",
                     data=survivors_bytes(shape=self.shape, signer=name, survivors=sorted(self.u3)))
        self.signatures[name] = pb.SurvivorSignature(institution=name, certificate=certificate, signature=signature)

    def submit_unmask(self, name: str, payload: pb.UnmaskPayload) -> None:
        self._expect(UNMASK, name, self.u3)
        if name in self.revealers:
            raise _refuse("SECAGG_ALREADY_SUBMITTED", "shares were already revealed", grpc.StatusCode.ALREADY_EXISTS)
        hood = self.hood(name)
        x = self.participants.index(name) + 1
        parsed: list[tuple[str, str, Share]] = []
        seen: set[str] = set()
        for r in payload.shares:
            kind = _KIND.get(r.kind)
            if r.owner not in hood or r.owner in seen or kind is None:
                raise _refuse("SECAGG_BAD_REVEAL", f"reveal at most one known kind of share per neighbour; "
                              f"{r.owner!r} is not one, or is named twice")
            want = SELF_MASK_SEED if r.owner in self.u3 else MASK_PRIVATE_KEY if r.owner in self.u2 else None
            if kind != want:
                raise _refuse("SECAGG_BAD_REVEAL", f"{r.owner}'s {kind.replace('_', ' ')} is not to be revealed")
            try:
                share = Share.from_bytes(bytes(r.share))
            except ValueError as e:
                raise _refuse("SECAGG_BAD_REVEAL", f"share of {r.owner}: {e}") from None
            if share.x != x:
                raise _refuse("SECAGG_BAD_REVEAL", "a share must be the revealer's own (its x is its position)")
            seen.add(r.owner)
            parsed.append((r.owner, kind, share))
        for owner, kind, share in parsed:
            self.revealed.setdefault((owner, kind), []).append((name, share))
        self.revealers.add(name)

    # ------------------------------------------------------------ polls
    def poll(self, name: str, stage: int) -> pb.SecAggPollResponse:
        if stage not in (SHARE, MASKED, CONSISTENCY, UNMASK):
            raise _refuse("SECAGG_WRONG_STAGE", "poll for SHARE_KEYS, MASKED_INPUT, CONSISTENCY_CHECK or UNMASK")
        if ORDER[self.stage] < ORDER[stage]:
            return pb.SecAggPollResponse(ready=False)
        members: set[str] = {SHARE: self.u1, MASKED: self.u2, CONSISTENCY: self.u3, UNMASK: self.u3}[stage]  # type: ignore[index]
        if name not in members or (self.stage == DONE and self.failure):
            raise _refuse("SECAGG_EXCLUDED", f"{name} is no longer part of this round's secure aggregation"
                          + (f": {self.failure}" if self.failure else ""), grpc.StatusCode.FAILED_PRECONDITION)
        hood = self.hood(name)
        if stage == SHARE:
            return pb.SecAggPollResponse(ready=True, peers=[self.keys[n] for n in sorted(hood & self.u1)])
        if stage == MASKED:
            mine = [s for owner in sorted((hood & self.u2) - {name}) for s in self.shares[owner] if s.holder == name]
            return pb.SecAggPollResponse(ready=True, shares=mine)
        if stage == CONSISTENCY:
            return pb.SecAggPollResponse(ready=True, survivors=sorted(self.u3))
        # The signatures a holder needs: its neighbours' neighbourhoods (two hops).
        two_hops = set().union(*(self.hood(v) for v in hood))
        return pb.SecAggPollResponse(ready=True, survivors=sorted(self.u3),
                                     dropped=sorted((hood & self.u2) - self.u3),
                                     signatures=[self.signatures[n] for n in sorted(two_hops & set(self.signatures))])

    # ------------------------------------------------------------ stages
    def waiting(self, alive: set[str]) -> set[str]:
        """Institutions still alive that owe the current stage a submission."""
        if self.stage == ADVERTISE:
            return alive - set(self.keys)
        if self.stage == SHARE:
            return (alive & self.u1) - set(self.shares)
        if self.stage == CONSISTENCY:
            return (alive & self.u3) - set(self.signatures)
        if self.stage == UNMASK:
            return (alive & self.u3) - self.revealers
        return set()

    def to_share(self, alive: set[str], *, deadline: float) -> None:
        self.u1 = alive & set(self.keys)
        self.stage, self.stage_deadline = SHARE, deadline

    def to_masked(self, alive: set[str], *, deadline: float) -> None:
        self.u2 = alive & set(self.shares)
        self.stage, self.stage_deadline = MASKED, deadline

    def to_consistency(self, completed: set[str], *, deadline: float) -> None:
        self.u3 = completed & self.u2
        self.stage, self.stage_deadline = CONSISTENCY, deadline

    def to_unmask(self, *, deadline: float) -> None:
        self.stage, self.stage_deadline = UNMASK, deadline

    def fail(self, why: str) -> None:
        self.failure = why
        self.stage = DONE

    def removal(self) -> Removal:
        """The seeds that unmask the survivors' sum, and the holders whose revealed
        shares were wrong (left out); SecAggError if the secrets cannot be rebuilt."""
        out = removal_seeds(
            round_id=self.round_id, participants=self.participants, graph=self.graph, adverts=self.adverts,
            survivors=self.u3, dropped=self.u2 - self.u3, revealed=self.revealed, threshold=self.threshold,
        )
        self.bad_shares = out.bad_shares
        return out

    def removal_check(self) -> None:
        """Cheap: enough distinct shares for every secret the unmasking needs."""
        needs = [(u, SELF_MASK_SEED) for u in self.u3] + [(v, MASK_PRIVATE_KEY) for v in self.u2 - self.u3]
        for owner, kind in needs:
            if len({s.x for _, s in self.revealed.get((owner, kind), ())}) < self.threshold:
                raise SecAggError("SECAGG_UNMASK_FAILED", f"too few shares of {owner}'s {kind.replace('_', ' ')}")
