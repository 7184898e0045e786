"""The operators' read-only web pages, each one self-contained HTML document rendered
from a ConsortiumSnapshot:

    /                  the studies, one line each with a link to its page; the
                       institutions; the history of status changes (studies paused,
                       resumed, cancelled, failed; institutions suspended, approved)
    /studies/<name>    one study: its figures, the institutions, its plots, privacy
                       spend and history near the top; then its rounds and its lineage,
                       newest first, PAGE_ROWS to a page (?rounds_page=N, ?lineage_page=N)

No script, no font, no stylesheet from elsewhere: plots are inline SVG drawn here
(_dashboard_chart), and a page reloads itself every few seconds. A page lists at most
PAGE_ROWS rounds and lineage rows, whatever the study's length; the JSON API has them all.

Every string that comes from the snapshot (study, institution and reason texts, all
chosen outside this process) goes through `_e` (html.escape) before it is written.
Links name studies only by names of the shared patterns (fedcollab/_names.py), which
need no escaping in a path; the HTTP side checks them with the same `linkable`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from fedcollab._names import NAME, STUDY_NAME
from fedcollab.coordinator._dashboard_chart import line_chart, nice_ticks, series_of
from fedcollab.coordinator._snapshot import ConsortiumSnapshot, StudySnapshot

__all__ = ["NoSuchStudy", "line_chart", "linkable", "nice_ticks", "render_dashboard", "render_study", "study_path"]

REFRESH_S = 5
PAGE_ROWS = 50  # rounds (attempts) and lineage rows per page, newest first
HISTORY_ROWS = 50  # status changes shown, newest first
STUDIES_PATH = "/studies/"
# Series colours (also what the browser test looks for in the screenshot).
BLUE, ORANGE, GREEN = "#2563eb", "#ea580c", "#16a34a"
ACCURACY_SERIES = (("eval_accuracy", "evaluation accuracy (institutions)", BLUE),
                   ("central_accuracy", "central accuracy (held-out test set)", ORANGE))
LOSS_SERIES = (("train_loss", "training loss", GREEN), ("eval_loss", "evaluation loss", BLUE),
               ("central_loss", "central loss", ORANGE))

_CSS = """
:root { color-scheme: light; --fg: #111827; --muted: #6b7280; --line: #e5e7eb; --card: #f9fafb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: #fff; }
header { padding: 16px 24px; border-bottom: 1px solid var(--line); display: flex; align-items: baseline;
         gap: 16px; flex-wrap: wrap; }
header h1 { margin: 0; font-size: 20px; }
.muted { color: var(--muted); }
main { padding: 8px 24px 32px; }
section { margin: 16px 0 28px; }
h2 { font-size: 18px; margin: 8px 0; display: flex; gap: 10px; align-items: center; }
h3 { font-size: 14px; margin: 18px 0 6px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         background: #e5e7eb; color: #374151; }
.b-running, .b-approved, .b-committed, .b-online { background: #dcfce7; color: #166534; }
.b-paused, .b-queued, .b-pending, .b-open { background: #fef9c3; color: #854d0e; }
.b-cancelled, .b-suspended, .b-failed, .b-abandoned { background: #fee2e2; color: #991b1b; }
.b-finished { background: #dbeafe; color: #1e40af; }
.b-offline { background: #f3f4f6; color: #6b7280; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px;
        min-width: 130px; }
.card .v { font-size: 18px; font-weight: 600; }
.card .k { font-size: 12px; color: var(--muted); }
.plots { display: flex; gap: 16px; flex-wrap: wrap; }
.plot { border: 1px solid var(--line); border-radius: 8px; background: #fff; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { font-weight: 600; color: #374151; background: var(--card); }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 12px; }
.failure { color: #991b1b; font-weight: 600; }
.bar { width: 260px; height: 12px; background: #f3f4f6; border-radius: 6px; overflow: hidden;
       display: inline-block; vertical-align: middle; }
.fill { height: 100%; background: #16a34a; }
.fill.warn { background: #f59e0b; }
.fill.over { background: #dc2626; }
nav.crumbs, header a { font-size: 13px; }
.pager { margin: 6px 0 18px; }
td.note { max-width: 640px; }
"""

class NoSuchStudy(LookupError):
    """The page names a study the coordinator does not have (the HTTP side answers 404)."""


def linkable(name: str) -> bool:
    """A study name a page links to: a submitted study's (STUDY_NAME), or a default
    study's of the common form (NAME). Both are URL-safe as they stand."""
    return bool(STUDY_NAME.fullmatch(name) or NAME.fullmatch(name))


def study_path(name: str) -> str | None:
    return STUDIES_PATH + name if linkable(name) else None


# ---------------------------------------------------------------- pages
def render_dashboard(snapshot: ConsortiumSnapshot) -> str:
    """The landing page: every study in one line, then the institutions and the history."""
    studies = snapshot.studies
    history = sorted([*snapshot.membership_history, *(h for s in studies for h in s.history)],
                     key=lambda h: -float(h.get("at") or 0))
    body = [
        _studies_table(studies),
        _institutions(snapshot),
        _history(history, title="History (studies paused, resumed, ended; institutions suspended, approved)"),
    ]
    return _page(snapshot, title=snapshot.federation, crumbs="", body=body,
                 summary=f"{len(studies)} {'study' if len(studies) == 1 else 'studies'}")


def render_study(snapshot: ConsortiumSnapshot, *, name: str, rounds_page: int = 1, lineage_page: int = 1) -> str:
    """One study's page; NoSuchStudy when the snapshot has none of that name. Pages past
    the last show the last."""
    study = next((s for s in snapshot.studies if s.name == name), None)
    if study is None:
        raise NoSuchStudy(name)
    history = sorted([*study.history, *snapshot.membership_history], key=lambda h: -float(h.get("at") or 0))
    rounds, rounds_page, rounds_pages = _paged(sorted(study.rounds, key=lambda r: (r["round"], r["attempt"]),
                                                      reverse=True), rounds_page)
    lineage, lineage_page, lineage_pages = _paged(sorted(study.lineage, key=lambda e: e["version"], reverse=True),
                                                  lineage_page)
    committed = [r for r in study.rounds if r["status"] == "committed"]
    body = [
        f'<h2><span class="study-name">{_e(study.name)}</span> {_badge(study.status)}</h2>',
        f'<p class="failure">{_e(study.failure)}</p>' if study.failure else "",
        _cards(study),
        _institutions(snapshot),
        "<h3>Model quality</h3>",
        '<div class="plots">',
        line_chart("Accuracy", series_of(committed, ACCURACY_SERIES), y_min=0.0, y_max=1.0),
        line_chart("Loss", series_of(committed, LOSS_SERIES), y_min=0.0),
        "</div>",
        _privacy(study),
        _history(history, title="History (this study's status; institutions suspended, approved)"),
        _failures(study.failures),
        _rounds_table(rounds, total=len(study.rounds)),
        _pager(name, "rounds_page", rounds_page, rounds_pages, other=("lineage_page", lineage_page)),
        _lineage(lineage, total=len(study.lineage)),
        _pager(name, "lineage_page", lineage_page, lineage_pages, other=("rounds_page", rounds_page)),
    ]
    return _page(snapshot, title=f"{study.name} ({snapshot.federation})", body=body, summary="study",
                 crumbs='<a href="/">&larr; all studies</a>')


def _page(snapshot: ConsortiumSnapshot, *, title: str, crumbs: str, body: Sequence[str], summary: str) -> str:
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fedcollab: {_e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<header><h1>{_e(snapshot.federation)}</h1>{crumbs}<span class="muted">{_e(summary)} &middot; snapshot '
        f"{_e(_utc(snapshot.taken_at))} &middot; refreshes every {REFRESH_S} s</span></header>",
        "<main>",
        *body,
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _paged(rows: Sequence[dict[str, Any]], page: int) -> tuple[list[dict[str, Any]], int, int]:
    """The rows of page `page` (1 = the first PAGE_ROWS), the page shown and the page count."""
    pages = max(1, math.ceil(len(rows) / PAGE_ROWS))
    page = min(max(1, page), pages)
    return list(rows[(page - 1) * PAGE_ROWS:page * PAGE_ROWS]), page, pages


def _pager(name: str, key: str, page: int, pages: int, *, other: tuple[str, int]) -> str:
    if pages <= 1:
        return ""
    path = study_path(name) or ""

    def link(to: int, text: str) -> str:
        query = "&amp;".join(f"{k}={v}" for k, v in sorted({key: to, other[0]: other[1]}.items()) if v > 1)
        return f'<a href="{_e(path)}{"?" + query if query else ""}">{text}</a>'

    newer = link(page - 1, "&larr; newer") if page > 1 else '<span class="muted">&larr; newer</span>'
    older = link(page + 1, "older &rarr;") if page < pages else '<span class="muted">older &rarr;</span>'
    return f'<p class="pager" data-key="{key}">{newer} &middot; page {page} of {pages} &middot; {older}</p>'


# ---------------------------------------------------------------- sections
def _studies_table(studies: Sequence[StudySnapshot]) -> str:
    if not studies:
        return '<section><h2>Studies</h2><p class="muted">no study yet</p></section>'
    rows = []
    for s in studies:
        committed = sum(r["status"] == "committed" for r in s.rounds)
        version = max((e["version"] for e in s.lineage), default=None)
        path = study_path(s.name)
        shown = f'<a class="study-link" href="{_e(path)}">{_e(s.name)}</a>' if path else _e(s.name)
        change = s.history[0] if s.history else None
        since = f"{_utc(float(change['at']))}: {change.get('note') or change['status']}" if change else ""
        rows.append(f"<tr><td>{shown}</td><td>{_badge(s.status)}</td>"
                    f'<td class="n">{committed} / {s.total_rounds}</td>'
                    f'<td class="n">{max((r["round"] for r in s.rounds), default=0)}</td>'
                    f'<td class="n">{"v" + str(version) if version is not None else ""}</td>'
                    f'<td class="n">{len(s.online)}</td><td>{_e(since)}</td>'
                    f'<td class="failure">{_e(s.failure or "")}</td></tr>')
    return ('<section><h2>Studies</h2><table class="studies"><thead><tr><th>study</th><th>status</th>'
            "<th>rounds committed</th><th>current round</th><th>model</th><th>online</th><th>last change</th>"
            "<th></th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></section>")


def _cards(s: StudySnapshot) -> str:
    committed = [r for r in s.rounds if r["status"] == "committed"]
    latest_version = max((e["version"] for e in s.lineage), default=None)
    cards = [
        ("rounds committed", f"{len(committed)} / {s.total_rounds}"),
        ("current round", str(max((r["round"] for r in s.rounds), default=0))),
        ("model version", f"v{latest_version}" if latest_version is not None else "none"),
        ("institutions online", str(len(s.online))),
        ("received / sent", f"{_bytes(s.bytes_in)} / {_bytes(s.bytes_out)}"),
        ("failed participations", str(sum(s.failures.values()))),
    ]
    return ('<div class="cards">' + "".join(f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}'
                                            "</div></div>" for k, v in cards) + "</div>")


def _rounds_table(shown: Sequence[dict[str, Any]], *, total: int) -> str:
    if not shown:
        return '<h3>Rounds</h3><p class="muted">no round has opened yet</p>'
    head = ("round", "attempt", "status", "model", "updates", "examples", "train loss", "eval loss", "eval acc",
            "central acc", "duration", "reason")
    rows = []
    for r in shown:
        m = r.get("metrics") or {}
        duration = (r["closed_at"] - r["opened_at"]) if r.get("closed_at") is not None else None
        cells = [
            _num(r["round"]), _num(r["attempt"]), f"<td>{_badge(r['status'])}</td>",
            _num(f"v{r['model_version']}" if r.get("model_version") is not None else ""),
            _num(_int(m.get("num_updates"))), _num(_int(m.get("num_examples"))),
            _num(_fmt(m.get("train_loss"))), _num(_fmt(m.get("eval_loss"))), _num(_fmt(m.get("eval_accuracy"))),
            _num(_fmt(m.get("central_accuracy"))), _num(f"{duration:.1f} s" if duration is not None else ""),
            f"<td>{_e(r.get('reason') or '')}</td>",
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<h3>Rounds ({total} attempts, newest first)</h3><table class=\"rounds\"><thead><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _privacy(s: StudySnapshot) -> str:
    latest: dict[str, dict[str, Any]] = {}
    for p in s.privacy:  # in round order: the last report wins
        latest[p["institution"]] = p
    if not latest:
        return ""
    rows = []
    for name, p in sorted(latest.items()):
        eps, budget = _float(p.get("epsilon")), _float(p.get("budget_epsilon"))
        if budget and budget > 0 and eps is not None:
            share = eps / budget
            level = "over" if share >= 1 else "warn" if share >= 0.75 else ""
            bar = (f'<span class="bar" title="{share:.0%} of the budget"><span class="fill {level}" '
                   f'style="display:block;width:{min(share, 1.0) * 100:.1f}%"></span></span>')
        else:
            bar = '<span class="muted">no budget reported</span>'
        rows.append(f"<tr><td>{_e(name)}</td><td>{bar}</td><td class=\"n\">{_fmt(eps, 3)}</td>"
                    f"<td class=\"n\">{_fmt(budget, 3)}</td><td class=\"n\">{_e(_num_text(p.get('round')))}</td>"
                    f"<td>{_e(p.get('accountant') or '')}</td></tr>")
    return ("<h3>Privacy spend (reported by institutions; their ledgers are authoritative)</h3>"
            "<table class=\"privacy\"><thead><tr><th>institution</th><th>epsilon against budget</th><th>epsilon</th>"
            "<th>budget</th><th>last round</th><th>accountant</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")


def _failures(failures: dict[str, int]) -> str:
    if not failures:
        return ""
    rows = "".join(f"<tr><td><code>{_e(reason)}</code></td><td class=\"n\">{n}</td></tr>"
                   for reason, n in sorted(failures.items(), key=lambda kv: (-kv[1], kv[0])))
    return ("<h3>Failed participations (since the study began)</h3><table class=\"failures\"><thead><tr>"
            f"<th>reason</th><th>count</th></tr></thead><tbody>{rows}</tbody></table>")


def _lineage(shown: Sequence[dict[str, Any]], *, total: int) -> str:
    if not shown:
        return ""
    rows = []
    for e in shown:
        problem = e.get("problem")
        contributors = ", ".join(e.get("contributors") or []) or ("(initial model)" if e["version"] == 0 else "")
        rows.append(
            f"<tr><td class=\"n\">v{_e(e['version'])}</td><td class=\"n\">{_e(_num_text(e.get('round')))}</td>"
            f"<td><code>{_e((e.get('model_sha256') or '')[:12])}</code></td>"
            f"<td><code>{_e((e.get('parent_sha256') or '')[:12]) or '&mdash;'}</code></td>"
            f"<td>{_e(e.get('aggregator') or '')}</td><td>{_e(contributors)}</td>"
            f"<td>{_e(e.get('created_at') or '')}</td>"
            + (f"<td class=\"failure\">{_e(problem)}</td>" if problem else "<td></td>") + "</tr>")
    return (f"<h3>Lineage ({total} signed model versions, newest first)</h3><table class=\"lineage\"><thead><tr>"
            "<th>version</th><th>round</th><th>sha256</th><th>parent</th><th>aggregator</th><th>contributors</th>"
            "<th>created</th><th></th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _institutions(snapshot: ConsortiumSnapshot) -> str:
    if not snapshot.institutions:
        return '<section><h3>Institutions</h3><p class="muted">no institution has joined yet</p></section>'
    rows = []
    for i in sorted(snapshot.institutions, key=lambda i: str(i["name"])):
        online = bool(i.get("online"))
        last_seen = _float(i.get("last_seen"))
        seen = f"{_utc(last_seen)} ({_ago(snapshot.taken_at - last_seen)})" if last_seen else ""
        rows.append(f"<tr><td class=\"inst\">{_e(i['name'])}</td><td>{_badge(i.get('status') or 'approved')}</td>"
                    f"<td>{_badge('online' if online else 'offline')}</td>"
                    f"<td class=\"n\">{_e(_int(i.get('num_train_examples')))}</td><td>{_e(seen)}</td></tr>")
    return ("<section><h3>Institutions</h3><table class=\"institutions\"><thead><tr><th>institution</th>"
            "<th>membership</th><th>connection</th><th>training examples</th><th>last joined</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></section>")


def _history(rows: Sequence[dict[str, Any]], *, title: str) -> str:
    if not rows:
        return ""
    shown = rows[:HISTORY_ROWS]
    lines = []
    for h in shown:
        what = "study" if h.get("kind") == "study" else "institution"
        lines.append(f"<tr><td>{_e(_utc(float(h.get('at') or 0)))}</td><td class=\"muted\">{what}</td>"
                     f"<td>{_e(h.get('subject') or '')}</td><td>{_badge(h.get('status') or '')}</td>"
                     f"<td class=\"note\">{_e(h.get('note') or '')}</td><td>{_e(h.get('changed_by') or '')}</td></tr>")
    more = (f'<p class="muted">the latest {len(shown)} of {len(rows)} changes; /api/snapshot.json has them</p>'
            if len(rows) > len(shown) else "")
    return (f"<h3>{_e(title)}</h3><table class=\"history\"><thead><tr><th>when</th><th></th><th>name</th>"
            "<th>status</th><th>why</th><th>by</th></tr></thead><tbody>" + "".join(lines) + "</tbody></table>" + more)


# ---------------------------------------------------------------- formatting
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _badge(status: str) -> str:
    css = "".join(ch for ch in str(status).lower() if ch.isalnum())  # a class name, whatever the status holds
    return f'<span class="badge b-{css}">{_e(status)}</span>'


def _num(value: Any) -> str:
    return f'<td class="n">{_e(value)}</td>'


def _num_text(value: Any) -> str:
    return "" if value is None else str(value)


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> str:
    v = _float(value)
    return f"{v:,.0f}" if v is not None and math.isfinite(v) else ""


def _fmt(value: Any, digits: int = 4) -> str:
    v = _float(value)
    return f"{v:.{digits}f}" if v is not None else ""


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    if s < 172800:
        return f"{s // 3600} h ago"
    return f"{s // 86400} days ago"
