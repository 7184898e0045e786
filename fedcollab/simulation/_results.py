"""Simulation results: a JSON file and a plot of accuracy and loss per round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

from fedcollab._dp_metrics import federation_dp

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
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
            losses = [r["metrics"].get(loss_key, float("nan")) for r in committed]
            ax_loss.plot(xs, losses, marker="o", ms=3, label=label)
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


def plot_privacy(results: dict[str, Any], path: Path, *, title: str) -> None:
    fig = privacy_figure(results, title=title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def privacy_figure(results: dict[str, Any], *, title: str) -> Figure:
    """Left: the global model's test accuracy, once, against the epsilon spent so far:
    the most any institution spent (institutions' spends differ with their data), with
    the range across institutions shaded where they differ, and federation-level under
    DP-FedAvg. Right: each institution's spend per round against its budget;
    institutions with the same spend round by round share one line (with IID
    partitions of equal size they all do: drawn one per institution, they hid each
    other)."""
    committed = {r["round"]: r["metrics"] for r in results["rounds"] if r["status"] == "committed"}
    spend: dict[str, dict[int, float]] = {}
    for p in results["privacy"]["per_round"]:
        if p["round"] in committed:
            spend.setdefault(p["institution"], {})[p["round"]] = p["epsilon"]
    fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(11, 4.2))
    rounds = sorted({r for by_round in spend.values() for r in by_round})
    if rounds:
        most = [max(s[r] for s in spend.values() if r in s) for r in rounds]
        least = [min(s[r] for s in spend.values() if r in s) for r in rounds]
        accuracy = [committed[r].get("central_accuracy", float("nan")) for r in rounds]
        ax_acc.plot(most, accuracy, marker="o", ms=3, color="tab:blue",
                    label="global model (largest institution epsilon)" if len(spend) > 1 else "global model")
        if any(lo != hi for lo, hi in zip(least, most, strict=True)):
            ax_acc.fill_betweenx(accuracy, least, most, color="tab:blue", alpha=0.15,
                                 label="epsilon range across institutions")
    for label, curve in _shared_curves(spend):
        ax_eps.plot([r for r, _ in curve], [e for _, e in curve], marker="o", ms=3, label=label)
    central = [(r, dp) for r, m in sorted(committed.items()) if (dp := federation_dp(m)) is not None]
    if central:
        label = f"federation ({central[-1][1][2]})"
        ax_acc.plot([dp[0] for _, dp in central],
                    [committed[r].get("central_accuracy", float("nan")) for r, _ in central],
                    ls="--", color="black", label=label)
        ax_eps.plot([r for r, _ in central], [dp[0] for _, dp in central], ls="--", color="black", label=label)
    budgets = {led["budget_epsilon"] for led in results["privacy"]["institutions"].values()}
    for b in sorted(budgets):
        ax_eps.axhline(b, color="red", alpha=0.4, lw=1)
        ax_eps.annotate(f"budget {b:g}", (0.01, b), xycoords=("axes fraction", "data"), va="bottom", color="red",
                        fontsize=8)
    ax_acc.set(xlabel="epsilon spent (cumulative)", ylabel="global test accuracy", title="Accuracy against epsilon")
    ax_eps.set(xlabel="round", ylabel="epsilon spent (cumulative)", title="Privacy spend per round")
    ax_eps.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_acc, ax_eps):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _shared_curves(spend: dict[str, dict[int, float]]) -> list[tuple[str, list[tuple[int, float]]]]:
    """One (label, [(round, epsilon), ...]) per distinct spend curve, naming the
    institutions on it (the first few, and how many)."""
    groups: dict[tuple[tuple[int, float], ...], list[str]] = {}
    for name, by_round in sorted(spend.items()):
        groups.setdefault(tuple(sorted(by_round.items())), []).append(name)
    out = []
    for curve, names in groups.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        out.append((shown + (f" ({len(names)}, same spend)" if len(names) > 1 else ""), list(curve)))
    return out
