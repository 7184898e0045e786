"""The model registry: committed versions the operator published, described for the
partners who pull them (what the model card is made of)."""

from __future__ import annotations

import math
from typing import Any

import grpc

from fedcollab.coordinator._checkpoints import ModelVersion
from fedcollab.coordinator._consortium import Consortium
from fedcollab.errors import Rejected
from fedcollab.lineage import parse_record
from fedcollab.v1 import coordinator_service_pb2 as pb


def committed_version(run: Any, version: int) -> tuple[ModelVersion, bytes, bytes]:
    """(the model, its lineage record, its signature) of a committed version of `run`."""
    model = next((m for m in run.store.models() if m.version == version), None)
    signed = run.store.lineage_of(version) if model is not None else None
    if model is None or signed is None:
        raise Rejected(code=grpc.StatusCode.NOT_FOUND, reason="VERSION_UNKNOWN",
                       message=f"study {run.name!r} has no committed version {version}",
                       metadata={"study": run.name, "version": str(version)})
    return model, signed[0], signed[1]


def published_model(run: Any, *, version: int, consortium: Consortium) -> tuple[pb.PublishedModel, ModelVersion]:
    publication = consortium.publication(study=run.name, version=version)
    if publication is None:
        raise Rejected(code=grpc.StatusCode.NOT_FOUND, reason="VERSION_NOT_PUBLISHED",
                       message=f"v{version} of study {run.name!r} is not published: `fedcollab model list` shows "
                               "what is; the operator publishes with `fedcollab model publish`",
                       metadata={"study": run.name, "version": str(version)})
    model, record_bytes, signature = committed_version(run, version)
    record = parse_record(record_bytes)
    metrics: dict[str, float] = {}
    for r in run.store.rounds():
        if r["model_version"] == version and r["status"] == "committed":
            metrics = {k: float(v) for k, v in r["metrics"].items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    epsilon = {c["institution"]: float((c.get("privacy") or {}).get("epsilon", 0.0))
               for c in record.get("contributions", [])}
    info = pb.PublishedModel(
        study=run.name, version=version, sha256=model.sha256, size_bytes=model.size_bytes,
        model=run.engine.study_info.model, round=int(record.get("round", 0)),
        contributors=sorted(epsilon), metrics=metrics, lineage_record=record_bytes, lineage_signature=signature,
        lineage_public_key=run.engine.lineage_public_key, published_at=float(publication["published_at"]),
        federation=str(record.get("federation", "")), epsilon=epsilon,
    )
    return info, model
