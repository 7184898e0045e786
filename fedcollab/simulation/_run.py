"""A whole federation on one machine: the real coordinator and real institution
daemons, talking gRPC over loopback. No second runtime."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedcollab import __version__
from fedcollab._dp_metrics import federation_dp
from fedcollab.config import (
    CentralEvaluationConfig,
    DataConfig,
    InstitutionConfig,
    InstitutionInfo,
    PartitionConfig,
    Scenario,
    TlsConfig,
)
from fedcollab.coordinator import Coordinator, RoundResult
from fedcollab.errors import ConfigError, FedcollabError
from fedcollab.institution import InstitutionDaemon, daemon_from_config
from fedcollab.institution._trainer import Trainer
from fedcollab.simulation._results import plot_privacy, plot_rounds, write_json

log = logging.getLogger("fedcollab.simulation")


@dataclass(frozen=True)
class SimulationResult:
    run_dir: Path
    results: dict[str, Any]

    @property
    def final_accuracy(self) -> float | None:
        return self.results["final"].get("central_accuracy")


def institution_names(scenario: Scenario) -> list[str]:
    return [f"institution-{i}" for i in range(scenario.simulation.institutions)]


def institution_configs(scenario: Scenario, *, address: str, state_root: Path,
                        tls: dict[str, TlsConfig] | None = None) -> list[InstitutionConfig]:
    """One institution.toml-equivalent per partition of the scenario's dataset; `tls`
    gives each institution's certificate (by name) for mutual TLS."""
    sim = scenario.simulation
    central = _central(scenario)
    return [
        InstitutionConfig(
            institution=InstitutionInfo(name=f"institution-{i}", coordinator=address,
                                        state_dir=state_root / f"institution-{i}"),
            privacy=scenario.privacy,
            tls=(tls or {}).get(f"institution-{i}"),
            data=DataConfig(
                dataset=sim.dataset, data_dir=sim.data_dir, seed=central.seed,
                test_fraction=central.test_fraction, val_fraction=sim.val_fraction,
                partition=PartitionConfig(scheme=sim.partition, num_partitions=sim.institutions, index=i,
                                          alpha=sim.alpha, seed=sim.partition_seed),
            ),
        )
        for i in range(sim.institutions)
    ]


def _attacker(scenario: Scenario, index: int) -> Callable[[Trainer], Trainer] | None:
    """The last attack.institutions institutions are poisoned."""
    attack = scenario.simulation.attack
    if attack is None or index < scenario.simulation.institutions - attack.institutions:
        return None
    from fedcollab.simulation._attacks import PoisoningTrainer

    return lambda inner: PoisoningTrainer(inner=inner, kind=attack.kind, scale=attack.scale, seed=index)


def _central(scenario: Scenario) -> CentralEvaluationConfig:
    sim, central = scenario.simulation, scenario.study.central_evaluation
    if central is None:
        return CentralEvaluationConfig(dataset=sim.dataset, data_dir=sim.data_dir)
    if central.dataset != sim.dataset:
        raise ConfigError(
            f"study.central_evaluation.dataset is {central.dataset!r} but simulation.dataset is "
            f"{sim.dataset!r}: evaluate on the dataset the institutions hold"
        )
    return central


def _ephemeral_tls(scenario: Scenario, run_dir: Path) -> tuple[TlsConfig, dict[str, TlsConfig]]:
    """A throwaway federation CA in the run folder: the coordinator's certificate and
    one per institution, issued through the same request/sign path as `fedcollab pki`."""
    from fedcollab.pki import issue_ephemeral

    pki = issue_ephemeral(directory=run_dir / "pki", federation=scenario.federation.name,
                          institutions=institution_names(scenario), operators=["operator"])
    cert, key = pki.coordinator
    server = TlsConfig(ca_cert=pki.ca_cert, cert=cert, key=key, crl=pki.crl)
    clients = {name: TlsConfig(ca_cert=pki.ca_cert, cert=c, key=k) for name, (c, k) in pki.institutions.items()}
    return server, clients


def run_simulation(
    *, scenario: Scenario, output_dir: Path | None = None, console: Console | None = None, insecure: bool = False
) -> SimulationResult:
    """Runs the scenario over mutual TLS with an ephemeral CA in the run folder, or in
    plaintext on loopback with `insecure`."""
    console = console or Console()
    sim = scenario.simulation
    if sim.institutions < scenario.study.min_institutions:
        raise ConfigError(
            f"simulation.institutions ({sim.institutions}) is below study.min_institutions "
            f"({scenario.study.min_institutions}): no round could reach its quorum"
        )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = (output_dir or sim.output_dir) / f"{stamp}-{sim.name}"
    run_dir.mkdir(parents=True, exist_ok=False)
    central = _central(scenario)
    server_tls, client_tls = (None, None) if insecure else _ephemeral_tls(scenario, run_dir)
    federation = scenario.federation_config().model_copy(
        update={
            "server": scenario.server.model_copy(update={"address": "127.0.0.1:0", "state_dir": run_dir / "coordinator",
                                                         "tls": server_tls}),
            "study": scenario.study.model_copy(update={"central_evaluation": central}),
        }
    )
    total = federation.study.rounds
    progress = Progress(
        TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=console,
    )
    bar = progress.add_task("starting", total=total)

    def on_round(r: RoundResult) -> None:
        m = r.metrics
        if r.status == "committed":
            nan = float("nan")
            eps = [p["epsilon"] for p in r.participants.values() if "epsilon" in p]
            spent = f"  eps {max(eps):.2f}" if eps else ""
            if (fed := federation_dp(m)) is not None:
                spent += f"  federation eps {fed[0]:.2f}"
            progress.console.print(
                f"round {r.round:>3}/{total}  loss {m.get('train_loss', nan):.3f}  "
                f"fed-eval {m.get('eval_loss', nan):.3f}/{m.get('eval_accuracy', nan):.1%}  "
                f"test {m.get('central_loss', nan):.3f}/{m.get('central_accuracy', nan):.1%}{spent}",
                highlight=False,
            )
            for name, p in sorted(r.participants.items()):
                if p["status"] == "declined":
                    progress.console.print(f"[yellow]  {name} declined: {p['reason']}", highlight=False)
            progress.update(bar, completed=r.round, description=f"central acc {m.get('central_accuracy', 0):.3f}")
        else:
            progress.console.print(f"[yellow]round {r.round} attempt {r.attempt} failed: {r.reason}")

    started = time.monotonic()
    coordinator = Coordinator(config=federation, on_round=on_round)
    daemons: list[InstitutionDaemon] = []
    threads: list[threading.Thread] = []
    stop = threading.Event()
    with progress:
        try:
            port = coordinator.start()
            configs = institution_configs(scenario, address=f"127.0.0.1:{port}", state_root=run_dir / "institutions",
                                          tls=client_tls)
            daemons = [daemon_from_config(c, wrap_trainer=_attacker(scenario, i)) for i, c in enumerate(configs)]
            threads = [threading.Thread(target=d.run, kwargs={"stop": stop}, name=d.name, daemon=True) for d in daemons]
            for t in threads:
                t.start()
            while not coordinator.wait(timeout=0.5):
                # Daemons stop once they hear FINISHED, which may be a moment after the wait above gave up.
                if not any(t.is_alive() for t in threads) and not coordinator.wait(timeout=5):
                    raise FedcollabError("every institution daemon stopped before the study finished; see the log")
            for t in threads:
                t.join(timeout=30)
            if coordinator.engine.failure:
                raise FedcollabError(f"the study did not finish: {coordinator.engine.failure}")
            results = _collect(coordinator, daemons, scenario=scenario, seconds=time.monotonic() - started)
        finally:
            stop.set()
            coordinator.stop()
    write_json(results, run_dir / "results.json")
    dp = _dp_label(scenario)
    plot_rounds(results["rounds"], run_dir / "rounds.png", title=f"{sim.name}: {sim.institutions} institutions, "
                f"{sim.partition} (alpha={sim.alpha}), FedAvg{dp}")
    if results["privacy"]["per_round"] or any(federation_dp(r.get("metrics", r)) for r in results["rounds"]):
        plot_privacy(results, run_dir / "privacy.png", title=f"{sim.name}: accuracy against epsilon{dp}")
    _print_summary(console, results, run_dir)
    return SimulationResult(run_dir=run_dir, results=results)


def _dp_label(scenario: Scenario) -> str:
    parts = []
    if scenario.privacy is not None:
        parts.append(f"DP-SGD eps={scenario.privacy.target_epsilon:g} per institution")
    if scenario.study.central_dp is not None:
        parts.append(f"DP-FedAvg z={scenario.study.central_dp.noise_multiplier:g}")
    sa = scenario.study.secure_aggregation
    if sa is not None:
        parts.append("SecAgg+" + (f", distributed DP z={sa.distributed_dp.noise_multiplier:g}"
                                  if sa.distributed_dp is not None else ""))
    return f", {', '.join(parts)}" if parts else ""


def _privacy_summary(coordinator: Coordinator, daemons: list[InstitutionDaemon]) -> dict[str, Any]:
    """Each institution's spend as its own ledger has it (authoritative), next to what
    the coordinator recorded per round from the institutions' reports."""
    ledgers = {}
    for d in daemons:
        if d.privacy is None:
            continue
        report = d.privacy.ledger.verify()
        entries = d.privacy.ledger.entries()
        ledgers[d.name] = {
            "budget_epsilon": d.privacy.config.budget,
            "target_epsilon": d.privacy.config.target_epsilon,
            "delta": d.privacy.config.target_delta,
            "accountant": d.privacy.config.accountant,
            "spent_epsilon": entries[-1].epsilon if entries else 0.0,
            "noise_multiplier": entries[-1].noise_multiplier if entries else None,
            "rounds_trained": len(entries),
            "ledger_intact": report.ok,
            "ledger_problem": report.problem,
        }
    return {"institutions": ledgers, "per_round": coordinator.store.privacy_spend()}


def _collect(coordinator: Coordinator, daemons: list[InstitutionDaemon], *, scenario: Scenario,
             seconds: float) -> dict[str, Any]:
    examples = {d.name: d.num_train_examples for d in daemons}
    rounds = coordinator.store.rounds()
    committed = [r for r in rounds if r["status"] == "committed"]
    final = committed[-1]["metrics"] if committed else {}
    last = committed[-1]["round"] if committed else None
    local = {e["institution"]: e for e in coordinator.store.evaluations() if e["round"] == last}
    return {
        "fedcollab_version": __version__,
        "scenario": _as_run(scenario, coordinator),
        "transport": _transport(coordinator, daemons),
        "state": {"coordinator": str(Path(coordinator.config.server.state_dir)),
                  "institutions": {d.name: str(Path(d.config.institution.state_dir)) for d in daemons}},
        "wall_seconds": round(seconds, 3),
        "institutions": [
            {"name": n, "train_examples": examples[n],
             "final_local_accuracy": local[n]["accuracy"] if n in local else None,
             "local_eval_examples": local[n]["num_examples"] if n in local else 0}
            for n in sorted(examples)
        ],
        "rounds": rounds,
        "privacy": _privacy_summary(coordinator, daemons),
        "final": {"round": committed[-1]["round"] if committed else 0, **final},
    }


def _as_run(scenario: Scenario, coordinator: Coordinator) -> dict[str, Any]:
    """The scenario as it ran: the simulation puts the coordinator on a free loopback
    port, its state in the run folder and (unless insecure) mutual TLS from the run's
    own CA, whatever [server] said; the record says what was used, not what was
    overridden (a `tls = null` for a mutual-TLS run misleads whoever reads it)."""
    recorded = scenario.model_dump(mode="json")
    used = coordinator.config.server
    recorded["server"] = {**recorded["server"], "address": coordinator.address, "state_dir": str(used.state_dir),
                          "tls": used.tls.model_dump(mode="json") if used.tls is not None else None}
    return recorded


def _transport(coordinator: Coordinator, daemons: list[InstitutionDaemon]) -> dict[str, Any]:
    tls = coordinator.config.server.tls
    if tls is None:
        return {"mode": "insecure", "detail": "plaintext gRPC on loopback (--insecure): no TLS, identities unchecked"}
    return {"mode": "mutual-tls" if tls.require_client_auth else "tls", "ca_cert": str(tls.ca_cert),
            "crl": str(tls.crl) if tls.crl else None,
            "coordinator_cert": str(tls.cert),
            "institution_certs": {d.name: str(d.config.tls.cert) if d.config.tls is not None else None
                                  for d in daemons}}


def _print_summary(console: Console, results: dict[str, Any], run_dir: Path) -> None:
    table = Table(title="Institutions")
    table.add_column("institution")
    table.add_column("train examples", justify="right")
    table.add_column("final model on its held-out data", justify="right")
    ledgers = results["privacy"]["institutions"]
    if ledgers:
        table.add_column("epsilon spent / budget", justify="right")
        table.add_column("ledger", justify="center")
    for inst in results["institutions"]:
        acc = inst["final_local_accuracy"]
        shown = f"{acc:.1%} of {inst['local_eval_examples']}" if acc is not None else "-"
        row = [inst["name"], str(inst["train_examples"]), shown]
        if ledgers:
            led = ledgers.get(inst["name"])
            row += [f"{led['spent_epsilon']:.2f} / {led['budget_epsilon']:g}" if led else "no DP",
                    ("intact" if led["ledger_intact"] else "[red]BROKEN") if led else "-"]
        table.add_row(*row)
    console.print(table)
    final = results["final"]
    acc = final.get("central_accuracy")
    console.print(
        f"final global test accuracy after round {final.get('round')}: "
        f"[bold]{acc:.2%}[/bold] on {int(final.get('central_examples', 0))} held-out examples"
        if acc is not None else "no round committed"
    )
    if (fed := federation_dp(final)) is not None:
        console.print(f"federation-level DP ({fed[2]}): epsilon {fed[0]:.2f} at delta {fed[1]:g}")
    console.print(f"results: {run_dir / 'results.json'}\nplot:    {run_dir / 'rounds.png'}")
    if (run_dir / "privacy.png").is_file():
        console.print(f"privacy: {run_dir / 'privacy.png'}")
