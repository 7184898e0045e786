"""An institution's walk through a secure-aggregation round, over its gRPC client:
advertise keys, share them, upload the masked update, reveal what unmasks the sum."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence

import numpy as np
import torch

from fedcollab.institution._client import CoordinatorClient
from fedcollab.secagg import MASK_PRIVATE_KEY, SELF_MASK_SEED, InstitutionSecAgg, Quantizer, RoundSetup
from fedcollab.secagg._encode import NoisePlan, encode_masked, masked_manifest
from fedcollab.v1 import coordinator_service_pb2 as pb

log = logging.getLogger("fedcollab.institution")

_KINDS = {SELF_MASK_SEED: pb.SECRET_KIND_SELF_MASK_SEED, MASK_PRIVATE_KEY: pb.SECRET_KIND_MASK_PRIVATE_KEY}


def send_secure(*, client: CoordinatorClient, session_id: str, name: str, task: pb.Task,
                deltas: Sequence[torch.Tensor], num_examples: int, metrics: dict[str, float],
                privacy: pb.PrivacySpend | None, wait_s: float) -> None:
    """Runs the SecAgg+ stages for this task's update. Raises SecAggError when the
    coordinator asks for something this institution must not do, RemoteError when
    the coordinator drops it from the round."""
    p = task.secure_aggregation
    setup = RoundSetup(name=name, round_id=bytes(p.round_id), participants=tuple(p.participants),
                       neighbours=tuple(p.neighbours), threshold=int(p.threshold), bits=int(p.bits))
    sa = InstitutionSecAgg(setup)
    quantizer = Quantizer(scale=p.scale, bits=int(p.bits))  # validates both
    noise = None
    if p.HasField("distributed_dp"):
        d = p.distributed_dp
        noise = NoisePlan(clip_norm=d.clip_norm, l2_bound=d.l2_bound, institution_variance=d.institution_variance)

    client.secagg_submit(session_id=session_id, task=task, keys=pb.PeerKeys(
        cipher_public_key=sa.cipher_public_key, mask_public_key=sa.mask_public_key))
    peers = client.secagg_wait(session_id=session_id, task=task, stage=pb.SEC_AGG_STAGE_SHARE_KEYS, wait_s=wait_s).peers
    shares = sa.make_shares({k.institution: (bytes(k.cipher_public_key), bytes(k.mask_public_key)) for k in peers})
    client.secagg_submit(session_id=session_id, task=task, shares=pb.ShareKeysPayload(shares=[
        pb.EncryptedShare(owner=name, holder=holder, ciphertext=ct) for holder, ct in shares]))
    mine = client.secagg_wait(session_id=session_id, task=task, stage=pb.SEC_AGG_STAGE_MASKED_INPUT, wait_s=wait_s)
    sa.receive_shares([(s.owner, bytes(s.ciphertext)) for s in mine.shares if s.holder == name])
    rng = np.random.default_rng(secrets.randbits(128))  # rounding and noise: fresh entropy, never a fixed seed
    masked = encode_masked(deltas, quantizer=quantizer, clipping_range=p.clipping_range, noise=noise, secagg=sa,
                           rng=rng)
    log.info("%s: round %d: masked update with %d neighbours", name, task.round, len(sa.maskers))
    client.upload(session_id=session_id, task=task, deltas=[torch.from_numpy(masked)], num_examples=num_examples,
                  metrics=metrics, privacy=privacy, manifest=masked_manifest(len(masked)))
    del masked
    outcome = client.secagg_wait(session_id=session_id, task=task, stage=pb.SEC_AGG_STAGE_UNMASK, wait_s=wait_s)
    revealed = sa.reveal(survivors=list(outcome.survivors), dropped=list(outcome.dropped))
    client.secagg_submit(session_id=session_id, task=task, unmask=pb.UnmaskPayload(shares=[
        pb.RevealedShare(owner=owner, kind=_KINDS[kind], share=share) for owner, kind, share in revealed]))
