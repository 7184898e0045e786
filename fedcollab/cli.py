"""The `fedcollab` command."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedcollab._display import markup
from fedcollab._memory import tune_malloc
from fedcollab.config import FederationConfig, InstitutionConfig, Scenario, load_config
from fedcollab.errors import ConfigError, FedcollabError

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


def _require_tls_or_insecure(*, table: str, has_tls: bool, args: argparse.Namespace, address: str, what: str) -> None:
    from fedcollab._plaintext import require_tls_or_insecure

    require_tls_or_insecure(tls=f"its {table} table" if has_tls else None, insecure=args.insecure,
                            force_insecure=args.force_insecure, address=address, what=what,
                            no_tls_hint=f"add a {table} table with ca_cert, cert and key", console=console)


def cmd_simulate(args: argparse.Namespace) -> int:
    tune_malloc()
    from fedcollab.simulation import plot_comparison, run_simulation

    named = [*args.files, *(args.scenario or [])]  # `simulate FILE ...` as `flwr run .` users type, or --scenario
    paths = [Path(p) for p in named] if named else [_default_scenario()]
    scenarios = [(path, load_config(Scenario, path)) for path in paths]  # all valid before any runs
    results = []
    for path, scenario in scenarios:
        dp = f", DP-SGD at epsilon {scenario.privacy.target_epsilon:g} per institution" if scenario.privacy else ""
        console.print(f"scenario {path}: {scenario.simulation.institutions} institutions, "
                      f"{scenario.study.rounds} rounds of FedAvg on {scenario.simulation.dataset}{dp}")
        if args.insecure:
            console.print("[bold red]PLAINTEXT simulation (--insecure): no TLS between the coordinator and the "
                          "institutions on loopback.[/]")
        result = run_simulation(scenario=scenario, output_dir=Path(args.output_dir), console=console,
                                insecure=args.insecure)
        console.print(f"run folder: {result.run_dir}")
        results.append(result)
    if len(results) > 1:
        plot = plot_comparison(results, output_dir=Path(args.output_dir))
        console.print(f"accuracy against epsilon across the {len(results)} scenarios: {plot}")
    return 0


def cmd_coordinator_serve(args: argparse.Namespace) -> int:
    tune_malloc()
    from fedcollab.coordinator import Coordinator

    config = load_config(FederationConfig, args.config)
    _require_tls_or_insecure(table="[server.tls]", has_tls=config.server.tls is not None, args=args,
                             address=config.server.address, what=args.config)
    stop = _stop_on_signals()
    coordinator = Coordinator(config=config)
    # The start-up heap (torch, gRPC, the model: ~200,000 objects) stays alive for good,
    # yet every full collection walked it: a 40-180 ms pause holding the GIL about every
    # 4 s under 200 institutions (benchmarks/load.py), which made the p99 of every kind
    # of call. Frozen, it is left out: full collections walk only what serving creates.
    gc.collect()
    gc.freeze()
    coordinator.start()
    _deprecated_flag(args, "keep_serving", "--keep-serving", "serving on once every study has ended is the default; "
                     "--exit-when-done exits instead")
    console.print(f"coordinator serving study [bold]{config.study.name}[/] on {coordinator.address} "
                  f"(state in {config.server.state_dir}); Ctrl-C stops it, a restart resumes")
    if coordinator.http_port is not None:
        host = str(config.server.http_address).rsplit(":", 1)[0]
        console.print(f"operators' dashboard: http://{host}:{coordinator.http_port}/ (metrics: /metrics)")
    said = False  # that every study has ended, once until a new one starts
    try:
        while not stop.is_set():
            if not coordinator.wait(timeout=0.5):
                said = False
            elif args.exit_when_done:
                stop.wait(args.linger)  # let institutions hear that the study finished
                break
            elif not said:  # a service: operators submit the next study to this one
                console.print("every study has ended; serving on for the next (`fedcollab study submit`)")
                said = True
    finally:
        coordinator.stop()
    if coordinator.engine.failure:
        console.print(f"[red]study failed: {coordinator.engine.failure}")
        return 1 if args.exit_when_done else 0  # a service stopped on request: the study failed, not the process
    return 0


def _deprecated_flag(args: argparse.Namespace, dest: str, flag: str, why: str) -> None:
    """An old flag is still accepted so existing scripts and units keep working; it does nothing."""
    if getattr(args, dest, False):
        console.print(f"{flag} is deprecated and does nothing: {why}", style="yellow", markup=False, highlight=False)


def cmd_coordinator_status(args: argparse.Namespace) -> int:
    from fedcollab.coordinator import Store

    config = load_config(FederationConfig, args.config)
    db = Path(config.server.state_dir) / "coordinator.sqlite"
    if not db.is_file():
        raise ConfigError(f"{db}: no coordinator state yet (has `fedcollab coordinator serve` run?)")
    store = Store(db, read_only=True)  # the coordinator may be serving: its open round is not abandoned
    table = Table(title=f"study {config.study.name}: rounds")
    for col in ("round", "attempt", "status", "model", "updates", "train loss", "eval acc", "central acc", "reason"):
        table.add_column(col)
    for r in store.rounds():
        m = r["metrics"]
        fmt = lambda k, m=m: f"{m[k]:.4f}" if k in m else ""  # noqa: E731
        table.add_row(str(r["round"]), str(r["attempt"]), r["status"], str(r["model_version"] or ""),
                      str(int(m.get("num_updates", 0)) or ""), fmt("train_loss"), fmt("eval_accuracy"),
                      fmt("central_accuracy"), markup(r["reason"] or ""))  # reasons quote institutions
    console.print(table)
    _print_privacy_spend(store, total_rounds=config.study.rounds)
    store.close()
    return 0


def _print_privacy_spend(store: Any, *, total_rounds: int) -> None:
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
            table.add_row(markup(name), str(p["round"]), f"{p['epsilon']:.3f}", f"{p['budget_epsilon']:g}",
                          f"{p['delta']:g}", markup(p["accountant"]), markup(p["status"]))  # as institutions said
        console.print(table)
        from fedcollab.privacy._projection import project_budgets

        for short in [p for p in project_budgets(spend=store.privacy_spend(), total_rounds=total_rounds) if p.short]:
            console.print(f"[yellow]warning: {markup(short.warning())}")
    from fedcollab._dp_metrics import federation_dp

    central = [(r["round"], dp) for r in store.rounds() if (dp := federation_dp(r["metrics"])) is not None]
    if central:
        last, (eps, delta, mechanism) = central[-1]
        console.print(f"federation-level DP ({mechanism}) after round {last}: epsilon {eps:.3f} at delta {delta:g}")


def cmd_institution_run(args: argparse.Namespace) -> int:
    tune_malloc()
    from fedcollab.institution._agent import InstitutionAgent

    config = load_config(InstitutionConfig, args.config)
    _require_tls_or_insecure(table="[tls]", has_tls=config.tls is not None, args=args,
                             address=config.institution.coordinator, what=args.config)
    stop = _stop_on_signals()
    _deprecated_flag(args, "keep_running", "--keep-running", "waiting for new studies is the default; "
                     "--exit-when-done exits instead")
    progress = None
    if sys.stderr.isatty() and args.log_format == "rich":  # a person watching: never in logs or CI
        from fedcollab.institution._progress import RoundProgress

        progress = RoundProgress(console=Console(stderr=True))
    agent = InstitutionAgent(config=config, keep_running=not args.exit_when_done,
                             on_event=progress.on_event if progress is not None else None)
    console.print(f"institution {agent.name} connecting to {config.institution.coordinator}; "
                  f"studies accepted by its policy: {', '.join(config.policy.studies) or 'the default study only'}",
                  markup=False, highlight=False)
    try:
        with progress if progress is not None else contextlib.nullcontext():
            finished = agent.run(stop=stop)
    finally:
        agent.close()
    for study, decision in sorted(agent.decisions.items()):
        if not decision.accept:
            console.print(f"declined study [bold]{study}[/]: {decision.reason}: {decision.message}")
    # A service ends when it is stopped, and that is its normal end; a one-shot run cut short is not.
    return 0 if finished or not args.exit_when_done else 130


def cmd_institution_ledger(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from rich.markup import escape

    from fedcollab.privacy._ledger import PrivacyLedger, ledger_path

    if args.config:
        config = load_config(InstitutionConfig, args.config)
        state = Path(config.institution.state_dir)
        if args.migrate:
            return _migrate_ledgers(config)
        path = ledger_path(state)  # the site's one ledger, for every study
        if not path.is_file() and any(state.glob("studies/*/privacy-ledger.sqlite")):
            raise ConfigError(f"{state}: per-study privacy ledgers of an older fedcollab, and no site ledger yet; "
                              f"migrate them (their rows are kept): add --migrate")
    else:
        if args.migrate:
            raise ConfigError("--migrate needs --config institution.toml (the dataset the old rows count against)")
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
        every = ledger.entries()
    entries = [e for e in every if args.study is None or e.study == args.study]
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
        return 0
    table = Table(title=escape(f"privacy ledger {path}"), box=None, pad_edge=False, header_style="bold underline")
    for col in ("seq", "time (UTC)", "study", "round", "epsilon", "limit", "site", "budget", "left", "delta",
                "noise", "rate", "steps", "acct", "update"):
        table.add_column(col)
    for e in entries:
        left = f"{e.remaining_epsilon:.3f}" if e.remaining_epsilon >= 0 else f"[red]{e.remaining_epsilon:.3f}[/]"
        table.add_row(str(e.seq), e.created_at[:16].replace("T", " "), escape(e.study), str(e.round),
                      f"{e.epsilon:.3f}", f"{e.budget_epsilon:.3f}", f"{e.site_epsilon:.3f}",
                      f"{e.site_budget_epsilon:.3f}", left, f"{e.delta:g}", f"{e.noise_multiplier:g}",
                      f"{e.sample_rate:g}", str(e.steps), e.accountant, e.update_sha256[:12])
    console.print(table)
    if not entries:
        console.print("no entries" + (f" for study {args.study}" if args.study else ""), markup=False)
    for study in dict.fromkeys(e.study for e in entries):
        rows = [e for e in entries if e.study == study]
        last, rounds = rows[-1], len({e.round for e in rows})
        console.print(f"study {study}: epsilon {last.epsilon:.2f} of its limit {last.budget_epsilon:.2f} spent "
                      f"(delta {last.delta:g}, {last.accountant} accountant), "
                      f"{rounds} round{'' if rounds == 1 else 's'}", markup=False, highlight=False)
    # The site's totals are over every study, whatever --study shows.
    for dataset in dict.fromkeys(e.dataset for e in every):
        rows = [e for e in every if e.dataset == dataset]
        last, studies = rows[-1], len({e.study for e in rows})
        console.print(f"site total on {dataset}: epsilon {last.site_epsilon:.2f} of its budget "
                      f"{last.site_budget_epsilon:.2f} spent, over {studies} stud{'y' if studies == 1 else 'ies'}",
                      markup=False, highlight=False)
    return 0


def _migrate_ledgers(config: InstitutionConfig) -> int:
    from fedcollab.privacy._dataset import dataset_key
    from fedcollab.privacy._ledger_migrate import open_site_ledger

    if config.privacy is None or config.data is None:
        raise ConfigError("--migrate needs the institution's [data] and [privacy] tables: the old rows count "
                          "against that dataset and budget")
    state = Path(config.institution.state_dir)
    key = dataset_key(config.data)
    with open_site_ledger(state, dataset=key, site_budget=config.privacy.budget) as ledger:
        rows = len(ledger.entries())
    console.print(f"site ledger {state / 'privacy-ledger.sqlite'}: {rows} rows (older per-study ledgers, if any, "
                  f"migrated and kept as privacy-ledger.v1.sqlite), counted against {key}",
                  markup=False, highlight=False)
    return 0


def _serial(text: str) -> int:
    """--serial as `pki list` and the coordinator's logs print it: hex, with or without 0x or colons."""
    try:
        return int(text.lower().removeprefix("0x").replace(":", ""), 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hex serial (as `fedcollab pki list` prints it)") from None


def _pki_facts(rows: Sequence[tuple[str, str]], title: str) -> None:
    from fedcollab._display import print_facts

    print_facts(console, rows, title=title)  # fingerprints whole at any width: they are compared by phone


def cmd_pki_init(args: argparse.Namespace) -> int:
    from fedcollab.pki import init_ca

    ca = init_ca(directory=Path(args.dir), federation=args.federation, days=args.days)
    _pki_facts([("CA certificate", str(ca.ca_cert)), ("CA key", f"{ca.ca_key} (0600)"),
                ("revocation list", str(ca.crl)), ("fingerprint", ca.fingerprint)],
               title=f"federation CA for {args.federation}, valid {args.days} days")
    console.print("Keep ca-key.pem on this machine and back it up; give ca.pem to every institution and the "
                  "coordinator, and point the coordinator's server.tls.crl at a copy of crl.pem.", markup=False)
    return 0


def cmd_pki_request(args: argparse.Namespace) -> int:
    from fedcollab.pki import request_certificate

    role, name = next((r, getattr(args, r)) for r in ("institution", "operator", "coordinator") if getattr(args, r))
    req = request_certificate(directory=Path(args.dir), role=role, name=name, dns_names=args.dns or (),
                              ip_addresses=args.ip or ())
    hosts = [*req.dns_names, *req.ip_addresses]
    _pki_facts([("identity", f"{role} {name}"), ("private key", f"{req.key} (0600"
                 + (", existing key reused)" if req.reused_key else ", new)")),
                ("request", str(req.csr)), *([("hosts", ", ".join(hosts))] if hosts else []),
                ("public-key fingerprint", req.public_key_fingerprint)], title="certificate request")
    console.print(f"Send {req.csr.name} (never {req.key.name}: the key stays here) to the federation operator, and "
                  "read them the public-key fingerprint by phone: `fedcollab pki sign` prints it too, and they "
                  "must match.", markup=False, highlight=False)
    return 0


def cmd_pki_sign(args: argparse.Namespace) -> int:
    from fedcollab.pki import serial_hex, sign_request

    csr = Path(args.csr)
    try:
        csr_pem = csr.read_bytes()
    except OSError as e:
        raise ConfigError(f"--csr {csr}: cannot read it ({e.strerror})") from None
    out = Path(args.out) if args.out else csr.with_suffix(".pem")
    signed = sign_request(ca_dir=Path(args.ca_dir), csr_pem=csr_pem, days=args.days, out=out, replace=args.replace)
    hosts = [*signed.dns_names, *signed.ip_addresses]
    _pki_facts([("identity", f"{signed.identity.role} {signed.identity.name}"),
                ("SAN", ", ".join([signed.identity.uri, *hosts])), ("serial", serial_hex(signed.serial)),
                ("valid", f"{signed.not_before:%Y-%m-%d %H:%M} to {signed.not_after:%Y-%m-%d %H:%M} UTC"),
                ("public-key fingerprint", signed.public_key_fingerprint),
                ("certificate fingerprint", signed.fingerprint), ("certificate", str(out)),
                *([("replaced (revoked)", ", ".join(map(serial_hex, signed.replaced)))] if signed.replaced else [])],
               title="signed")
    console.print(f"Before sending {out.name} back, confirm the public-key fingerprint with {signed.identity.name} "
                  "by phone: a mismatch means the CSR is not theirs." + (" The replaced certificate is in the new "
                  "crl.pem: copy it to the coordinator." if signed.replaced else ""), markup=False, highlight=False)
    return 0


def cmd_pki_revoke(args: argparse.Namespace) -> int:
    from fedcollab.pki import revoke

    if args.role and not args.name:
        raise ConfigError("--role only narrows --name; drop it")
    cert_pem = None
    if args.cert:
        try:
            cert_pem = Path(args.cert).read_bytes()
        except OSError as e:
            raise ConfigError(f"--cert {args.cert}: cannot read it ({e.strerror})") from None
    crl = revoke(ca_dir=Path(args.ca_dir), serial=args.serial, cert_pem=cert_pem, name=args.name, role=args.role,
                 reason=args.reason)
    what = args.cert or (f"serial {args.serial:x}" if args.serial is not None else f"{args.role or ''} {args.name}")
    console.print(f"revoked {what.strip()} ({args.reason}); revocation list: {crl}", markup=False, highlight=False)
    console.print("Copy it to the coordinator's server.tls.crl: it takes effect on the next call, no restart.",
                  markup=False)
    return 0


def cmd_pki_crl(args: argparse.Namespace) -> int:
    from fedcollab.pki import refresh_crl

    crl = refresh_crl(ca_dir=Path(args.ca_dir))
    console.print(f"re-signed {crl}; copy it to the coordinator's server.tls.crl", markup=False, highlight=False)
    return 0


def cmd_pki_list(args: argparse.Namespace) -> int:
    from rich.text import Text

    from fedcollab.pki import issued_certificates, serial_hex

    records = issued_certificates(ca_dir=Path(args.ca_dir))
    table = Table(title=f"certificates issued by {args.ca_dir}")
    table.add_column("serial", overflow="fold")  # whole: it is what `pki revoke --serial` takes
    for col in ("role", "name", "hosts", "not after (UTC)", "status"):
        table.add_column(col, overflow="fold")
    colour = {"valid": "green", "expired": "yellow", "revoked": "red"}
    for r in records:
        status = r.status + (f" {(r.revoked_at or '')[:10]} ({r.reason})" if r.revoked else "")
        table.add_row(serial_hex(r.serial), r.role, r.name, Text(", ".join([*r.dns_names, *r.ip_addresses])),
                      r.not_after[:16].replace("T", " "), Text(status, style=colour[r.status]))
    console.print(table)
    if not records:
        console.print("nothing issued yet", markup=False)
    else:  # below the table, one line each, whole: a table cell would cut or break them
        from fedcollab._display import print_facts

        print_facts(console, [(serial_hex(r.serial), r.fingerprint) for r in records],
                    title="certificate fingerprints (by serial)")
    return 0


def cmd_lineage_verify(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from fedcollab.lineage import verify_chain

    report = verify_chain(Path(args.run_dir), public_key=Path(args.public_key) if args.public_key else None)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), default=str, indent=2))
        return 0 if report.ok else 1
    for warning in report.warnings:
        console.print("[yellow]warning:[/] ", end="")
        console.print(warning, markup=False, highlight=False, soft_wrap=True)  # may name fingerprints
    if report.ok:
        console.print(f"lineage intact: v0..v{report.latest_version}, signed by {report.key_fingerprint}",
                      markup=False, highlight=False, soft_wrap=True)  # the fingerprint whole, never cut
        return 0
    console.print(f"lineage broken at v{report.first_broken_version}: {report.problem}", style="red", markup=False,
                  highlight=False)
    for problem in report.problems[1:]:
        console.print(f"  also {problem}", markup=False, highlight=False)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcollab", description="Federated learning for research institutions.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--log-format", choices=("rich", "json"), default="rich",
                        help="log lines for a terminal (rich, the default) or one JSON object per line (json)")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="rehearse a whole federation on this machine")
    sim.add_argument("files", nargs="*", metavar="FILE",
                     help=f"scenario files, as --scenario takes them (default: {DEFAULT_SCENARIO})")
    sim.add_argument("--scenario", action="append",
                     help=f"scenario file (default: {DEFAULT_SCENARIO}); repeat it to compare scenarios "
                          "(e.g. privacy levels) in one plot")
    sim.add_argument("--output-dir", default="runs", help="where run folders go (default: ./runs)")
    sim.add_argument("--insecure", action="store_true",
                     help="plaintext on loopback instead of mutual TLS with an ephemeral CA in the run folder")
    sim.set_defaults(func=cmd_simulate)

    coord = sub.add_parser("coordinator", help="run or inspect a coordinator").add_subparsers(dest="action",
                                                                                              required=True)
    serve = coord.add_parser("serve", help="serve studies, and keep serving for the next one until stopped")
    serve.add_argument("--config", required=True, help="federation.toml")
    serve.add_argument("--insecure", action="store_true", help="allow plaintext gRPC when no [tls] is configured")
    serve.add_argument("--force-insecure", action="store_true", help="allow --insecure on a non-loopback address")
    serve.add_argument("--exit-when-done", action="store_true",
                       help="one-shot: exit once every study has ended (default: keep serving, as a service does; "
                            "operators submit more with `fedcollab study submit`)")
    serve.add_argument("--linger", type=float, default=5.0,
                       help="with --exit-when-done: seconds to keep serving after the last round, so institutions "
                            "hear that it finished (default: 5)")
    serve.add_argument("--keep-serving", action="store_true", help=argparse.SUPPRESS)  # the default now; a no-op
    serve.set_defaults(func=cmd_coordinator_serve)
    status = coord.add_parser("status", help="rounds recorded in a coordinator's state")
    status.add_argument("--config", required=True, help="federation.toml")
    status.set_defaults(func=cmd_coordinator_status)

    inst = sub.add_parser("institution", help="run an institution daemon").add_subparsers(dest="action", required=True)
    run = inst.add_parser("run", help="join the federation and serve its studies' tasks until stopped")
    run.add_argument("--config", required=True, help="institution.toml")
    run.add_argument("--insecure", action="store_true", help="allow plaintext gRPC when no [tls] is configured")
    run.add_argument("--force-insecure", action="store_true", help="allow --insecure to a non-loopback address")
    run.add_argument("--exit-when-done", action="store_true",
                     help="one-shot: exit once every accepted study has ended, or once the coordinator is gone "
                          "after they ended (default: wait for new studies, and for the coordinator while it is "
                          "away, as a service does)")
    run.add_argument("--keep-running", action="store_true", help=argparse.SUPPRESS)  # the default now; a no-op
    run.set_defaults(func=cmd_institution_run)
    ledger = inst.add_parser("ledger", help="show or verify an institution's privacy ledger (epsilon spent)")
    where = ledger.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="institution.toml (the ledger is in its state_dir)")
    where.add_argument("--ledger", help="a privacy-ledger.sqlite file")
    ledger.add_argument("--study", help="only this study's rows (the site's totals still count every study)")
    ledger.add_argument("--migrate", action="store_true",
                        help="with --config: move older per-study ledgers into the site's one ledger")
    ledger.add_argument("--verify", action="store_true", help="check the hash chain; exit 1 if it is broken")
    ledger.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ledger.set_defaults(func=cmd_institution_ledger)

    from fedcollab._operator_cli import add_commands

    add_commands(sub)

    lineage = sub.add_parser("lineage", help="check the signed lineage of a study's models").add_subparsers(
        dest="action", required=True)
    lverify = lineage.add_parser("verify", help="check every model version's signed record, parent link and file; "
                                                "exit 1 naming the first broken link")
    lverify.add_argument("run_dir", metavar="RUN_DIR", help="a simulation run folder or a coordinator state_dir")
    lverify.add_argument("--public-key", metavar="FILE",
                         help="the coordinator's lineage-public-key.pem to pin (default: the one in the state, "
                              "which proves integrity but not origin)")
    lverify.add_argument("--json", action="store_true", help="print the report as JSON")
    lverify.set_defaults(func=cmd_lineage_verify)

    from fedcollab.serving import add_serve_command

    add_serve_command(sub)  # `fedcollab serve`: a pulled model over gRPC and HTTP/JSON

    pki = sub.add_parser("pki", help="the federation's certificates: CA, requests, signing, revocation")
    pki_sub = pki.add_subparsers(dest="action", required=True)
    p = pki_sub.add_parser("init", help="make the federation CA (operator, once)")
    p.add_argument("--dir", required=True, help="folder for the CA (created; refused if it holds a CA)")
    p.add_argument("--federation", required=True, help="the federation's name, recorded in the CA")
    p.add_argument("--days", type=int, default=3650, help="CA validity in days (default: 3650)")
    p.set_defaults(func=cmd_pki_init)
    p = pki_sub.add_parser("request", help="make a private key and a CSR here (the key never leaves)")
    who = p.add_mutually_exclusive_group(required=True)
    for role in ("institution", "operator", "coordinator"):
        who.add_argument(f"--{role}", metavar="NAME", help=f"request a {role} certificate for NAME")
    p.add_argument("--dns", action="append", metavar="HOST", help="coordinator only: a host name it is reached by")
    p.add_argument("--ip", action="append", metavar="ADDR", help="coordinator only: an IP address it is reached by")
    p.add_argument("--dir", default=".", help="where NAME-key.pem and NAME.csr go (default: here)")
    p.set_defaults(func=cmd_pki_request)
    p = pki_sub.add_parser("sign", help="check a CSR and issue its certificate (operator)")
    p.add_argument("--ca-dir", required=True, help="the folder `pki init` made")
    p.add_argument("--csr", required=True, help="the .csr file received")
    p.add_argument("--out", help="certificate file (default: the CSR's path with .pem)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    p.add_argument("--replace", action="store_true", help="revoke the name's current certificate as superseded")
    p.set_defaults(func=cmd_pki_sign)
    p = pki_sub.add_parser("revoke", help="revoke certificates and rewrite crl.pem (operator)")
    p.add_argument("--ca-dir", required=True, help="the folder `pki init` made")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--cert", help="the certificate file")
    which.add_argument("--serial", type=_serial, help="its serial, in hex as `pki list` prints it")
    which.add_argument("--name", help="every unrevoked certificate of this name")
    p.add_argument("--role", choices=("institution", "operator", "coordinator"), help="with --name: only this role")
    p.add_argument("--reason", default="unspecified",
                   help="key_compromise, affiliation_changed, superseded, cessation_of_operation, ... "
                        "(default: unspecified)")
    p.set_defaults(func=cmd_pki_revoke)
    p = pki_sub.add_parser("crl", help="re-sign crl.pem before it goes stale (every 30 days)")
    p.add_argument("--ca-dir", required=True, help="the folder `pki init` made")
    p.set_defaults(func=cmd_pki_crl)
    p = pki_sub.add_parser("list", help="certificates issued, with their status")
    p.add_argument("--ca-dir", required=True, help="the folder `pki init` made")
    p.set_defaults(func=cmd_pki_list)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if args.command != "simulate":
        level = min(level, logging.INFO)
    from fedcollab._logging import configure_logging

    configure_logging(level=level, fmt=args.log_format)
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
