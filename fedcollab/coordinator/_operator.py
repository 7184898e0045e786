"""The operator's API (OperatorService): read-only views of the study. Only callers
with an operator certificate get here (the interceptor checks the role)."""

from __future__ import annotations

import math

import grpc

from fedcollab.coordinator._engine import RoundEngine
from fedcollab.coordinator._store import Store
from fedcollab.errors import Rejected
from fedcollab.v1 import operator_service_pb2 as opb
from fedcollab.v1 import operator_service_pb2_grpc as opb_grpc
from fedcollab.wire import to_grpc_status


class OperatorServicer(opb_grpc.OperatorServiceServicer):
    def __init__(self, *, engine: RoundEngine, store: Store, federation: str) -> None:
        self._engine, self._store, self._federation = engine, store, federation

    def GetStatus(self, request: opb.GetStatusRequest, context: grpc.ServicerContext) -> opb.GetStatusResponse:
        study = self._engine.study
        online = set(self._engine.online_institutions())
        spend: dict[str, dict[str, object]] = {}
        for p in self._store.privacy_spend():
            spend[p["institution"]] = p
        rounds = [
            opb.RoundStatus(round=r["round"], attempt=r["attempt"], status=r["status"],
                            model_version=r["model_version"] or 0, reason=r["reason"] or "",
                            metrics={k: float(v) for k, v in r["metrics"].items()
                                     if isinstance(v, (int, float)) and math.isfinite(v)})
            for r in self._store.rounds()
        ]
        institutions = [
            opb.InstitutionStatus(name=i["name"], online=i["name"] in online,
                                  num_train_examples=i["num_train_examples"],
                                  epsilon=float(spend.get(i["name"], {}).get("epsilon", 0.0)),  # type: ignore[arg-type]
                                  budget_epsilon=float(spend.get(i["name"], {}).get("budget_epsilon", 0.0)))  # type: ignore[arg-type]
            for i in self._store.institutions()
        ]
        return opb.GetStatusResponse(federation=self._federation, study=study.name, total_rounds=study.rounds,
                                     finished=self._engine.finished, rounds=rounds, institutions=institutions)

    def ListLineage(self, request: opb.ListLineageRequest, context: grpc.ServicerContext) -> opb.ListLineageResponse:
        if request.from_version < 0:
            context.abort_with_status(to_grpc_status(Rejected(
                code=grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_VERSION", message="from_version must be >= 0")))
        entries = [opb.LineageEntry(version=v, record=record, signature=signature)
                   for v, record, signature in self._engine.lineage(from_version=request.from_version)]
        return opb.ListLineageResponse(public_key=self._engine.lineage_public_key, entries=entries)
