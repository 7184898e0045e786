"""The `fedcollab` command."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from fedcollab.config import FederationConfig, InstitutionConfig, Scenario, load_config
from fedcollab.errors import ConfigError, FedcollabError
from fedcollab.transport import is_loopback

DEFAULT_SCENARIO = "simulations/digits_fedavg.toml"
console = Console()


def _default_scenario() -> Path:
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / DEFAULT_SCENARIO).is_file():
            return root / DEFAULT_SCENARIO
    raise ConfigError(f"no {DEFAULT_SCENARIO} here or in the fedcollab checkout; pass --scenario FILE")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _require_tls_or_insecure(has_tls: bool, insecure: bool, address: str, what: str) -> None:
    if has_tls:
        return
    if not insecure:
        raise ConfigError(f"{what} has no [tls] table: configure TLS, or pass --insecure for a plaintext rehearsal")
    if not is_loopback(address):
        logging.getLogger("fedcollab").warning("--insecure on a non-loopback address %s", address)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedcollab.simulation import plot_comparison, run_simulation

    paths = [Path(p) for p in args.scenario] if args.scenario else [_default_scenario()]
    scenarios = [(path, load_config(Scenario, path)) for path in paths]  # all valid before any runs
    results = []
    for path, scenario in scenarios:
        dp = f", DP-SGD at epsilon {scenario.privacy.target_epsilon:g} per institution" if scenario.privacy else ""
        console.print(f"scenario {path}: {scenario.simulation.institutions} institutions, "
                      f"{scenario.study.rounds} rounds of FedAvg on {scenario.simulation.dataset}{dp}")
        result = run_simulation(scenario=scenario, output_dir=Path(args.output_dir), console=console)
        console.print(f"run folder: {result.run_dir}")
        results.append(result)
    if len(results) > 1:
        plot = plot_comparison(results, output_dir=Path(args.output_dir))
        console.print(f"accuracy against epsilon across the {len(results)} scenarios: {plot}")
    return 0


def cmd_coordinator_serve(args: argparse.Namespace) -> int:
    from fedcollab.coordinator import Coordinator

    config = load_config(FederationConfig, args.config)
    _require_tls_or_insecure(config.server.tls is not None, args.insecure, config.server.address, args.config)
    stop = _stop_on_signals()
    coordinator = Coordinator(config=config)
    coordinator.start()
    console.print(f"coordinator serving study [bold]{config.study.name}[/] on {coordinator.address} "
                  f"(state in {config.server.state_dir}); Ctrl-C stops it, a restart resumes")
    try:
        while not stop.is_set():
            if coordinator.wait(timeout=0.5):
                stop.wait(args.linger)  # let institutions hear that the study finished
                break
    finally:
        coordinator.stop()
    if coordinator.engine.failure:
        console.print(f"[red]study failed: {coordinator.engine.failure}")
        return 1
    return 0


def cmd_coordinator_status(args: argparse.Namespace) -> int:
    from fedcollab.coordinator import Store

    config = load_config(FederationConfig, args.config)
    db = Path(config.server.state_dir) / "coordinator.sqlite"
    if not db.is_file():
        raise ConfigError(f"{db}: no coordinator state yet (has `fedcollab coordinator serve` run?)")
    store = Store(db)
    table = Table(title=f"study {config.study.name}: rounds")
    for col in ("round", "attempt", "status", "model", "updates", "train loss", "eval acc", "central acc", "reason"):
        table.add_column(col)
    for r in store.rounds():
        m = r["metrics"]
        fmt = lambda k: f"{m[k]:.4f}" if k in m else ""  # noqa: E731
        table.add_row(str(r["round"]), str(r["attempt"]), r["status"], str(r["model_version"] or ""),
                      str(int(m.get("num_updates", 0)) or ""), fmt("train_loss"), fmt("eval_accuracy"),
                      fmt("central_accuracy"), r["reason"] or "")
    console.print(table)
    _print_privacy_spend(store)
    store.close()
    return 0


def _print_privacy_spend(store: Any) -> None:
    """What each institution declared it spent (its own ledger is authoritative), and
    the federation-level epsilon of DP-FedAvg when the study uses it."""
    latest: dict[str, dict[str, Any]] = {}
    for p in store.privacy_spend():
        latest[p["institution"]] = p
    if latest:
        table = Table(title="privacy spend reported by institutions (their ledgers are authoritative)")
        for col in ("institution", "last round", "epsilon spent", "budget", "delta", "accountant", "status"):
            table.add_column(col)
        for name, p in sorted(latest.items()):
            table.add_row(name, str(p["round"]), f"{p['epsilon']:.3f}", f"{p['budget_epsilon']:g}",
                          f"{p['delta']:g}", p["accountant"], p["status"])
        console.print(table)
    central = [r for r in store.rounds() if "central_dp_epsilon" in r["metrics"]]
    if central:
        m = central[-1]["metrics"]
        console.print(f"federation-level DP (DP-FedAvg) after round {central[-1]['round']}: epsilon "
                      f"{m['central_dp_epsilon']:.3f} at delta {m.get('central_dp_delta', float('nan')):g}")


def cmd_institution_run(args: argparse.Namespace) -> int:
    from fedcollab.institution import daemon_from_config

    config = load_config(InstitutionConfig, args.config)
    _require_tls_or_insecure(config.tls is not None, args.insecure, config.institution.coordinator, args.config)
    stop = _stop_on_signals()
    daemon = daemon_from_config(config)
    console.print(f"institution [bold]{daemon.name}[/] ({daemon.num_train_examples} training examples) "
                  f"connecting to {config.institution.coordinator}")
    finished = daemon.run(stop=stop)
    return 0 if finished else 130


def cmd_institution_ledger(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from rich.markup import escape

    from fedcollab.privacy._ledger import PrivacyLedger, ledger_path

    if args.config:
        path = ledger_path(load_config(InstitutionConfig, args.config).institution.state_dir)
    else:
        path = Path(args.ledger)
    if not path.is_file():
        raise ConfigError(f"{path}: no privacy ledger yet (an institution writes it when it first "
                          "trains with differential privacy); check --config or --ledger")
    with PrivacyLedger(path, readonly=True) as ledger:  # never writes: safe next to a running daemon
        if args.verify:
            report = ledger.verify()
            if args.json:
                print(json.dumps({"path": str(path), **dataclasses.asdict(report)}, indent=2))
            elif report.ok:
                console.print(f"ledger intact: {report.rows} rows, head {report.head_hash[:12]}")
            else:
                console.print(f"[red]ledger {escape(str(path))} does not verify:[/] ", end="")
                console.print(report.problem, style="red", markup=False, highlight=False)
            return 0 if report.ok else 1
        entries = ledger.entries(study=args.study)
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
        return 0
    table = Table(title=escape(f"privacy ledger {path}"), box=None, pad_edge=False, header_style="bold underline")
    for col in ("seq", "time (UTC)", "study", "round", "epsilon", "budget", "left", "delta", "noise", "rate",
                "steps", "acct", "update"):
        table.add_column(col)
    for e in entries:
        left = f"{e.remaining_epsilon:.3f}" if e.remaining_epsilon >= 0 else f"[red]{e.remaining_epsilon:.3f}[/]"
        table.add_row(str(e.seq), e.created_at[:16].replace("T", " "), escape(e.study), str(e.round),
                      f"{e.epsilon:.3f}", f"{e.budget_epsilon:.3f}", left, f"{e.delta:g}", f"{e.noise_multiplier:g}",
                      f"{e.sample_rate:g}", str(e.steps), e.accountant, e.update_sha256[:12])
    console.print(table)
    if not entries:
        console.print("no entries" + (f" for study {args.study}" if args.study else ""), markup=False)
    for study in dict.fromkeys(e.study for e in entries):
        rows = [e for e in entries if e.study == study]
        last, rounds = rows[-1], len({e.round for e in rows})
        console.print(f"study {study}: epsilon {last.epsilon:.2f} of {last.budget_epsilon:.2f} spent "
                      f"(delta {last.delta:g}, {last.accountant} accountant), "
                      f"{rounds} round{'' if rounds == 1 else 's'}", markup=False, highlight=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcollab", description="Federated learning for research institutions.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="rehearse a whole federation on this machine")
    sim.add_argument("--scenario", action="append",
                     help=f"scenario file (default: {DEFAULT_SCENARIO}); repeat it to compare scenarios "
                          "(e.g. privacy levels) in one plot")
    sim.add_argument("--output-dir", default="runs", help="where run folders go (default: ./runs)")
    sim.set_defaults(func=cmd_simulate)

    coord = sub.add_parser("coordinator", help="run or inspect a coordinator").add_subparsers(dest="action", required=True)
    serve = coord.add_parser("serve", help="serve a study until it is finished")
    serve.add_argument("--config", required=True, help="federation.toml")
    serve.add_argument("--insecure", action="store_true", help="allow plaintext gRPC when no [tls] is configured")
    serve.add_argument("--linger", type=float, default=5.0, help="seconds to keep serving after the last round")
    serve.set_defaults(func=cmd_coordinator_serve)
    status = coord.add_parser("status", help="rounds recorded in a coordinator's state")
    status.add_argument("--config", required=True, help="federation.toml")
    status.set_defaults(func=cmd_coordinator_status)

    inst = sub.add_parser("institution", help="run an institution daemon").add_subparsers(dest="action", required=True)
    run = inst.add_parser("run", help="join the federation and serve its tasks until the study ends")
    run.add_argument("--config", required=True, help="institution.toml")
    run.add_argument("--insecure", action="store_true", help="allow plaintext gRPC when no [tls] is configured")
    run.set_defaults(func=cmd_institution_run)
    ledger = inst.add_parser("ledger", help="show or verify an institution's privacy ledger (epsilon spent)")
    where = ledger.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="institution.toml (the ledger is in its state_dir)")
    where.add_argument("--ledger", help="a privacy-ledger.sqlite file")
    ledger.add_argument("--study", help="only this study's rows")
    ledger.add_argument("--verify", action="store_true", help="check the hash chain; exit 1 if it is broken")
    ledger.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ledger.set_defaults(func=cmd_institution_ledger)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if args.command != "simulate":
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(name)s: %(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])
    try:
        code = args.func(args)
    except ConfigError as e:
        console.print("[red]configuration error[/]")
        console.print(str(e), markup=False, highlight=False)  # messages name [tables]
        code = 2
    except FedcollabError as e:
        console.print("[red]error:[/] ", end="")
        console.print(str(e), markup=False, highlight=False)
        code = 1
    sys.exit(code)
