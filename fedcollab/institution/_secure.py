"""An institution's walk through a secure-aggregation round, over its gRPC client:
advertise signed keys, check its peers' and share, upload the masked update, sign the
survivor list, reveal what unmasks the sum once enough survivors signed the same list.

Signing needs this institution's certificate and key, which only `[tls]` gives.
Without them (plaintext, or channel credentials passed in code) it still takes part,
unsigned, and warns at every round that the coordinator is then trusted not to lie:
refusing would end secure aggregation for every plaintext rehearsal, and an unsigned
institution cannot weaken a signed one, which refuses unsigned peers outright.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence

import numpy as np
import torch

from fedcollab.config import TlsConfig
from fedcollab.errors import PkiError
from fedcollab.institution._client import CoordinatorClient
from fedcollab.secagg import (
    MASK_PRIVATE_KEY,
    SELF_MASK_SEED,
    InstitutionSecAgg,
    PeerVerifier,
    Quantizer,
    RoundSetup,
    SecAggError,
    SigningIdentity,
)
from fedcollab.secagg._encode import NoisePlan, encode_masked, masked_manifest, weight_ratio
from fedcollab.secagg._pb import advert_from_pb, advert_to_pb
from fedcollab.v1 import coordinator_service_pb2 as pb

log = logging.getLogger("fedcollab.institution")

_KINDS = {SELF_MASK_SEED: pb.SECRET_KIND_SELF_MASK_SEED, MASK_PRIVATE_KEY: pb.SECRET_KIND_MASK_PRIVATE_KEY}


def signing_from(tls: TlsConfig | None) -> tuple[SigningIdentity, PeerVerifier] | None:
    """This institution's signing identity and its trust in the federation CA, from [tls]."""
    if tls is None:
        return None
    try:
        return SigningIdentity.from_files(cert=tls.cert, key=tls.key), PeerVerifier.from_file(tls.ca_cert)
    except (OSError, ValueError, PkiError) as e:
        raise SecAggError("SECAGG_NO_IDENTITY", f"cannot sign secure-aggregation keys with [tls] cert/key: {e}; "
                                                "fix the paths or the files") from None


def send_secure(*, client: CoordinatorClient, session_id: str, name: str, task: pb.Task,
                deltas: Sequence[torch.Tensor], num_examples: int, metrics: dict[str, float],
                privacy: pb.PrivacySpend | None, wait_s: float, tls: TlsConfig | None = None) -> int:
    """Runs the SecAgg+ stages for this task's update; the bytes of the masked upload
    the coordinator received. Raises SecAggError when the
    coordinator asks for something this institution must not do, RemoteError when
    the coordinator drops it from the round."""
    p = task.secure_aggregation
    setup = RoundSetup(name=name, round_id=bytes(p.round_id), participants=tuple(p.participants),
                       neighbours=tuple(p.neighbours), threshold=int(p.threshold), bits=int(p.bits),
                       round_number=int(p.round))
    signing = signing_from(tls)
    if signing is None:
        log.warning("%s: round %d: secure aggregation UNSIGNED (no [tls] certificate and key): a coordinator that "
                    "lies could substitute keys or equivocate about survivors and see this institution's update; "
                    "configure [tls] for protection against it", name, task.round)
    sa = InstitutionSecAgg(setup, identity=signing[0] if signing else None, verifier=signing[1] if signing else None)
    quantizer = Quantizer(scale=p.scale, bits=int(p.bits))  # validates both
    noise = None
    if p.HasField("distributed_dp"):
        d = p.distributed_dp
        noise = NoisePlan(clip_norm=d.clip_norm, l2_bound=d.l2_bound, institution_variance=d.institution_variance)

    client.secagg_submit(session_id=session_id, task=task, keys=advert_to_pb(sa.advertisement))
    peers = client.secagg_wait(session_id=session_id, task=task, stage=pb.SEC_AGG_STAGE_SHARE_KEYS, wait_s=wait_s).peers
    shares = sa.make_shares({k.institution: advert_from_pb(k) for k in peers})
    client.secagg_submit(session_id=session_id, task=task, shares=pb.ShareKeysPayload(shares=[
        pb.EncryptedShare(owner=name, holder=holder, ciphertext=ct) for holder, ct in shares]))
    mine = client.secagg_wait(session_id=session_id, task=task, stage=pb.SEC_AGG_STAGE_MASKED_INPUT, wait_s=wait_s)
    sa.receive_shares([(s.owner, bytes(s.ciphertext)) for s in mine.shares if s.holder == name])
    rng = np.random.default_rng(secrets.randbits(128))  # rounding and noise: fresh entropy, never a fixed seed
    weight = weight_ratio(num_examples=num_examples, max_weight=p.max_weight) if p.max_weight > 0 else None
    masked = encode_masked(deltas, quantizer=quantizer, clipping_range=p.clipping_range, noise=noise, secagg=sa,
                           rng=rng, weight=weight)
    log.info("%s: round %d: masked update with %d neighbours (%s)", name, task.round, len(sa.maskers),
             "signed" if sa.signed else "UNSIGNED")
    sent = client.upload(session_id=session_id, task=task, deltas=[torch.from_numpy(masked)],
                         num_examples=num_examples, metrics=metrics, privacy=privacy,
                         manifest=masked_manifest(len(masked)))
    del masked
    listed = client.secagg_wait(session_id=session_id, task=task, stage=pb.SEC_AGG_STAGE_CONSISTENCY_CHECK,
                                wait_s=wait_s)
    certificate, signature = sa.sign_survivors(list(listed.survivors))
    client.secagg_submit(session_id=session_id, task=task, consistency=pb.ConsistencyPayload(
        certificate=certificate, signature=signature))
    outcome = client.secagg_wait(session_id=session_id, task=task, stage=pb.SEC_AGG_STAGE_UNMASK, wait_s=wait_s)
    revealed = sa.reveal(survivors=list(outcome.survivors),
                         signatures={s.institution: (bytes(s.certificate), bytes(s.signature))
                                     for s in outcome.signatures})
    client.secagg_submit(session_id=session_id, task=task, unmask=pb.UnmaskPayload(shares=[
        pb.RevealedShare(owner=owner, kind=_KINDS[kind], share=share) for owner, kind, share in revealed]))
    return int(sent.bytes_received)
