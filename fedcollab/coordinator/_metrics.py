"""Prometheus metrics of a ConsortiumSnapshot, in the text exposition format 0.0.4
(https://prometheus.io/docs/instrumenting/exposition_formats/), written by hand: the
format is a few lines of grammar, not worth a dependency.

Every family has its # HELP and # TYPE lines and its samples together; per-study
families carry the label `study`. Label values come from outside (study and
institution names, rejection reasons) and are escaped as the format requires.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Every status a study can have, "failed" included: an alert on
# fedcollab_study_status{status="failed"} == 1 needs the sample to exist.
from fedcollab.coordinator._consortium import STUDY_STATUSES
from fedcollab.coordinator._snapshot import ConsortiumSnapshot, StudySnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; a round of a small model takes a few, one of a large model over a WAN hours.
DEFAULT_DURATION_BUCKETS: tuple[float, ...] = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
MEMBERSHIP_STATUSES = ("approved", "pending", "suspended")


@dataclass
class _Family:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)  # (suffix, labels, value)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append((suffix, labels, value))

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for suffix, labels, value in self.samples:
            text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
            lines.append(f"{self.name}{suffix}{{{text}}} {format_value(value)}" if text
                         else f"{self.name}{suffix} {format_value(value)}")
        return lines


def render_metrics(snapshot: ConsortiumSnapshot, *,
                   round_duration_buckets: Sequence[float] = DEFAULT_DURATION_BUCKETS) -> str:
    """The snapshot as a Prometheus scrape. `round_duration_buckets`: the upper bounds
    (seconds, increasing) of the round-duration histogram; +Inf is added."""
    buckets = [float(b) for b in round_duration_buckets]
    if not buckets or any(not math.isfinite(b) or b <= 0 for b in buckets) or buckets != sorted(set(buckets)):
        raise ValueError(f"round_duration_buckets must be positive, finite and increasing; got {list(buckets)}")
    families = [
        _Family("fedcollab_study_status", "gauge",
                f"1 for the study's current status, 0 for the others ({', '.join(STUDY_STATUSES)})."),
        _Family("fedcollab_study_rounds", "gauge", "Rounds the study is configured to run."),
        _Family("fedcollab_current_round", "gauge", "Number of the latest round opened (0 before the first)."),
        _Family("fedcollab_model_version", "gauge", "Latest committed (signed) model version."),
        _Family("fedcollab_rounds_committed_total", "counter", "Rounds committed."),
        _Family("fedcollab_rounds_failed_total", "counter", "Round attempts that failed (quorum, aggregation, ...)."),
        _Family("fedcollab_rounds_abandoned_total", "counter", "Round attempts left open by a coordinator stop."),
        _Family("fedcollab_round_duration_seconds", "histogram",
                "Time from opening to commit of committed rounds (evaluation not included)."),
        _Family("fedcollab_received_bytes_total", "counter",
                "Bytes received from institutions (kept across restarts)."),
        _Family("fedcollab_sent_bytes_total", "counter", "Bytes sent to institutions (kept across restarts)."),
        _Family("fedcollab_institutions_connected", "gauge", "Institutions holding a live session."),
        _Family("fedcollab_participations_failed_total", "counter",
                "Participations that failed (uploads rejected, deadlines missed, ...), by reason "
                "(kept across restarts)."),
        _Family("fedcollab_epsilon_spent", "gauge", "Latest DP epsilon an institution reported having spent."),
        _Family("fedcollab_epsilon_budget", "gauge", "DP epsilon budget an institution reported."),
    ]
    by_name = {f.name: f for f in families}
    for study in snapshot.studies:
        _study_samples(study, by_name, buckets)
    membership = _Family("fedcollab_institutions", "gauge",
                         "Institutions known to the consortium, by membership status.")
    counts = Counter(str(i.get("status", "approved")) for i in snapshot.institutions)
    for status in [*MEMBERSHIP_STATUSES, *sorted(set(counts) - set(MEMBERSHIP_STATUSES))]:
        membership.add(counts.get(status, 0), status=status)
    families.append(membership)
    lines = [line for f in families for line in f.render()]
    return "\n".join(lines) + "\n"


def _study_samples(study: StudySnapshot, families: Mapping[str, _Family], buckets: list[float]) -> None:
    s = study.name
    known = [*STUDY_STATUSES, *([study.status] if study.status not in STUDY_STATUSES else [])]
    for status in known:
        families["fedcollab_study_status"].add(1 if study.status == status else 0, study=s, status=status)
    families["fedcollab_study_rounds"].add(study.total_rounds, study=s)
    families["fedcollab_current_round"].add(max((r["round"] for r in study.rounds), default=0), study=s)
    families["fedcollab_model_version"].add(max((e["version"] for e in study.lineage), default=0), study=s)
    statuses = Counter(r["status"] for r in study.rounds)
    families["fedcollab_rounds_committed_total"].add(statuses["committed"], study=s)
    families["fedcollab_rounds_failed_total"].add(statuses["failed"], study=s)
    families["fedcollab_rounds_abandoned_total"].add(statuses["abandoned"], study=s)
    durations = [max(0.0, r["closed_at"] - r["opened_at"]) for r in study.rounds
                 if r["status"] == "committed" and r.get("closed_at") is not None and r.get("opened_at") is not None]
    histogram = families["fedcollab_round_duration_seconds"]
    for bound in buckets:
        histogram.add(sum(d <= bound for d in durations), "_bucket", study=s, le=format_value(bound))
    histogram.add(len(durations), "_bucket", study=s, le="+Inf")
    histogram.add(sum(durations), "_sum", study=s)
    histogram.add(len(durations), "_count", study=s)
    families["fedcollab_received_bytes_total"].add(study.bytes_in, study=s)
    families["fedcollab_sent_bytes_total"].add(study.bytes_out, study=s)
    families["fedcollab_institutions_connected"].add(len(study.online), study=s)
    for reason, n in sorted(study.failures.items()):
        families["fedcollab_participations_failed_total"].add(n, study=s, reason=reason)
    latest = {p["institution"]: p for p in study.privacy}  # rows are in round order: the last one wins
    for institution, p in sorted(latest.items()):
        families["fedcollab_epsilon_spent"].add(float(p.get("epsilon", 0.0)), study=s, institution=institution)
        families["fedcollab_epsilon_budget"].add(float(p.get("budget_epsilon", 0.0)), study=s, institution=institution)


def escape_label_value(value: str) -> str:
    """Backslash, double quote and line feed are the three characters the format escapes."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)
