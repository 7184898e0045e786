"""Simulation results: a JSON file and a plot of accuracy and loss per round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def plot_rounds(rounds: list[dict[str, Any]], path: Path, *, title: str) -> None:
    committed = [r for r in rounds if r["status"] == "committed"]
    xs = [r["round"] for r in committed]
    series = {
        "central test": ("central_accuracy", "central_loss"),
        "federated eval": ("eval_accuracy", "eval_loss"),
    }
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, (acc_key, loss_key) in series.items():
        if any(acc_key in r["metrics"] for r in committed):
            ax_acc.plot(xs, [r["metrics"].get(acc_key, float("nan")) for r in committed], marker="o", ms=3, label=label)
            ax_loss.plot(xs, [r["metrics"].get(loss_key, float("nan")) for r in committed], marker="o", ms=3, label=label)
    if any("train_loss" in r["metrics"] for r in committed):
        ax_loss.plot(xs, [r["metrics"].get("train_loss", float("nan")) for r in committed], marker="o", ms=3,
                     label="local training")
    ax_acc.set(xlabel="round", ylabel="accuracy", title="Accuracy")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
