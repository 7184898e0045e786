"""Several runs side by side: final accuracy against the epsilon each spent."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedcollab.simulation._results import write_json  # noqa: E402

if TYPE_CHECKING:
    from fedcollab.simulation._run import SimulationResult


def plot_comparison(results: Sequence[SimulationResult], *, output_dir: Path) -> Path:
    """Writes comparison.png and comparison.json into a new folder under output_dir.
    Runs without sample-level DP are drawn as horizontal reference lines."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = output_dir / f"{stamp}-comparison"
    folder.mkdir(parents=True, exist_ok=False)
    rows = []
    for r in results:
        ledgers = r.results["privacy"]["institutions"]
        spent = max((led["spent_epsilon"] for led in ledgers.values()), default=None)
        rows.append({"name": r.results["scenario"]["simulation"]["name"], "run_dir": str(r.run_dir),
                     "epsilon": spent, "accuracy": r.final_accuracy})
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    private = sorted((row for row in rows if row["epsilon"] is not None and row["accuracy"] is not None),
                     key=lambda row: row["epsilon"])
    if private:
        ax.plot([p["epsilon"] for p in private], [p["accuracy"] for p in private], marker="o")
        for p in private:
            ax.annotate(f"{p['accuracy']:.1%}", (p["epsilon"], p["accuracy"]), textcoords="offset points",
                        xytext=(4, -12), fontsize=8)
    for row in rows:
        if row["epsilon"] is None and row["accuracy"] is not None:
            ax.axhline(row["accuracy"], ls="--", color="gray", label=f"{row['name']} (no DP): {row['accuracy']:.1%}")
    ax.set(xlabel="epsilon spent per institution (delta as configured)", ylabel="final global test accuracy",
           title="Accuracy against epsilon")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "comparison.png", dpi=120)
    plt.close(fig)
    write_json({"runs": rows}, folder / "comparison.json")
    return folder / "comparison.png"
