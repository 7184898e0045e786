"""Inline SVG line charts for the operators' page: drawn here, no script and nothing
fetched. Labels come from the page's own code; every one is escaped all the same."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

MAX_MARKERS = 120  # points per series drawn with a marker


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _tick(v: float) -> str:
    return f"{v:g}"


def series_of(rounds: Iterable[dict[str, Any]], wanted: Sequence[tuple[str, str, str]]
              ) -> list[tuple[str, str, list[tuple[float, float]]]]:
    """(label, colour, points) of each wanted (metric key, label, colour) the rounds have."""
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
        # A marker (with its tooltip) per round while they can be told apart; beyond, the
        # line alone: a long study's page stays light.
        out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{c}"><title>{_e(label)}, round '
                   f"{_tick(x)}: {y:.4g}</title></circle>" for x, y in (pts if len(pts) <= MAX_MARKERS else ()))
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
