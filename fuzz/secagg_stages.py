"""Secure aggregation in the coordinator fuzz target (fuzz_coordinator.py).

- Requests for SecAggPoll and SecAggSubmit, every stage (CONSISTENCY_CHECK included)
  and every payload (signed keys with seed and share commitments, encrypted shares,
  survivor-list signatures, revealed shares), each field right for the open round or
  hostile (wrong sizes, commitments for the wrong holders, garbage or oversized
  certificates and signatures, shares of the wrong holder, unknown enum values).
- With FUZZ_SECAGG=1 the study runs under secure aggregation and `HonestWalk` drives
  the honest institutions through each round's stages (real InstitutionSecAgg, real
  masked uploads through the servicer), so that fuzz inputs meet a round at every
  stage, and rounds keep committing in between.

Imported by fuzz_coordinator.py after fedcollab (under atheris' instrumentation there).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from typing import Any

import numpy as np
import torch

from fedcollab.config import SecureAggregationConfig
from fedcollab.errors import Rejected
from fedcollab.secagg import InstitutionSecAgg, Quantizer, RoundSetup, SecAggError
from fedcollab.secagg._encode import encode_masked, masked_manifest, weight_ratio
from fedcollab.secagg._pb import advert_from_pb, advert_to_pb
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import tensor_pb2

STAGES = [pb.SEC_AGG_STAGE_SHARE_KEYS, pb.SEC_AGG_STAGE_MASKED_INPUT, pb.SEC_AGG_STAGE_CONSISTENCY_CHECK,
          pb.SEC_AGG_STAGE_UNMASK, pb.SEC_AGG_STAGE_UNSPECIFIED, pb.SEC_AGG_STAGE_ADVERTISE_KEYS,
          pb.SEC_AGG_STAGE_DONE, 7, -1, 2**31 - 1]
_PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def secagg_config() -> SecureAggregationConfig | None:
    if os.environ.get("FUZZ_SECAGG") != "1":
        return None
    # Short stages: a round that fuzz inputs derail gives way to the next one quickly.
    return SecureAggregationConfig(stage_timeout_s=0.5, clipping_range=8.0)


def secagg_round(env: Any) -> Any:
    """The open round's SecAggRound (None without one); read from the engine's private state."""
    eng = env.engine
    with eng._cond:
        r = getattr(eng, "_round", None)
        return None if r is None or r.closed else r.secagg


def _blob(r: Any, good: bytes, sizes: list[int]) -> bytes:
    kind = r.pick(["good", "good", "size", "flip", "empty"])
    if kind == "good":
        return good
    if kind == "size":
        n = r.pick(sizes)
        return (r.take(n) + bytes(n))[:n]
    if kind == "flip" and good:
        i = r.int_in(0, len(good) - 1)
        return good[:i] + bytes([good[i] ^ 0x01]) + good[i + 1:]
    return b""


def _certificate(r: Any, good: bytes) -> bytes:
    return r.pick([good, b"", _PEM, b"not a pem", _PEM * 400, r.blob(600), good[:-40]])


def _names(env: Any, sa: Any) -> list[str]:
    return (list(sa.participants) if sa is not None else []) + env.names()


def poll_request(r: Any, env: Any, *, session: str, round_number: int, nonce: str) -> Any:
    return pb.SecAggPollRequest(session_id=session, round=round_number, nonce=nonce, stage=r.pick(STAGES),
                                wait_seconds=r.pick([0.001, 0.0, -1.0, float("nan"), float("inf"), 1e300]))


def submit_request(r: Any, env: Any, *, name: str, session: str, round_number: int, nonce: str) -> Any:
    """A SecAggSubmitRequest of one payload kind, right for `name` in the open round or hostile."""
    sa = secagg_round(env)
    request = pb.SecAggSubmitRequest(session_id=session, round=round_number, nonce=nonce)
    what = r.pick(["keys", "shares", "consistency", "unmask", "none"])
    names = _names(env, sa)
    if what == "keys":
        request.keys.CopyFrom(_keys(r, sa, name, names))
    elif what == "shares":
        for _ in range(r.pick([1, 3, 0, 16, 40])):
            request.shares.shares.append(pb.EncryptedShare(
                owner=r.pick([name, *names[:3], ""]), holder=r.pick(names or [""]),
                ciphertext=_blob(r, secrets.token_bytes(12 + 2 * 70 + 16), [0, 167, 169, 10_000])))
    elif what == "consistency":
        request.consistency.certificate = _certificate(r, _PEM)
        request.consistency.signature = _blob(r, secrets.token_bytes(72), [0, 64, 71, 5000])
    elif what == "unmask":
        x = (sa.participants.index(name) + 1) if sa is not None and name in sa.participants else 1
        for _ in range(r.pick([1, 2, 0, 20])):
            share = r.pick([x, 0, 2**32 - 1, x + 1]).to_bytes(4, "big") + secrets.token_bytes(66)
            request.unmask.shares.append(pb.RevealedShare(
                owner=r.pick(names or [""]), kind=r.pick([1, 2, 0, 3, -5]),
                share=_blob(r, share, [0, 69, 71, 70])))
    return request


def _keys(r: Any, sa: Any, name: str, names: list[str]) -> Any:
    if sa is not None and name in sa.participants:
        try:
            good = advert_to_pb(InstitutionSecAgg(RoundSetup(
                name=name, round_id=sa.round_id, participants=tuple(sa.participants),
                neighbours=tuple(sa.graph[name]), threshold=sa.threshold, bits=32,
                round_number=sa.round_number)).advertisement)
        except SecAggError:
            good = pb.PeerKeys()
    else:
        good = pb.PeerKeys(cipher_public_key=secrets.token_bytes(32), mask_public_key=secrets.token_bytes(32),
                           seed_commitment=secrets.token_bytes(32))
    keys = pb.PeerKeys()
    keys.CopyFrom(good)
    keys.institution = r.pick([keys.institution, name, "mallory", ""])
    keys.cipher_public_key = _blob(r, bytes(keys.cipher_public_key), [31, 33, 0])
    keys.mask_public_key = r.pick([bytes(keys.mask_public_key), bytes(keys.cipher_public_key), bytes(32)])
    keys.seed_commitment = _blob(r, bytes(keys.seed_commitment), [0, 31, 64])
    what = r.pick(["same", "same", "drop", "dup", "extra", "short", "clear"])
    commitments = list(keys.share_commitments)
    if what == "drop" and commitments:
        commitments.pop(r.int_in(0, len(commitments) - 1))
    elif what == "dup" and commitments:
        commitments.append(commitments[0])
    elif what == "extra":
        commitments.append(pb.ShareCommitment(holder=r.pick(names or ["x"]), self_mask_seed=bytes(32),
                                              mask_private_key=bytes(32)))
    elif what == "short" and commitments:
        commitments[0] = pb.ShareCommitment(holder=commitments[0].holder, self_mask_seed=b"\0")
    elif what == "clear":
        commitments = []
    del keys.share_commitments[:]
    keys.share_commitments.extend(commitments)
    if r.chance(96):
        keys.certificate = _certificate(r, _PEM)
        keys.signature = _blob(r, secrets.token_bytes(72), [0, 64, 5000])
    return keys


class HonestWalk:
    """The honest institutions' side of every secure-aggregation round (FUZZ_SECAGG=1),
    in one thread: each stage for all of them, then the next. A step the coordinator
    refuses (a fuzz input got there first, the round moved on or aborted) drops that
    institution from the walk, as a vanished one would be."""

    def __init__(self, env: Any, *, context: Any, aborted: type[BaseException]) -> None:
        self._env, self._context, self._aborted = env, context, aborted
        self._stop = threading.Event()
        self._done: set[bytes] = set()
        self.rounds_walked = 0
        self._thread = threading.Thread(target=self._run, name="fuzz-secagg-honest", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            sa = secagg_round(self._env)
            if sa is None or sa.round_id in self._done:
                self._stop.wait(0.005)
                continue
            self._done.add(sa.round_id)
            self._walk(sa)
            self.rounds_walked += 1

    def _who(self, sa: Any) -> dict[str, tuple[str, str]]:
        eng = self._env.engine
        with eng._cond:
            r = eng._round
            if r is None or r.secagg is not sa:
                return {}
            for _ in range(10):  # the fuzzing thread may rejoin an honest institution meanwhile
                try:
                    honest = dict(self._env.honest)
                    break
                except RuntimeError:
                    continue
            else:
                return {}
            return {n: (s, r.participants[n].nonce) for n, s in honest.items() if n in r.participants}

    def _call(self, fn: Any) -> Any:
        try:
            return fn()
        except (Rejected, SecAggError, self._aborted, ValueError):
            return None

    def _wait(self, sa: Any, who: dict[str, tuple[str, str]], stage: int) -> dict[str, Any]:
        """{name: ready poll response} for each of `who` the stage got ready for."""
        out: dict[str, Any] = {}
        deadline = time.monotonic() + 3.0
        while who.keys() - out.keys() and time.monotonic() < deadline and not self._stop.is_set():
            for n, (session, nonce) in who.items():
                if n in out:
                    continue
                req = pb.SecAggPollRequest(session_id=session, round=sa.round_number, nonce=nonce, stage=stage,
                                           wait_seconds=0.001)
                response = self._call(lambda req=req: self._env.engine.secagg_poll(request=req))
                if response is None:
                    out[n] = None  # refused: no longer in the round
                elif response.ready:
                    out[n] = response
            self._stop.wait(0.005)
        return {n: v for n, v in out.items() if v is not None}

    def _submit(self, sa: Any, who: dict[str, tuple[str, str]], n: str, **payload: Any) -> bool:
        session, nonce = who[n]
        request = pb.SecAggSubmitRequest(session_id=session, round=sa.round_number, nonce=nonce, **payload)
        return self._call(lambda: self._env.engine.secagg_submit(request=request) or True) is not None

    def _walk(self, sa: Any) -> None:
        who = self._who(sa)
        clients: dict[str, InstitutionSecAgg] = {}
        for n in who:
            p = sa.params_for(n)
            try:
                clients[n] = InstitutionSecAgg(RoundSetup(
                    name=n, round_id=bytes(p.round_id), participants=tuple(p.participants),
                    neighbours=tuple(p.neighbours), threshold=int(p.threshold), bits=int(p.bits),
                    round_number=int(p.round)))
            except SecAggError:
                continue
            if not self._submit(sa, who, n, keys=advert_to_pb(clients[n].advertisement)):
                del clients[n]
        steps = [(pb.SEC_AGG_STAGE_SHARE_KEYS, self._share), (pb.SEC_AGG_STAGE_MASKED_INPUT, self._mask),
                 (pb.SEC_AGG_STAGE_CONSISTENCY_CHECK, self._sign), (pb.SEC_AGG_STAGE_UNMASK, self._reveal)]
        for stage, step in steps:
            ready = self._wait(sa, {n: who[n] for n in clients}, stage)
            for n in list(clients):
                send = lambda n=n, step=step, ready=ready: step(sa, who, n, clients[n], ready[n])  # noqa: E731
                if n not in ready or not self._call(send):
                    del clients[n]

    def _share(self, sa: Any, who: Any, n: str, c: InstitutionSecAgg, response: Any) -> bool:
        shares = c.make_shares({k.institution: advert_from_pb(k) for k in response.peers})
        return self._submit(sa, who, n, shares=pb.ShareKeysPayload(shares=[
            pb.EncryptedShare(owner=n, holder=h, ciphertext=ct) for h, ct in shares]))

    def _mask(self, sa: Any, who: Any, n: str, c: InstitutionSecAgg, response: Any) -> bool:
        c.receive_shares([(s.owner, bytes(s.ciphertext)) for s in response.shares if s.holder == n])
        p = sa.params_for(n)
        zeros = [torch.zeros(sum(int(np.prod(s.shape)) for s in self._env.manifest.tensors), dtype=torch.float32)]
        weight = weight_ratio(num_examples=10, max_weight=p.max_weight) if p.max_weight > 0 else None
        masked = encode_masked(zeros, quantizer=Quantizer(scale=p.scale, bits=int(p.bits)),
                               clipping_range=p.clipping_range, noise=None, secagg=c,
                               rng=np.random.default_rng(0), weight=weight)
        data = masked.astype("<u4").tobytes()
        session, nonce = who[n]
        eng = self._env.engine
        with eng._cond:
            base_version = eng._round.base.version if eng._round is not None else 0
        header = pb.UpdateHeader(session_id=session, round=sa.round_number, nonce=nonce, base_version=base_version,
                                 total_bytes=len(data), sha256=hashlib.sha256(data).digest(), num_examples=10)
        header.manifest.CopyFrom(masked_manifest(len(masked)))
        messages = [pb.UploadUpdateRequest(header=header)] + [
            pb.UploadUpdateRequest(chunk=tensor_pb2.Chunk(offset=o, data=data[o:o + 1024],
                                                          sha256=hashlib.sha256(data[o:o + 1024]).digest()))
            for o in range(0, len(data), 1024)]
        return self._call(lambda: self._env.servicer.UploadUpdate(iter(messages), self._context())) is not None

    def _sign(self, sa: Any, who: Any, n: str, c: InstitutionSecAgg, response: Any) -> bool:
        certificate, signature = c.sign_survivors(list(response.survivors))
        return self._submit(sa, who, n, consistency=pb.ConsistencyPayload(certificate=certificate,
                                                                          signature=signature))

    def _reveal(self, sa: Any, who: Any, n: str, c: InstitutionSecAgg, response: Any) -> bool:
        revealed = c.reveal(survivors=list(response.survivors), signatures={})
        kinds = {"self_mask_seed": pb.SECRET_KIND_SELF_MASK_SEED, "mask_private_key": pb.SECRET_KIND_MASK_PRIVATE_KEY}
        return self._submit(sa, who, n, unmask=pb.UnmaskPayload(shares=[
            pb.RevealedShare(owner=o, kind=kinds[k], share=s) for o, k, s in revealed]))
