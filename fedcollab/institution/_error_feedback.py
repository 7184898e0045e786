"""Error feedback for top-k compression (Stich et al. 2018; Karimireddy et al. 2019):
what an institution does not send this round is added to its next update, so nothing
is dropped for good, only delayed.

    x_t = delta_t + e_t;   sent_t = top_k(x_t);   e_{t+1} = x_t - sent_t

so after R rounds sum(sent) + e_{R+1} == sum(delta) exactly. The residual e lives in
the state folder (one safetensors file per study, float32, written atomically) and
is replaced before the update leaves: a crash after that resumes from the right
residual. An update that is then refused or lost in transit is lost with its sent
part, as any institution's update of a failed round is; the residual keeps the rest.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from fedcollab._fileio import atomic_write
from fedcollab.compression import compression_from_proto, select_topk, topk_count
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import tensor_pb2

log = logging.getLogger("fedcollab.institution")


def residual_path(state_dir: Path, study: str) -> Path:
    return Path(state_dir) / "error-feedback" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', study)[:100]}.safetensors"


def load_residual(path: Path, *, manifest: tensor_pb2.ModelManifest) -> list[torch.Tensor] | None:
    """The kept residual in manifest order, or None when there is none that fits."""
    if not path.is_file():
        return None
    try:
        kept = load_file(str(path))
    except (OSError, SafetensorError) as e:
        log.warning("error feedback: unreadable residual %s (%s); starting from zero", path, e)
        return None
    names = [s.name for s in manifest.tensors]
    if sorted(kept) != sorted(names) or any(list(kept[s.name].shape) != list(s.shape) for s in manifest.tensors):
        log.warning("error feedback: the residual in %s does not fit this model's tensors; starting from zero", path)
        return None
    return [kept[n].to(torch.float32) for n in names]


def with_error_feedback(
    *, state_dir: Path, study: str, task: pb.Task, deltas: list[torch.Tensor]
) -> list[torch.Tensor]:
    """For a top-k task: deltas + the kept residual, reduced to the k entries that will
    be sent (zeros elsewhere, so top-k encoding sends exactly them), with the rest kept
    as the new residual. Any other task's deltas are returned as they are."""
    compression = compression_from_proto(task.compression)  # a bad one is refused before the residual changes
    if compression.method != "topk":
        return deltas
    path = residual_path(state_dir, study)
    residual = load_residual(path, manifest=task.manifest)
    flat = torch.cat([d.detach().to("cpu", torch.float32).reshape(-1) for d in deltas])  # [d]: x_t = delta_t + e_t
    if residual is not None:
        flat += torch.cat([r.reshape(-1) for r in residual])
    if not bool(torch.isfinite(flat).all()):
        # A diverged round: send it as it is (the coordinator refuses it) and keep the
        # residual, which one bad round must not poison for every later one.
        log.warning("error feedback: round %d's update is not finite; the residual is kept as it was", task.round)
        return deltas
    keep = select_topk(flat, k=topk_count(flat.numel(), fraction=compression.topk_fraction))
    sent_flat = torch.zeros_like(flat)
    sent_flat[keep] = flat[keep]
    sent, rest, pos = [], {}, 0
    for spec, d in zip(task.manifest.tensors, deltas, strict=True):
        n = d.numel()
        s = sent_flat[pos : pos + n].reshape(d.shape).to(d.dtype)  # what travels, in the tensor's dtype
        rest[spec.name] = (flat[pos : pos + n].reshape(d.shape) - s.to(torch.float32)).contiguous()
        sent.append(s.contiguous())
        pos += n
    atomic_write(path, save(rest, metadata={"study": study, "round": str(task.round)}))
    return sent
