"""Several runs side by side: final accuracy against the epsilon each spent."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fedcollab.simulation._results import write_json  # noqa: E402

if TYPE_CHECKING:
    from fedcollab.simulation._run import SimulationResult


def plot_comparison(results: Sequence[SimulationResult], *, output_dir: Path) -> Path:
    """Writes comparison.png and comparison.json into a new folder under output_dir.
    Runs without sample-level DP are drawn as horizontal reference lines."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    folder = output_dir / f"{stamp}-comparison"
    folder.mkdir(parents=True, exist_ok=False)
    rows = []
    for r in results:
        ledgers = r.results["privacy"]["institutions"]
        spent = max((led["spent_epsilon"] for led in ledgers.values()), default=None)
        rows.append({"name": r.results["scenario"]["simulation"]["name"], "run_dir": str(r.run_dir),
                     "epsilon": spent, "accuracy": r.final_accuracy})
    fig = comparison_figure(rows)
    fig.savefig(folder / "comparison.png", dpi=120)
    plt.close(fig)
    write_json({"runs": rows}, folder / "comparison.json")
    return folder / "comparison.png"


def comparison_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """Final accuracy against epsilon, a labelled point per private run. Each label
    sits on the side of its point toward the middle of the axes, with room kept at
    the edges: a lone point (or one at an edge of the range, under a reference line)
    would otherwise push its label across the axis and out of the picture."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    private = sorted((row for row in rows if row["epsilon"] is not None and row["accuracy"] is not None),
                     key=lambda row: row["epsilon"])
    if private:
        ax.plot([p["epsilon"] for p in private], [p["accuracy"] for p in private], marker="o")
    for row in rows:
        if row["epsilon"] is None and row["accuracy"] is not None:
            ax.axhline(row["accuracy"], ls="--", color="gray", label=f"{row['name']} (no DP): {row['accuracy']:.1%}")
    ax.margins(x=0.15, y=0.15)
    if private:
        xs = [p["epsilon"] for p in private]
        if max(xs) - min(xs) < 1e-9:  # one epsilon: matplotlib's own span of a lone x is a sliver
            half = max(abs(xs[0]) * 0.25, 0.5)
            ax.set_xlim(xs[0] - half, xs[0] + half)
        ax.autoscale_view()
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for p in private:
            right = p["epsilon"] > (x0 + x1) / 2
            above = p["accuracy"] < (y0 + y1) / 2
            ax.annotate(f"{p['accuracy']:.1%}", (p["epsilon"], p["accuracy"]), textcoords="offset points",
                        xytext=(-6 if right else 6, 6 if above else -6), ha="right" if right else "left",
                        va="bottom" if above else "top", fontsize=8)
    ax.set(xlabel="epsilon spent per institution (delta as configured)", ylabel="final global test accuracy",
           title="Accuracy against epsilon")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
