"""The operators' read-only web page: one self-contained HTML document rendered from a
ConsortiumSnapshot. No script, no font, no stylesheet from elsewhere: plots are inline
SVG drawn here, and the page reloads itself every few seconds.

Every string that comes from the snapshot (study, institution and reason texts, all
chosen outside this process) goes through `_e` (html.escape) before it is written.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from fedcollab.coordinator._snapshot import ConsortiumSnapshot, StudySnapshot

REFRESH_S = 5
MAX_ROUND_ROWS = 100  # latest first; the JSON API has them all
MAX_LINEAGE_ROWS = 30
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
"""


def render_dashboard(snapshot: ConsortiumSnapshot) -> str:
    """The whole page, as text."""
    studies = snapshot.studies
    nav = " ".join(f'<a href="#study-{i}">{_e(s.name)}</a> {_badge(s.status)}' for i, s in enumerate(studies))
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fedcollab: {_e(snapshot.federation)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<header><h1>{_e(snapshot.federation)}</h1><span class="muted">{len(studies)} '
        f"{'study' if len(studies) == 1 else 'studies'} &middot; snapshot {_e(_utc(snapshot.taken_at))} "
        f"&middot; refreshes every {REFRESH_S} s</span></header>",
        "<main>",
        f"<nav>{nav}</nav>" if len(studies) > 1 else "",
        *(_study(i, s, snapshot.taken_at) for i, s in enumerate(studies)),
        _institutions(snapshot),
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------- sections
def _study(index: int, s: StudySnapshot, now: float) -> str:
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
    out = [
        f'<section class="study" id="study-{index}">',
        f'<h2><span class="study-name">{_e(s.name)}</span> {_badge(s.status)}</h2>',
        f'<p class="failure">{_e(s.failure)}</p>' if s.failure else "",
        '<div class="cards">' + "".join(f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div>'
                                        "</div>" for k, v in cards) + "</div>",
        "<h3>Model quality</h3>",
        '<div class="plots">',
        line_chart("Accuracy", _series(committed, ACCURACY_SERIES), y_min=0.0, y_max=1.0),
        line_chart("Loss", _series(committed, LOSS_SERIES), y_min=0.0),
        "</div>",
        _rounds_table(s.rounds),
        _privacy(s),
        _failures(s.failures),
        _lineage(s.lineage),
        "</section>",
    ]
    return "\n".join(p for p in out if p)


def _rounds_table(rounds: Sequence[dict[str, Any]]) -> str:
    if not rounds:
        return '<h3>Rounds</h3><p class="muted">no round has opened yet</p>'
    shown = list(reversed(rounds))[:MAX_ROUND_ROWS]
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
    more = f'<p class="muted">latest {MAX_ROUND_ROWS} of {len(rounds)} attempts</p>' if len(rounds) > len(shown) else ""
    return ("<h3>Rounds</h3><table class=\"rounds\"><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>" + more)


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
    return ("<h3>Failed participations since the coordinator started</h3><table class=\"failures\"><thead><tr>"
            f"<th>reason</th><th>count</th></tr></thead><tbody>{rows}</tbody></table>")


def _lineage(lineage: Sequence[dict[str, Any]]) -> str:
    if not lineage:
        return ""
    shown = sorted(lineage, key=lambda e: e["version"], reverse=True)[:MAX_LINEAGE_ROWS]
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
    return ("<h3>Lineage (signed model versions, latest first)</h3><table class=\"lineage\"><thead><tr>"
            "<th>version</th><th>round</th><th>sha256</th><th>parent</th><th>aggregator</th><th>contributors</th>"
            "<th>created</th><th></th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _institutions(snapshot: ConsortiumSnapshot) -> str:
    if not snapshot.institutions:
        return '<section><h2>Institutions</h2><p class="muted">no institution has joined yet</p></section>'
    rows = []
    for i in sorted(snapshot.institutions, key=lambda i: str(i["name"])):
        online = bool(i.get("online"))
        last_seen = _float(i.get("last_seen"))
        seen = f"{_utc(last_seen)} ({_ago(snapshot.taken_at - last_seen)})" if last_seen else ""
        rows.append(f"<tr><td class=\"inst\">{_e(i['name'])}</td><td>{_badge(i.get('status') or 'approved')}</td>"
                    f"<td>{_badge('online' if online else 'offline')}</td>"
                    f"<td class=\"n\">{_e(_int(i.get('num_train_examples')))}</td><td>{_e(seen)}</td></tr>")
    return ("<section><h2>Institutions</h2><table class=\"institutions\"><thead><tr><th>institution</th>"
            "<th>membership</th><th>connection</th><th>training examples</th><th>last joined</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></section>")


# ---------------------------------------------------------------- plots
def _series(rounds: Iterable[dict[str, Any]], wanted: Sequence[tuple[str, str, str]]
            ) -> list[tuple[str, str, list[tuple[float, float]]]]:
    out = []
    for key, label, colour in wanted:
        points = [(float(r["round"]), float(r["metrics"][key])) for r in rounds
                  if isinstance((r.get("metrics") or {}).get(key), (int, float)) and math.isfinite(r["metrics"][key])]
        if points:
            out.append((label, colour, sorted(points)))
    return out


def line_chart(title: str, series: Sequence[tuple[str, str, Sequence[tuple[float, float]]]], *,
               y_min: float | None = None, y_max: float | None = None, width: int = 560, height: int = 280) -> str:
    """An inline SVG line chart: `series` are (label, colour, [(x, y), ...]); x is the
    round. The y axis spans [y_min, y_max] when given, else the data (padded)."""
    left, right, top, bottom = 52, 16, 44, 36
    pw, ph = width - left - right, height - top - bottom
    out = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
           f'<text x="{left}" y="18" font-size="14" font-weight="600" fill="#111827">{_e(title)}</text>']
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts]
    if not xs:
        out.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" font-size="13" '
                   'fill="#6b7280">no data yet</text></svg>')
        return "".join(out)
    lo = min(ys) if y_min is None else min(y_min, min(ys))
    hi = max(ys) if y_max is None else max(y_max, max(ys))
    if y_max is None:  # headroom above the data
        hi += (hi - lo) * 0.1 if hi > lo else 1.0
    ticks = nice_ticks(lo, hi)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    x0, x1 = min(xs), max(xs)
    if x0 == x1:
        x0, x1 = x0 - 1, x1 + 1

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - lo) / (hi - lo) * ph

    for t in ticks:  # horizontal grid and y labels
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e5e7eb"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" font-size="11" '
                   f'fill="#6b7280">{_tick(t)}</text>')
    rounds = sorted(set(xs))
    step = max(1, math.ceil(len(rounds) / 10))
    for x in rounds[::step]:
        out.append(f'<text x="{px(x):.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11" '
                   f'fill="#6b7280">{_tick(x)}</text>')
    out.append(f'<text x="{left + pw / 2:.0f}" y="{height - 4}" text-anchor="middle" font-size="11" '
               'fill="#6b7280">round</text>')
    out.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#9ca3af"/>'
               f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#9ca3af"/>')
    lx = left
    for label, colour, pts in series:
        c = _e(colour)
        out.append(f'<rect x="{lx}" y="26" width="10" height="10" fill="{c}"/>'
                   f'<text x="{lx + 14}" y="35" font-size="11" fill="#374151">{_e(label)}</text>')
        lx += 22 + 6 * len(label)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline class="series" points="{path}" fill="none" stroke="{c}" stroke-width="2.5" '
                   'stroke-linejoin="round"/>')
        out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{c}"><title>{_e(label)}, round '
                   f"{_tick(x)}: {y:.4g}</title></circle>" for x, y in pts)
    out.append("</svg>")
    return "".join(out)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round-numbered ticks covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1 if math.isfinite(lo) else 1.0
        lo = lo if math.isfinite(lo) else 0.0
    raw = (hi - lo) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step + 1e-9)
    ticks = [round((first + i) * step, 12) for i in range(2)]
    while ticks[-1] < hi - step * 1e-9 and len(ticks) < 50:  # up to the first tick at or above hi
        ticks.append(round((first + len(ticks)) * step, 12))
    return ticks


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


def _tick(v: float) -> str:
    return f"{v:g}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    if s < 172800:
        return f"{s // 3600} h ago"
    return f"{s // 86400} days ago"
