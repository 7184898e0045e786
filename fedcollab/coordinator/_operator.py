"""The operator's API (OperatorService): studies, membership, the model registry, and
read-only views. Only operators get here: a certificate with the operator role, or
over plaintext the coordinator's operator token (the interceptor checks both)."""

from __future__ import annotations

import logging
import math
from typing import Any

import grpc

from fedcollab.coordinator._auth import caller_of
from fedcollab.coordinator._consortium import Consortium
from fedcollab.coordinator._registry import committed_version
from fedcollab.coordinator._servicer import translated as _translated
from fedcollab.coordinator._status_pages import page, page_size_of, position_of, token_for
from fedcollab.coordinator._studies import Studies, StudyRun
from fedcollab.errors import Rejected
from fedcollab.v1 import operator_service_pb2 as opb
from fedcollab.v1 import operator_service_pb2_grpc as opb_grpc

log = logging.getLogger("fedcollab.coordinator")


def _who(context: grpc.ServicerContext) -> str:
    caller = caller_of(context)
    return caller.name if caller is not None else "operator"


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class OperatorServicer(opb_grpc.OperatorServiceServicer):
    def __init__(self, *, studies: Studies, consortium: Consortium, federation: str) -> None:
        self._studies, self._consortium, self._federation = studies, consortium, federation

    def _summary(self, run: StudyRun) -> opb.StudySummary:
        row = self._consortium.study(run.name) or {}
        study = run.engine.study
        return opb.StudySummary(
            name=run.name, status=row.get("status", "unknown"), rounds_committed=run.store.last_committed_round(),
            total_rounds=study.rounds, model_kind=study.model.kind, strategy=study.strategy.name,
            min_institutions=study.min_institutions, submitted_by=row.get("submitted_by", ""),
            submitted_at=float(row.get("submitted_at", 0.0)), reason=row.get("reason", "") or run.engine.failure or "",
            start_after=run.start_after, is_default=run.is_default,
            declined={d["institution"]: f"{d['reason']}: {d['message']}" if d["message"] else d["reason"]
                      for d in self._consortium.declines(run.name)},
            online=run.engine.online_institutions(),
        )

    @_translated
    def GetStatus(self, request: opb.GetStatusRequest, context: grpc.ServicerContext) -> opb.GetStatusResponse:
        run = self._studies.get(request.study)
        engine, store = run.engine, run.store
        # Paged (_status_pages): thousands of rounds do not fit one message.
        page_size = page_size_of(request.page_size)
        after = position_of(request.page_token, study=run.name)
        online = set(engine.online_institutions())
        spend: dict[str, dict[str, Any]] = {}
        for p in store.privacy_spend() if after is None else ():  # institutions go on the first page only
            spend[p["institution"]] = p
        all_rounds = store.rounds()
        rounds, more = page(all_rounds, after=after, page_size=page_size, size_of=lambda m: m.ByteSize(),
                            encode=lambda r: opb.RoundStatus(
                                round=r["round"], attempt=r["attempt"], status=r["status"],
                                model_version=r["model_version"] or 0, reason=r["reason"] or "",
                                metrics=_finite(r["metrics"])))
        next_token = token_for(study=run.name, round_number=rounds[-1].round, attempt=rounds[-1].attempt) \
            if more and rounds else ""
        institutions = [
            opb.InstitutionStatus(name=i["name"], online=i["name"] in online,
                                  num_train_examples=i["num_train_examples"],
                                  epsilon=float(spend.get(i["name"], {}).get("epsilon", 0.0)),
                                  budget_epsilon=float(spend.get(i["name"], {}).get("budget_epsilon", 0.0)))
            for i in store.institutions()
        ] if after is None else []
        return opb.GetStatusResponse(federation=self._federation, study=run.name, total_rounds=engine.study.rounds,
                                     finished=engine.finished, rounds=rounds, institutions=institutions,
                                     next_page_token=next_token, total_size=len(all_rounds))

    @_translated
    def ListLineage(self, request: opb.ListLineageRequest, context: grpc.ServicerContext) -> opb.ListLineageResponse:
        if request.from_version < 0:
            raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_VERSION",
                           message="from_version must be >= 0")
        run = self._studies.get(request.study)
        entries = [opb.LineageEntry(version=v, record=record, signature=signature)
                   for v, record, signature in run.engine.lineage(from_version=request.from_version)]
        published = [p["version"] for p in self._consortium.publications(run.name)]
        return opb.ListLineageResponse(public_key=run.engine.lineage_public_key, entries=entries,
                                       published_versions=published)

    # ----------------------------------------------------------------- studies
    @_translated
    def SubmitStudy(self, request: opb.SubmitStudyRequest, context: grpc.ServicerContext) -> opb.StudySummary:
        if len(request.study_toml) > 256 * 1024:
            raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="STUDY_INVALID",
                           message="the study file is over 256 KiB: a study is a [study] table, not data")
        run = self._studies.submit(study_toml=request.study_toml, by=_who(context))
        return self._summary(run)

    @_translated
    def ListStudies(self, request: opb.ListStudiesRequest, context: grpc.ServicerContext) -> opb.ListStudiesResponse:
        return opb.ListStudiesResponse(studies=[self._summary(run) for run in self._studies.runs()])

    @_translated
    def ChangeStudy(self, request: opb.ChangeStudyRequest, context: grpc.ServicerContext) -> opb.StudySummary:
        run = self._studies.change(name=request.study, action=request.action, reason=request.reason[:500],
                                   by=_who(context))
        return self._summary(run)

    # ----------------------------------------------------------------- membership
    def _membership(self, row: dict[str, Any], known: dict[str, dict[str, Any]], online: set[str]) -> opb.Membership:
        seen = known.get(row["institution"], {})
        return opb.Membership(institution=row["institution"], status=row["status"], reason=row["reason"],
                              changed_by=row["changed_by"], changed_at=row["changed_at"],
                              online=row["institution"] in online, last_seen=float(seen.get("last_seen", 0.0)),
                              num_train_examples=int(seen.get("num_train_examples", 0)))

    def _seen(self) -> tuple[dict[str, dict[str, Any]], set[str]]:
        known: dict[str, dict[str, Any]] = {}
        online: set[str] = set()
        for run in self._studies.runs():
            online.update(run.engine.online_institutions())
            for i in run.store.institutions():
                if i["last_seen"] >= known.get(i["name"], {}).get("last_seen", 0):
                    known[i["name"]] = i
        return known, online

    @_translated
    def ListInstitutions(self, request: opb.ListInstitutionsRequest, context: grpc.ServicerContext
                         ) -> opb.ListInstitutionsResponse:
        known, online = self._seen()
        return opb.ListInstitutionsResponse(
            institutions=[self._membership(row, known, online) for row in self._consortium.memberships()])

    @_translated
    def SetMembership(self, request: opb.SetMembershipRequest, context: grpc.ServicerContext) -> opb.Membership:
        if request.status not in ("approved", "suspended"):
            raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_MEMBERSHIP",
                           message=f"status {request.status!r}: use approved or suspended")
        name = request.institution
        if not name or len(name) > 128:
            raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_INSTITUTION_NAME",
                           message="name the institution (as in its certificate)")
        row = self._consortium.set_membership(name, status=request.status, reason=request.reason[:500],
                                              changed_by=_who(context))
        if request.status == "suspended":
            self._studies.forget_institution(name)
        log.warning("institution %s %s by %s%s", name, request.status, _who(context),
                    f": {request.reason}" if request.reason else "")
        known, online = self._seen()
        return self._membership(row, known, online)

    # ----------------------------------------------------------------- model registry
    @_translated
    def PublishModel(self, request: opb.PublishModelRequest, context: grpc.ServicerContext
                     ) -> opb.PublishModelResponse:
        run = self._studies.get(request.study)
        model, _, _ = committed_version(run, request.version)
        self._consortium.publish(study=run.name, version=model.version, sha256=model.sha256, published_by=_who(context))
        log.info("study %s: v%d published by %s", run.name, model.version, _who(context))
        return opb.PublishModelResponse(study=run.name, version=model.version, sha256=model.sha256)
