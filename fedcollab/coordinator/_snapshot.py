"""A read-only picture of the consortium at one instant: what the dashboard, the
Prometheus endpoint and the JSON API render. They read nothing else, so the
coordinator's internals (one study today, several soon) stay behind `snapshot_of`."""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from fedcollab.lineage import LineageError, parse_record

if TYPE_CHECKING:
    from fedcollab.coordinator._engine import RoundEngine
    from fedcollab.coordinator._server import Coordinator
    from fedcollab.coordinator._store import Store

StudyStatus = Literal["running", "paused", "queued", "cancelled", "finished", "failed"]
MembershipStatus = Literal["approved", "pending", "suspended"]


@dataclass(frozen=True)
class StudySnapshot:
    name: str
    status: StudyStatus
    total_rounds: int
    rounds: list[dict[str, Any]]  # Store.rounds(): round, attempt, status, opened_at, closed_at, metrics, ...
    evaluations: list[dict[str, Any]]  # Store.evaluations(): round, institution, num_examples, loss, accuracy
    privacy: list[dict[str, Any]]  # Store.privacy_spend(): per institution and round, epsilon, budget_epsilon, ...
    lineage: list[dict[str, Any]]  # version, round, model_sha256, parent_sha256, contributors, aggregator, created_at
    online: list[str]  # institutions holding a live session
    bytes_in: int  # since the study began, across restarts (_counters)
    bytes_out: int
    failures: dict[str, int]  # failed participations by reason, since the study began
    failure: str | None = None  # why the study stopped before its last round, if it did
    # Its status changes, newest first: at, status, note (paused by whom and why, ...).
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ConsortiumSnapshot:
    federation: str
    taken_at: float  # Unix time
    studies: list[StudySnapshot]
    institutions: list[dict[str, Any]]  # name, status (membership), online, num_train_examples, last_seen
    # Membership changes (suspended, approved, ...), newest first: at, subject, status, note, changed_by.
    membership_history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        """The snapshot as JSON; non-finite numbers become null (JSON has none)."""
        return json.dumps(_finite(asdict(self)), sort_keys=True, allow_nan=False)


def study_snapshot(*, name: str, status: StudyStatus, engine: RoundEngine, store: Store,
                   history: list[dict[str, Any]] | None = None) -> StudySnapshot:
    return StudySnapshot(
        name=name,
        status=status,
        total_rounds=engine.study.rounds,
        rounds=store.rounds(),
        evaluations=store.evaluations(),
        privacy=store.privacy_spend(),
        lineage=[_lineage_entry(version, record) for version, record, _signature in engine.lineage()],
        online=engine.online_institutions(),
        bytes_in=engine.bytes_in,
        bytes_out=engine.bytes_out,
        failures=dict(engine.failures),  # one C-level copy under the GIL: safe against the engine's updates
        failure=engine.failure,
        history=history or [],
    )


def snapshot_of(coordinator: Coordinator) -> ConsortiumSnapshot:
    """Every study of the coordinator, and every institution with its membership."""
    consortium = coordinator.consortium
    studies = [study_snapshot(name=run.name, status=cast(StudyStatus, coordinator.studies.status(run.name)),
                              engine=run.engine,
                              store=run.store, history=consortium.history(kind="study", subject=run.name, limit=100))
               for run in coordinator.studies.runs()]
    online = {name for study in studies for name in study.online}
    seen: dict[str, dict[str, Any]] = {}
    for run in coordinator.studies.runs():
        for i in run.store.institutions():
            if i["last_seen"] >= seen.get(i["name"], {}).get("last_seen", 0):
                seen[i["name"]] = i
    membership = {m["institution"]: m["status"] for m in coordinator.consortium.memberships()}
    institutions = [
        {"name": name, "status": membership.get(name, "approved"), "online": name in online,
         "num_train_examples": seen.get(name, {}).get("num_train_examples", 0),
         "last_seen": seen.get(name, {}).get("last_seen")}
        for name in sorted(set(seen) | set(membership))
    ]
    return ConsortiumSnapshot(federation=coordinator.config.federation.name, taken_at=time.time(), studies=studies,
                              institutions=institutions,
                              membership_history=consortium.history(kind="membership", limit=100))


def _lineage_entry(version: int, record: bytes) -> dict[str, Any]:
    parsed = _parsed(record)
    return {"version": version, **parsed, "contributors": list(parsed["contributors"])}


@functools.lru_cache(maxsize=4096)
def _parsed(record: bytes) -> dict[str, Any]:
    """Records never change once signed: each is parsed once, not at every refresh (the
    cached dict is copied by `_lineage_entry`, its contributors kept as a tuple)."""
    try:
        r = parse_record(record)
    except LineageError as e:
        return {"round": None, "model_sha256": None, "parent_sha256": None, "contributors": (),
                "aggregator": None, "created_at": None, "problem": e.message}
    return {"round": r["round"], "model_sha256": r["model_sha256"], "parent_sha256": r["parent_sha256"],
            "contributors": tuple(c["institution"] for c in r["contributions"]),
            "aggregator": r["aggregator"].get("name"), "created_at": r["created_at"]}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
