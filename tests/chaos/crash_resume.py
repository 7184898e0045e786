#!/usr/bin/env python
"""Crash-resume chaos runs: kill (-9) the coordinator and the institution daemons at
random points of a real federation, restart them, and check what they leave behind.

    .venv/bin/python tests/chaos/crash_resume.py --runs 5 --rounds 20 --seed 1

Each run: a tiny study (a 1,210-parameter MLP on digits, 3 institutions, quorum 2,
1 KiB chunks, plaintext on 127.0.0.1), every process started through the `fedcollab`
command line with its own state folder. The coordinator is killed at each of its
crash points (upload_chunk, aggregated, commit_written, commit_recorded, via
FEDCOLLAB_CRASH_AT) and by timed `kill -9`s, the institutions at theirs
(download_chunk, trained, upload_chunk) and by timed kills; each is restarted at
once with the same config, state folder and port. Run i uses seed + i for its plan.

Checked after each run (tests/chaos/harness.py, `inspect_state`): exactly --rounds
rounds committed, each once; attempts consistent; v0..vR contiguous, each file present
with the SHA-256 the store and the signed lineage name, parent links, signatures;
`fedcollab lineage verify` and `fedcollab coordinator status` agree; no stray files;
every process exited 0 (the study finished). Exit status 0 only if every run passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests.chaos` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from tests.chaos.harness import (
    COORDINATOR_POINTS,
    INSTITUTION_POINTS,
    RunResult,
    Settings,
    random_plan,
    run_chaos,
)

# Wide enough for the tables when the output goes to a file or a pipe.
console = Console(highlight=False, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 180)
_KILL_COLUMNS = [*COORDINATOR_POINTS, "coordinator.timed", *INSTITUTION_POINTS, "institution.timed"]


_SHORT = {
    "coordinator.upload_chunk": "C:upl", "coordinator.aggregated": "C:agg", "coordinator.commit_written": "C:wri",
    "coordinator.commit_recorded": "C:rec", "coordinator.timed": "C:-9", "institution.download_chunk": "I:dl",
    "institution.trained": "I:trn", "institution.upload_chunk": "I:upl", "institution.timed": "I:-9",
}
_LEGEND = ("kills per point: C = coordinator, I = institution; upl = upload_chunk, agg = aggregated, "
           "wri = commit_written, rec = commit_recorded, dl = download_chunk, trn = trained, -9 = timed kill -9. "
           "Lost attempts: a = abandoned (coordinator killed while the round was open), f = failed (no quorum).")


def _short(column: str) -> str:
    return _SHORT.get(column, column)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs, each with its own plan (default 3)")
    p.add_argument("--rounds", type=int, default=20, help="rounds per run (default 20)")
    p.add_argument("--seed", type=int, default=1, help="run i uses seed + i for its kill plan (default 1)")
    p.add_argument("--institutions", type=int, default=3, help="institution daemons (default 3)")
    p.add_argument("--min-institutions", type=int, default=2, help="quorum per round (default 2)")
    p.add_argument("--coordinator-timed", type=int, default=3,
                   help="timed kills of the coordinator per run, besides one per crash point (default 3)")
    p.add_argument("--institution-timed", type=int, default=1, help="timed kills per institution (default 1)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up on a run after this many seconds")
    p.add_argument("--workdir", type=Path, help="where run folders go (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep every run folder (failed runs' are always kept)")
    p.add_argument("--json", type=Path, help="write every run's record (lives, kills, checks) to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="print every process start, not only kills")
    a = p.parse_args(argv)
    if a.runs < 1 or a.rounds < 1 or a.institutions < 1:
        p.error("--runs, --rounds and --institutions must be at least 1")
    if not 1 <= a.min_institutions <= a.institutions:
        p.error("--min-institutions must be in 1..--institutions")
    return a


def institution_names(n: int) -> tuple[str, ...]:
    base = ["hospital-a", "hospital-b", "lab-c"]
    return tuple(base[:n]) if n <= len(base) else (*base, *(f"site-{i}" for i in range(len(base), n)))


def run_all(args: argparse.Namespace) -> list[RunResult]:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedcollab-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    settings = Settings(rounds=args.rounds, institutions=institution_names(args.institutions),
                        min_institutions=args.min_institutions)
    console.print(f"[bold]crash-resume[/]: {args.runs} run(s) x {args.rounds} rounds, {args.institutions} "
                  f"institutions (quorum {args.min_institutions}), seeds {args.seed}..{args.seed + args.runs - 1}; "
                  f"work folder {workdir}")
    results: list[RunResult] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
                  TimeElapsedColumn(), TextColumn("{task.fields[last]}"), console=console) as progress:
        for i in range(args.runs):
            seed = args.seed + i
            plan = random_plan(settings, seed=seed, coordinator_timed=args.coordinator_timed,
                               institution_timed=args.institution_timed)
            progress.console.print(f"[bold]run {i + 1}[/] (seed {seed}) plan:")
            for line in plan.describe():
                progress.console.print(f"  {line}", markup=False)
            task = progress.add_task(f"run {i + 1} (seed {seed})", total=args.rounds, last="")
            folder = workdir / f"run-{i + 1}-seed-{seed}"
            shutil.rmtree(folder, ignore_errors=True)

            def on_event(msg: str, _task: int = task) -> None:
                if " killed " in msg or "aborted" in msg or args.verbose:
                    progress.console.print(f"  {msg}", markup=False)
                if " killed " in msg:
                    progress.update(_task, last=msg.split("] ", 1)[-1][:70])

            def on_progress(n: int, _task: int = task) -> None:
                progress.update(_task, completed=n)

            result = run_chaos(folder, settings=settings, plan=plan, seed=seed, timeout_s=args.timeout,
                               on_event=on_event, on_progress=on_progress)
            verdict = "[green]passed[/]" if result.ok else "[red]FAILED[/]"
            progress.update(task, last=f"{verdict} in {result.wall_s:.0f} s")
            for c in result.failed_checks():
                progress.console.print(f"  [red]✗ {c.name}[/]: ", end="")
                progress.console.print(c.detail, markup=False)
            results.append(result)
            if result.ok and not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    return results


def print_report(results: list[RunResult]) -> None:
    for i, r in enumerate(results, 1):
        kills = Table(title=f"run {i} (seed {r.seed}): kills, in order ({r.wall_s:.0f} s, folder {r.folder})",
                      title_justify="left")
        for col in ("t (s)", "process", "life", "killed by", "FEDCOLLAB_CRASH_AT", "rounds done", "where it landed"):
            kills.add_column(col, overflow="fold")
        for life in r.kills:
            kills.add_row(f"{life.ended_s:.1f}", life.process, str(life.index), life.killed_by, life.crash_at or "-",
                          str(life.committed_at_end), Text(life.where))
        console.print(kills)
        if r.not_reached:
            console.print("  planned but not reached (the study ended first): " + "; ".join(r.not_reached),
                          markup=False)

    checks = Table(title="invariants per run", title_justify="left")
    checks.add_column("check")
    for i, _ in enumerate(results, 1):
        checks.add_column(f"run {i}", justify="center")
    names = list(dict.fromkeys(c.name for r in results for c in r.checks))
    for name in names:
        cells = []
        for r in results:
            c = next((c for c in r.checks if c.name == name), None)
            cells.append("" if c is None else ("[green]✓[/]" if c.ok else ("[red]✗[/]" if c.invariant else
                                                                            "[yellow]![/]")))
        checks.add_row(name, *cells)
    console.print(checks)
    for i, r in enumerate(results, 1):
        for c in r.checks:
            if not c.ok:
                style = "red" if c.invariant else "yellow"
                console.print(f"[{style}]run {i}: {c.name}[/]: ", end="")
                console.print(c.detail, markup=False)
        if r.error:
            console.print(f"[red]run {i} error:[/] ", end="")
            console.print(r.error, markup=False)

    summary = Table(title="crash-resume runs", title_justify="left")
    for col in ("run", "seed", "wall (s)", "committed", "lost", *map(_short, _KILL_COLUMNS), "kills",
                "checks", "result"):
        summary.add_column(col, justify="right")
    for i, r in enumerate(results, 1):
        k = r.kill_counts()
        lost = {s: n for s, n in r.attempts.items() if s != "committed"}
        passed = sum(1 for c in r.checks if c.invariant and c.ok)
        total = sum(1 for c in r.checks if c.invariant)
        summary.add_row(str(i), str(r.seed), f"{r.wall_s:.0f}", str(r.attempts.get("committed", 0)),
                        "+".join(f"{n}{s[0]}" for s, n in sorted(lost.items())) or "0",
                        *(str(k.get(col, 0)) for col in _KILL_COLUMNS), str(len(r.kills)), f"{passed}/{total}",
                        "[green]passed[/]" if r.ok else "[red]FAILED[/]")
    console.print(summary)
    console.print(f"{_LEGEND} {sum(len(r.kills) for r in results)} kills in {len(results)} run(s), "
                  f"{sum(r.wall_s for r in results):.0f} s in all.", style="dim")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        results = run_all(args)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: the processes of the current run were stopped")
        return 130
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=1, default=str) + "\n",
                             encoding="utf-8")
        console.print(f"records written to {args.json}")
    ok = all(r.ok for r in results)
    console.print(("[green]all runs passed[/]" if ok else "[red]some runs failed[/]")
                  + f" ({time.monotonic() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
