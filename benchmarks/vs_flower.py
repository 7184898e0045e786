#!/usr/bin/env python
"""fedcollab next to Flower 1.41 (deploy mode): round time and server-side peak memory.

What it measures
----------------
For each institution count K (--institutions, several allowed: `--institutions 4 16`),
one after the other, never at the same time:

1. fedcollab, exactly as `round_overhead.py` runs it (its code is imported, not copied):
   one coordinator and K institution daemons, each its own process started through the
   command line, plaintext gRPC on loopback, R rounds (default 1) of FedAvg on a "blob"
   model of N float32 parameters (default 50M, 200 MB) with the synthetic trainer
   (small noise, no training), so a round is pure overhead.
   - round time: `rounds.opened_at -> closed_at` in the coordinator's SQLite store, from
     opening the round to the durable commit of the new model (downloads, uploads,
     verification, streaming FedAvg, atomic write + fsync + SHA-256 + SQLite);
   - server-side peak memory: the coordinator process's peak RSS (ru_maxrss from
     wait4), which is the whole server side; also as a multiple of the model's bytes
     (N x 4), against the target of at most 2.5x;
   - client-side peak: the largest institution's peak RSS.
2. Flower 1.41, with `/work/shared/peers/flower/bench_flower_large.py --mode deploy`
   run by the Python of a Flower virtual environment (--flower-python), in a temporary
   folder of its own, with FLWR_TELEMETRY_ENABLED=0: one `flower-superlink`, K
   `flower-supernode`s and `flwr run` on loopback, the same N float32 parameters (25
   tensors), clients that add noise and do not train, federated evaluation off.
   - round time: the ServerApp's `configure_train` start -> `aggregate_train` end
     (send, clients pull, add noise, reply, pull, FedAvg in memory; nothing persisted);
   - server-side peak memory: the ServerApp process (ru_maxrss) PLUS the SuperLink
     process (VmHWM), the two figures bench_flower_large reports, summed. The sum of two
     peaks is an upper bound of what the two held at the same moment; the sampled
     (every 0.2 s) peak of the summed RSS of the whole server tree (SuperLink, its
     SuperExec and the ServerApp) is shown too, as is the server SuperExec's own peak,
     which is not in the sum;
   - client-side peak: the largest ClientApp peak plus the largest SuperNode peak (one
     Flower client is both processes, plus a small SuperExec).

Then, per K: fedcollab / Flower for the round time (target <= 0.1x) and for the
server-side peak (target <= 0.2x), each marked met / NOT met; and, when several K are
given, how the coordinator's peak changes between them (target: flat, i.e. it grows by
at most 0.25 x the model's bytes from the smallest K to the largest).

Without a Flower Python (or with --skip-flower) only fedcollab's side runs, and the way
to create the Flower environment is printed.

    .venv/bin/python benchmarks/vs_flower.py                                   # 50M x 4, both
    .venv/bin/python benchmarks/vs_flower.py --institutions 4 16 --skip-flower # flat in K?
    .venv/bin/python benchmarks/vs_flower.py --params 1000000 --institutions 2 # quick check
    # options: --rounds R, --flower-python PATH, --timeout S, --keep, --json out.json

Run it on an otherwise idle machine: both sides are timed on the same cores, and the load
average before each side is printed. Measured peaks, summed over the processes: 50M x 4
about 5 GB on fedcollab's side and 10 GB on Flower's; 50M x 16 on fedcollab's side about
17 GB (16 institutions of about 1 GB). Linux only; loopback addresses only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import round_overhead as ro  # noqa: E402  (a sibling script, not a package)

console = ro.console
MiB = ro.MiB
TARGET_TIME_RATIO = 0.1
TARGET_MEMORY_RATIO = 0.2
TARGET_PEAK_X_MODEL = 2.5
FLAT_TOLERANCE_X_MODEL = 0.25  # "flat": grows by at most this many model sizes from the smallest K to the largest
DEFAULT_FLOWER_PYTHON = Path("/tmp/venv-flower/bin/python")
FLOWER_DIR = Path("/work/shared/peers/flower")
FLOWER_BENCH = FLOWER_DIR / "bench_flower_large.py"
FLOWER_STOP_GRACE_S = 30.0


@dataclass(frozen=True)
class Options:
    params: int
    institutions: tuple[int, ...]
    rounds: int
    flower_python: Path
    skip_flower: bool
    timeout_s: float
    keep: bool
    json_path: Path | None

    @property
    def model_bytes(self) -> int:
        return self.params * 4


# ---------------------------------------------------------------------------- fedcollab
def run_fedcollab(opts: Options, institutions: int) -> dict[str, Any]:
    """round_overhead's whole benchmark for K institutions, reduced to the figures compared
    here ({"error": why} if it failed; its folder is then kept)."""
    ro_opts = ro.Options(params=opts.params, institutions=institutions, rounds=opts.rounds, chunk_mib=1,
                         timeout_s=opts.timeout_s, sample_s=0.025, json_path=None, workdir=None, keep=opts.keep)
    console.rule(f"fedcollab: {opts.params:,} params x {institutions} institutions, {opts.rounds} round(s)")
    load = os.getloadavg()[0]
    try:
        res = ro.benchmark(opts=ro_opts)
    except ro.BenchError as e:
        console.print("[red]fedcollab's run failed[/]")
        return {"error": str(e), "load_before": load}
    console.print(ro.summary_line(res), highlight=False)
    coord = res["coordinator"]
    return {
        "round_s": mean([r["round_s"] for r in res["rounds"]]),
        "round_s_all": [r["round_s"] for r in res["rounds"]],
        "server_peak_bytes": coord["peak_rss_bytes"],
        "server_peak_x_model": coord["peak_x_model"],
        "import_baseline_bytes": coord["import_baseline_rss_bytes"],
        "above_baseline_x_model": coord["above_baseline_x_model"],
        "client_peak_bytes": max(p["peak_rss_bytes"] for p in res["institution_processes"].values()),
        "total_wall_s": res["total_wall_s"],
        "load_before": load,
        "details": {k: v for k, v in res.items() if k != "rss_timeline_mib"},
    }


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# ---------------------------------------------------------------------------- Flower
def flower_setup_hint(python: Path) -> str:
    return (f"no Flower 1.41 at {python}. Create it as {FLOWER_DIR / 'README.md'} says:\n"
            "    python3 -m venv /tmp/venv-flower\n"
            "    /tmp/venv-flower/bin/pip install torch==2.13.0\n"
            f"    /tmp/venv-flower/bin/pip install -c {FLOWER_DIR / 'constraints.txt'} 'flwr==1.41.0'\n"
            "then run again (or pass --flower-python PATH). Running fedcollab's side only.")


def flower_env(python: Path) -> dict[str, str]:
    """As if Flower's environment were activated: the SuperLink and the SuperNodes start
    `flower-superexec` from PATH. Nothing from this checkout's environment."""
    bindir = python.parent  # not resolved: a venv's python is a link to the base interpreter
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1",
               VIRTUAL_ENV=str(bindir.parent), PATH=os.pathsep.join([str(bindir), os.environ.get("PATH", "")]))
    for var in ("PYTHONPATH", "PYTHONHOME"):
        env.pop(var, None)
    return env


def flower_version(python: Path) -> str | None:
    """flwr's version in that Python, or None if it has none (or the Python is missing)."""
    if not python.exists():
        return None
    try:
        done = subprocess.run([str(python), "-I", "-c", "import flwr; print(flwr.__version__)"],
                              capture_output=True, text=True, env=flower_env(python), timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(clients: int) -> int:
    """A port P with P (SuperLink) and P+100 .. P+100+clients-1 (SuperNodes) free on
    loopback: the layout bench_flower_large uses."""
    for _ in range(100):
        base = random.randrange(20_000, 60_000 - 100 - clients)
        if all(_port_free(p) for p in (base, *range(base + 100, base + 100 + clients))):
            return base
    raise ro.BenchError("found no free block of loopback ports for Flower")


def _stop_flower(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT first: bench_flower_large then stops the SuperLink and SuperNodes it started
    (each in a session of its own) in its `finally`; SIGKILL only if it hangs."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=FLOWER_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _flower_tag(opts: Options) -> str:
    return f"deploy_{opts.params}" + (f"_r{opts.rounds}" if opts.rounds != 1 else "")


def _wait_flower(proc: subprocess.Popen[bytes], *, run_log: Path, timeout_s: float) -> None:
    """Until bench_flower_large exits, showing its ServerApp's [BENCH] lines as they come."""
    follower = ro.LogFollower(run_log)
    t0 = time.monotonic()
    last = "starting SuperLink and SuperNodes"
    with console.status("") as status:
        while proc.poll() is None:
            for line in follower.new_lines():
                if "[BENCH]" in line:
                    last = line[line.index("[BENCH]"):]
                    console.log(f"Flower: {last[:200]}", highlight=False)
            if time.monotonic() - t0 > timeout_s:
                raise subprocess.TimeoutExpired(proc.args, timeout_s)
            status.update(f"{time.monotonic() - t0:6.1f} s | Flower deploy | {last[:100]}")
            time.sleep(0.5)


def run_flower(opts: Options, institutions: int) -> dict[str, Any]:
    """bench_flower_large --mode deploy for K clients, reduced to the figures compared here
    ({"error": why} if it failed; its folder is then kept)."""
    console.rule(f"Flower 1.41 deploy: {opts.params:,} params x {institutions} clients, {opts.rounds} round(s)")
    folder = Path(tempfile.mkdtemp(prefix="fedcollab-vs-flower-"))
    port = free_port_block(institutions)
    cmd = [str(opts.flower_python), str(FLOWER_BENCH), "--mode", "deploy", "--params", str(opts.params),
           "--clients", str(institutions), "--rounds", str(opts.rounds), "--port", str(port),
           "--timeout", str(int(opts.timeout_s)), "--workdir", str(folder)]
    log_path = folder / "bench_flower_large.log"
    load = os.getloadavg()[0]
    console.log(f"work folder {folder}; SuperLink on 127.0.0.1:{port}")
    ok = False
    try:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=flower_env(opts.flower_python), cwd=folder, start_new_session=True)
        try:
            _wait_flower(proc, run_log=folder / _flower_tag(opts) / "logs" / "flwr_run.log",
                         timeout_s=opts.timeout_s + 300)  # + start-up and shut-down of the infrastructure
        except subprocess.TimeoutExpired:
            return {"error": f"Flower's run passed --timeout; last lines of {log_path}:\n{ro.log_tail(log_path)}",
                    "load_before": load}
        finally:
            with ro._signals_deferred():
                _stop_flower(proc)
        result = folder / f"result_{_flower_tag(opts)}.json"
        if proc.returncode != 0 or not result.is_file():
            return {"error": f"bench_flower_large exited with code {proc.returncode}; last lines of {log_path}:\n"
                             f"{ro.log_tail(log_path)}", "load_before": load}
        record = json.loads(result.read_text(encoding="utf-8"))
        figures = flower_figures(record, port=port)
        figures["load_before"] = load
        ok = "error" not in figures
        return figures
    finally:
        if ok and not opts.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            console.print(f"Flower's logs kept in {folder}", style="yellow")


def _process_peak_mb(record: dict[str, Any], *needles: str) -> float:
    """Largest sampled VmHWM (MiB) among bench_flower_large's per-process peaks whose
    command line contains every needle (0 if none is listed: it keeps the top 14)."""
    return max((p["vmhwm_mb"] for p in record.get("per_process_peak", [])
                if all(n in p["cmd"] for n in needles)), default=0.0)


def flower_figures(record: dict[str, Any], *, port: int) -> dict[str, Any]:
    if record.get("num_errors") or record.get("num_replies") != record.get("num_clients"):
        return {"error": f"Flower's round had {record.get('num_errors')} errors, "
                         f"{record.get('num_replies')} of {record.get('num_clients')} replies"}
    tree = list(record.get("superlink_tree_vmhwm_mb", {}).values())  # SuperLink first: the tree's root
    superlink_mb = _process_peak_mb(record, "flower-superlink") or (tree[0] if tree else 0.0)
    serverapp_mb = float(record["serverapp_maxrss_mb"])
    superexec_mb = _process_peak_mb(record, "flower-superexec", f"127.0.0.1:{port} ")
    clientapp_mb = max([_process_peak_mb(record, "flwr-clientapp")]
                       + [float(c["client-maxrss-mb"]) for c in record.get("client_metrics", [])])
    supernode_mb = max(record.get("supernode_vmhwm_mb") or [0.0])
    server_tree = next((v for k, v in record.get("sampled_peak_sum_rss_mb", {}).items() if k.startswith("server")),
                       None)
    return {
        "round_s": mean(record["round_s_all"]),
        "round_s_all": record["round_s_all"],
        "send_and_receive_s": record.get("send_and_receive_s"),
        "aggregate_s": record.get("aggregate_s"),
        "serverapp_peak_bytes": int(serverapp_mb * MiB),
        "superlink_peak_bytes": int(superlink_mb * MiB),
        "server_peak_bytes": int((serverapp_mb + superlink_mb) * MiB),  # ServerApp + SuperLink
        "server_superexec_peak_bytes": int(superexec_mb * MiB) if superexec_mb else None,
        "server_tree_sampled_sum_bytes": None if server_tree is None else int(server_tree * MiB),
        "clientapp_peak_bytes": int(clientapp_mb * MiB),
        "supernode_peak_bytes": int(supernode_mb * MiB),
        "client_peak_bytes": int((clientapp_mb + supernode_mb) * MiB),  # max ClientApp + max SuperNode
        "flwr_run_wall_s": record.get("flwr_run_wall_s"),
        "versions": record.get("versions"),
        "record": record,
    }


# ---------------------------------------------------------------------------- comparison
def verdict(value: float, target: float) -> str:
    return "[green]met[/]" if value <= target else "[red]NOT met[/]"


def compare(ours: dict[str, Any], flower: dict[str, Any] | None) -> dict[str, Any]:
    """fedcollab / Flower for what is compared, with the targets."""
    out: dict[str, Any] = {"peak_x_model": ours["server_peak_x_model"],
                           "peak_x_model_met": ours["server_peak_x_model"] <= TARGET_PEAK_X_MODEL}
    if flower is None or "error" in flower:
        return out
    time_ratio = ours["round_s"] / flower["round_s"]
    memory_ratio = ours["server_peak_bytes"] / flower["server_peak_bytes"]
    out.update({
        "round_time": time_ratio, "round_time_met": time_ratio <= TARGET_TIME_RATIO,
        "server_peak": memory_ratio, "server_peak_met": memory_ratio <= TARGET_MEMORY_RATIO,
        "server_peak_vs_serverapp_only": ours["server_peak_bytes"] / flower["serverapp_peak_bytes"],
        "client_peak": ours["client_peak_bytes"] / flower["client_peak_bytes"],
    })
    return out


def flatness(runs: Sequence[dict[str, Any]], *, model_bytes: int) -> dict[str, Any] | None:
    """How the coordinator's peak changes from the smallest K to the largest."""
    done = sorted((r for r in runs if "error" not in r["fedcollab"]), key=lambda r: r["institutions"])
    if len({r["institutions"] for r in done}) < 2:
        return None
    first, last = done[0], done[-1]
    grow = last["fedcollab"]["server_peak_bytes"] - first["fedcollab"]["server_peak_bytes"]
    return {
        "from_institutions": first["institutions"], "to_institutions": last["institutions"],
        "peaks_bytes": {r["institutions"]: r["fedcollab"]["server_peak_bytes"] for r in done},
        "growth_bytes": grow, "growth_x_model": grow / model_bytes,
        "growth_ratio": last["fedcollab"]["server_peak_bytes"] / first["fedcollab"]["server_peak_bytes"],
        "per_institution_bytes": grow / (last["institutions"] - first["institutions"]),
        "flat": grow / model_bytes <= FLAT_TOLERANCE_X_MODEL,
    }


# ---------------------------------------------------------------------------- output
def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:,.0f} MiB"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


Row = tuple[str, str, str, str, str, str]  # figure, fedcollab, Flower, fedcollab / Flower, target, verdict


def comparison_rows(ours: dict[str, Any], f: dict[str, Any], ratio: dict[str, Any], *, rounds: int) -> list[Row]:
    """The table's rows; `f` is Flower's figures ({} when it did not run)."""
    both = bool(f)
    return [
        ("round time" + (" (mean)" if rounds > 1 else ""), _s(ours["round_s"]), _s(f.get("round_s")),
         _x(ratio.get("round_time")), f"<= {TARGET_TIME_RATIO}x" if both else "",
         verdict(ratio["round_time"], TARGET_TIME_RATIO) if both else ""),
        ("server-side peak memory", _mib(ours["server_peak_bytes"]), _mib(f.get("server_peak_bytes")),
         _x(ratio.get("server_peak")), f"<= {TARGET_MEMORY_RATIO}x" if both else "",
         verdict(ratio["server_peak"], TARGET_MEMORY_RATIO) if both else ""),
        ("  Flower ServerApp alone (ru_maxrss)", "", _mib(f.get("serverapp_peak_bytes")),
         _x(ratio.get("server_peak_vs_serverapp_only")), "", ""),
        ("  Flower SuperLink alone (VmHWM)", "", _mib(f.get("superlink_peak_bytes")), "", "", ""),
        ("  Flower server SuperExec, not summed", "", _mib(f.get("server_superexec_peak_bytes")), "", "", ""),
        ("  Flower server tree, sampled RSS sum", "", _mib(f.get("server_tree_sampled_sum_bytes")), "", "", ""),
        ("client-side peak memory", _mib(ours["client_peak_bytes"]), _mib(f.get("client_peak_bytes")),
         _x(ratio.get("client_peak")), "", ""),
        ("coordinator peak / model bytes", _x(ours["server_peak_x_model"]), "", "", f"<= {TARGET_PEAK_X_MODEL}x",
         verdict(ours["server_peak_x_model"], TARGET_PEAK_X_MODEL)),
        ("  the same, above an import-only process", _x(ours["above_baseline_x_model"]), "", "",
         f"<= {TARGET_PEAK_X_MODEL}x", verdict(ours["above_baseline_x_model"], TARGET_PEAK_X_MODEL)),
    ]


def print_run(opts: Options, run: dict[str, Any]) -> None:
    ours, flower = run["fedcollab"], run["flower"]
    have_flower = flower is not None and "error" not in flower
    console.rule(("fedcollab vs Flower 1.41" if have_flower else "fedcollab") + f": {opts.params:,} params "
                 f"({_mib(opts.model_bytes)}) x {run['institutions']}, {opts.rounds} round(s)")
    if "error" in ours:
        console.print("[red]fedcollab's run failed:[/]")
        console.print(ours["error"], markup=False, highlight=False)
        return
    rows = comparison_rows(ours, flower if have_flower else {}, run["ratios"], rounds=opts.rounds)
    columns = ["figure", "fedcollab", "Flower 1.41 deploy", "fedcollab / Flower", "target", ""]
    keep = range(6) if have_flower else (0, 1, 4, 5)  # without Flower: neither its column nor its rows
    table = Table(title_justify="left",
                  title="fedcollab / Flower: below 1 means fedcollab is faster / smaller" if have_flower else None)
    for i in keep:
        table.add_column(columns[i], justify="left" if i in (0, 5) else "right")
    for row in rows:
        if have_flower or not row[0].startswith("  Flower"):
            table.add_row(*(row[i] for i in keep))
    console.print(table)
    notes = ["fedcollab round = rounds.opened_at -> closed_at (includes the durable commit of the new model)"
             + ("; Flower round = ServerApp configure_train start -> aggregate_train end (nothing persisted)."
                if have_flower else "."),
             "server-side peak: fedcollab = the coordinator process (the whole server side)"
             + ("; Flower = ServerApp peak + SuperLink peak, summed (an upper bound of what both held at once; the "
                "server SuperExec and the sampled sum over the whole server tree are shown, not compared)."
                if have_flower else "."),
             "client-side peak: fedcollab = the largest institution process"
             + ("; Flower = the largest ClientApp peak + the largest SuperNode peak." if have_flower else "."),
             "coordinator peak / model bytes: the whole process's peak RSS, and the same less the RSS of a process "
             f"that only imports fedcollab ({_mib(ours['import_baseline_bytes'])}: python, torch, grpc).",
             f"load average (1 min) before each side: fedcollab {ours['load_before']:.1f}"
             + (f", Flower {flower['load_before']:.1f}" if flower else "") + f" on {os.cpu_count()} CPUs."]
    console.print("\n".join(f"  {n}" for n in notes), style="dim", highlight=False)
    if flower is None:
        console.print("  Flower: not run", style="yellow")
    elif "error" in flower:
        console.print("[red]Flower's run failed:[/]")
        console.print(flower["error"], markup=False, highlight=False)


def print_flatness(opts: Options, runs: Sequence[dict[str, Any]], flat: dict[str, Any] | None) -> None:
    if flat is None:
        return
    console.rule(f"coordinator peak vs number of institutions, {opts.params:,} params")
    table = Table()
    for col in ("institutions", "coordinator peak", "x model", "above import baseline, x model", "round time"):
        table.add_column(col, justify="right")
    for r in sorted(runs, key=lambda r: r["institutions"]):
        ours = r["fedcollab"]
        if "error" in ours:
            table.add_row(str(r["institutions"]), "[red]failed[/]", "-", "-", "-")
            continue
        table.add_row(str(r["institutions"]), _mib(ours["server_peak_bytes"]), _x(ours["server_peak_x_model"]),
                      f"{ours['above_baseline_x_model']:.2f}", _s(ours["round_s"]))
    console.print(table)
    console.print(flatness_line(flat), highlight=False)


def flatness_line(flat: dict[str, Any]) -> str:
    return (f"coordinator peak {flat['from_institutions']} -> {flat['to_institutions']} institutions: "
            f"{flat['growth_bytes'] / MiB:+,.0f} MiB ({flat['growth_x_model']:+.2f} x model, "
            f"{flat['growth_ratio']:.2f}x, {flat['per_institution_bytes'] / MiB:+,.1f} MiB per institution); "
            f"flat (grows <= {FLAT_TOLERANCE_X_MODEL} x model): "
            + ("[green]met[/]" if flat["flat"] else "[red]NOT met[/]"))


# ---------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=50_000_000, help="float32 parameters in the model (default 50M)")
    p.add_argument("--institutions", type=int, nargs="+", default=[4],
                   help="institution (Flower: client) counts, each run in turn (default 4)")
    p.add_argument("--rounds", type=int, default=1, help="rounds per run (default 1)")
    p.add_argument("--flower-python", type=Path, default=DEFAULT_FLOWER_PYTHON,
                   help=f"Python of a virtual environment with flwr 1.41 (default {DEFAULT_FLOWER_PYTHON})")
    p.add_argument("--skip-flower", action="store_true", help="run fedcollab's side only")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up on a run after this many seconds "
                   "(default 1800)")
    p.add_argument("--keep", action="store_true", help="keep the work folders (logs, state, models)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    if a.params < 1 or a.rounds < 1 or min(a.institutions) < 1:
        p.error("--params, --rounds and every --institutions must be at least 1")
    return Options(params=a.params, institutions=tuple(dict.fromkeys(a.institutions)), rounds=a.rounds,
                   flower_python=a.flower_python, skip_flower=a.skip_flower, timeout_s=a.timeout, keep=a.keep,
                   json_path=a.json)


def benchmark(opts: Options) -> dict[str, Any]:
    version = None if opts.skip_flower else flower_version(opts.flower_python)
    if not opts.skip_flower and version is None:
        console.print(flower_setup_hint(opts.flower_python), style="yellow", highlight=False)
    elif version is not None and not version.startswith("1.41"):
        console.print(f"Flower at {opts.flower_python} is {version}, not 1.41", style="yellow")
    runs = []
    for k in opts.institutions:
        ours = run_fedcollab(opts, k)  # one after the other: never both at once
        flower = run_flower(opts, k) if version is not None else None
        runs.append({"institutions": k, "fedcollab": ours, "flower": flower,
                     "ratios": {} if "error" in ours else compare(ours, flower)})
    for run in runs:
        print_run(opts, run)
    flat = flatness(runs, model_bytes=opts.model_bytes)
    print_flatness(opts, runs, flat)
    return {"benchmark": "fedcollab vs_flower", "params": opts.params, "model_bytes": opts.model_bytes,
            "rounds": opts.rounds, "flower_version": version, "cpus": os.cpu_count(),
            "targets": {"round_time_ratio": TARGET_TIME_RATIO, "server_peak_ratio": TARGET_MEMORY_RATIO,
                        "coordinator_peak_x_model": TARGET_PEAK_X_MODEL,
                        "flat_growth_x_model": FLAT_TOLERANCE_X_MODEL},
            "definitions": {"flower_server_peak": "ServerApp ru_maxrss + SuperLink VmHWM",
                            "flower_client_peak": "max ClientApp peak + max SuperNode peak",
                            "fedcollab_server_peak": "coordinator ru_maxrss",
                            "fedcollab_client_peak": "max institution ru_maxrss"},
            "runs": runs, "flatness": flat}


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    results, code = ro.run_cli(lambda: benchmark(opts), json_path=opts.json_path)
    if results is None:
        return code
    failed = [r for r in results["runs"] if "error" in r["fedcollab"] or (r["flower"] and "error" in r["flower"])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
