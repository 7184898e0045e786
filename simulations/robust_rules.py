#!/usr/bin/env python
"""Robust rules against poisoned institutions: every strategy against every attack.

Runs `simulations/digits_poisoned.toml` (10 institutions on digits, the last 2
poisoned) once per (attack, strategy), each a real simulation (coordinator and daemons
over gRPC on loopback), plus plain FedAvg without any attack as the reference. Writes
`robust_rules.png` (central test accuracy per round, one panel per attack) and
`robust_rules.json` into a new folder under runs/, and prints the final accuracies.

    .venv/bin/python simulations/robust_rules.py                       # all (about 15 min on 2 cores)
    .venv/bin/python simulations/robust_rules.py --attacks sign_flip --strategies fedavg krum --rounds 5

Bulyan needs n >= 4f + 3 updates: with 10 institutions it runs with f = 1 (it still
assumes fewer attackers than there are); Krum and Multi-Krum run with f = 2.
"""

from __future__ import annotations

import argparse
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fedcollab.config import AttackConfig, Scenario, StrategyConfig, load_config  # noqa: E402
from fedcollab.simulation import run_simulation  # noqa: E402
from fedcollab.simulation._results import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {}, "fedmedian": {}, "fedtrimmedavg": {"trim_fraction": 0.2}, "krum": {"num_malicious": 2},
    "multikrum": {"num_malicious": 2, "to_keep": 4}, "bulyan": {"num_malicious": 1},
}
ATTACKS = ("sign_flip", "scale", "random")
# Noise ten times an honest update's norm mostly averages out over 10 institutions;
# a hundred times does not.
SCALE = {"sign_flip": 10.0, "scale": 10.0, "random": 100.0}


def _variant(base: Scenario, *, strategy: str, attack: str | None, rounds: int | None) -> Scenario:
    sim = base.simulation.model_copy(update={
        "name": f"poisoned-{attack or 'none'}-{strategy}",
        "attack": None if attack is None else AttackConfig(institutions=2, kind=attack, scale=SCALE[attack]),  # type: ignore[arg-type]
    })
    study = base.study.model_copy(update={"strategy": StrategyConfig(name=strategy, **STRATEGIES[strategy]),
                                          **({"rounds": rounds} if rounds else {})})
    return base.model_copy(update={"simulation": sim, "study": study})


def _accuracies(results: dict[str, Any]) -> list[float]:
    return [r["metrics"].get("central_accuracy", float("nan")) for r in results["rounds"] if r["status"] == "committed"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", type=Path, default=HERE / "digits_poisoned.toml")
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    p.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    p.add_argument("--rounds", type=int, default=None, help="override the scenario's rounds")
    p.add_argument("--output", type=Path, default=Path("runs"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    console = Console()
    base = load_config(Scenario, args.scenario)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    folder = args.output / f"{stamp}-robust-rules"
    folder.mkdir(parents=True)
    curves: dict[str, dict[str, list[float]]] = {}
    reference = run_simulation(scenario=_variant(base, strategy="fedavg", attack=None, rounds=args.rounds),
                               output_dir=folder, console=console, insecure=True)
    clean = _accuracies(reference.results)
    for attack in args.attacks:
        curves[attack] = {}
        for strategy in args.strategies:
            console.rule(f"{attack}: {strategy}")
            run = run_simulation(scenario=_variant(base, strategy=strategy, attack=attack, rounds=args.rounds),
                                 output_dir=folder, console=console, insecure=True)
            curves[attack][strategy] = _accuracies(run.results)

    fig, axes = plt.subplots(1, len(args.attacks), figsize=(5.2 * len(args.attacks), 4.2), squeeze=False)
    for ax, attack in zip(axes[0], args.attacks, strict=True):
        ax.plot(range(1, len(clean) + 1), clean, color="black", ls="--", label="fedavg, no attack")
        for strategy, acc in curves[attack].items():
            ax.plot(range(1, len(acc) + 1), acc, marker=".", label=strategy)
        ax.set(title=f"2 of 10 poisoned: {attack} x{SCALE[attack]:g}", xlabel="round",
               ylabel="central test accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "robust_rules.png", dpi=120)
    plt.close(fig)
    write_json({"clean_fedavg": clean, "curves": curves}, folder / "robust_rules.json")

    table = Table(title="final central test accuracy (2 of 10 institutions poisoned)")
    table.add_column("strategy")
    for attack in args.attacks:
        table.add_column(attack, justify="right")
    for strategy in args.strategies:
        table.add_row(strategy, *[f"{curves[a][strategy][-1]:.1%}" if curves[a][strategy] else "-"
                                  for a in args.attacks])
    table.add_row("fedavg, no attack", *[f"{clean[-1]:.1%}"] * len(args.attacks))
    console.print(table)
    console.print(f"plot: {folder / 'robust_rules.png'}")


if __name__ == "__main__":
    main()
