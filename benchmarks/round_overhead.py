#!/usr/bin/env python
"""Round overhead of fedcollab on a large model: time, bytes and peak memory of one round.

What it measures
----------------
One coordinator and K institution daemons, each its own process started through the
real command line (`python -m fedcollab coordinator serve --insecure` and
`python -m fedcollab institution run --insecure`, plaintext gRPC on loopback), run R
rounds (default 1) of FedAvg on a "blob" model: N float32 parameters (default 50M,
200 MB) and nothing else. The institutions use the synthetic trainer, which adds small
seeded noise instead of training, so a round is pure overhead:

    round opens -> each institution downloads the model (chunked, hashed, fsynced)
    -> adds noise, computes its delta -> uploads it (chunked, hashed)
    -> the coordinator verifies every chunk and the whole update, spools it, folds it
       into a streaming FedAvg -> applies the mean to the base model
    -> commits the new model atomically (safetensors file, fsync, SHA-256, SQLite).

Figures
- round wall time: `rounds.opened_at -> rounds.closed_at` of the committed round in the
  coordinator's SQLite store, i.e. from opening the round to the durable commit of the
  new model. It is split, where the files allow, into: downloads done (mtime of each
  institution's cached copy of the base model), aggregated (the round's
  `train_seconds`: open -> all updates folded and applied) and commit (the rest).
  Federated evaluation (after the commit) is not in the round.
- bytes moved in the round: the coordinator's counters (`bytes_out`: model downloads,
  `bytes_in`: uploaded updates, payload only), next to what K downloads + K uploads of
  the model should take.
- peak RSS of every process: exact, `ru_maxrss` from wait4() when the process is reaped,
  cross-checked with the last VmHWM read from /proc/PID/status before it exited and the
  peak of psutil samples taken every 25 ms. The coordinator's peak is also given as a
  multiple of the model's size (N x 4 bytes), next to the RSS of a process that only
  imports fedcollab (python + torch + grpc) and the coordinator's RSS once it serves,
  so the part that scales with the model stands out.
- total wall time: from starting the coordinator until every process has exited.

Side by side with Flower
------------------------
    /work/main/.venv/bin/python benchmarks/round_overhead.py                # 50M x 4
    . .venv-flower/bin/activate && python /work/shared/peers/flower/bench_flower_large.py \\
        --mode deploy --params 50000000 --clients 4

Run them one after the other on the same idle machine. Flower's "round" is its
ServerApp's configure_train start -> aggregate_train end (send, clients pull, add noise,
reply, pull, FedAvg in memory; no model persisted, federated evaluation off); compare
it with the round wall time here, which also includes the durable commit. Flower's
server side is several processes (SuperLink, SuperExec, ServerApp): add their peaks
and compare with the coordinator's, which does all of that in one process. Its
clients (SuperNode + ClientApp) compare with the institutions.

Linux only (/proc, wait4). Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
from rich.console import Console
from rich.table import Table

MiB = 1 << 20
GiB = 1 << 30
PORT_TIMEOUT_S = 60.0
# Once the coordinator has exited, institutions should have heard FINISHED already.
AFTER_COORDINATOR_S = 30.0
LOG_TAIL_LINES = 40
_PORT = re.compile(r"on 127\.0\.0\.1:([1-9][0-9]*)")  # "...:0" is the configured address
_EVENTS = ("opened with", "folded in", "committed", "failed", "finished", "Traceback")

# Wide enough for the tables when the output goes to a file or a pipe.
console = Console(log_path=False, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 150)


class BenchError(RuntimeError):
    """The benchmark could not complete; the message says why and shows the log."""


@dataclass(frozen=True)
class Options:
    params: int
    institutions: int
    rounds: int
    chunk_mib: int
    timeout_s: float
    sample_s: float
    json_path: Path | None
    workdir: Path | None
    keep: bool

    @property
    def model_bytes(self) -> int:
        return self.params * 4


# ---------------------------------------------------------------------------- processes
@dataclass
class Child:
    """A process started here, its log, and what is known of its memory."""

    name: str
    popen: subprocess.Popen[bytes]
    ps: psutil.Process
    log_path: Path
    started: float
    exit_code: int | None = None  # set (last) by the watcher when it reaps the process
    exited: float | None = None
    maxrss_bytes: int = 0  # ru_maxrss from wait4: the exact peak
    last_vmhwm_bytes: int = 0  # VmHWM as last read before the process went away
    sampled_peak_bytes: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (unix time, RSS)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.exit_code is None


def spawn(*, name: str, args: Sequence[str], log_path: Path, env: dict[str, str], cwd: Path) -> Child:
    with log_path.open("wb") as log:
        popen = subprocess.Popen(  # own session: a Ctrl-C here reaches only us, we stop them
            [sys.executable, "-m", "fedcollab", *args], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
        )
    return Child(name=name, popen=popen, ps=psutil.Process(popen.pid), log_path=log_path, started=time.time())


def _proc_status_bytes(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None  # gone, or a zombie (its memory is already released)


def _observe(child: Child) -> None:
    now = time.time()
    try:
        rss = child.ps.memory_info().rss
    except psutil.Error:
        rss = 0
    if rss:
        child.samples.append((now, rss))
        child.sampled_peak_bytes = max(child.sampled_peak_bytes, rss)
    hwm = _proc_status_bytes(child.pid, "VmHWM")  # read as late as possible: just before wait4
    if hwm:
        child.last_vmhwm_bytes = hwm
    _reap(child, now=now)


def _reap(child: Child, *, now: float) -> None:
    pid, status, usage = os.wait4(child.pid, os.WNOHANG)
    if pid == 0:
        return
    child.maxrss_bytes = usage.ru_maxrss * 1024  # Linux: KiB
    child.exited = now
    code = os.waitstatus_to_exitcode(status)
    child.popen.returncode = code  # so that Popen does not wait for it again
    child.exit_code = code


class Watcher(threading.Thread):
    """Samples every child's RSS every `interval_s` and reaps the children itself, so the
    exact peak (ru_maxrss), the last VmHWM and the exit code all come from one place."""

    def __init__(self, *, interval_s: float) -> None:
        super().__init__(name="rss-watcher", daemon=True)
        self._interval = interval_s
        self._children: list[Child] = []
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def add(self, child: Child) -> None:
        with self._lock:
            self._children.append(child)

    def run(self) -> None:
        while not self._halt.is_set():
            with self._lock:
                children = [c for c in self._children if c.running]
            for child in children:
                _observe(child)
            self._halt.wait(self._interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _signal_group(child: Child, sig: signal.Signals) -> None:
    try:
        os.killpg(child.pid, sig)  # the group this child leads (start_new_session)
    except ProcessLookupError:
        pass


def stop_all(children: Iterable[Child], *, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, to every child still running. Call after
    the watcher has stopped, so that nothing else reaps them meanwhile."""
    alive = [c for c in children if c.running and c.popen.poll() is None]
    for child in alive:
        _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in alive:
        try:
            child.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child, signal.SIGKILL)
            child.popen.wait()


@contextmanager
def _signals_deferred() -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def log_tail(path: Path, *, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _failure(child: Child, what: str) -> BenchError:
    return BenchError(f"{child.name} {what}; last lines of {child.log_path}:\n{log_tail(child.log_path)}")


class LogFollower:
    """New complete lines of a growing log file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._partial = b""

    def new_lines(self) -> list[str]:
        try:
            with self._path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [line.decode("utf-8", errors="replace").rstrip() for line in lines if line.strip()]


# ---------------------------------------------------------------------------- set-up
def child_env() -> dict[str, str]:
    return dict(os.environ, COLUMNS="200", PYTHONUNBUFFERED="1", FLWR_TELEMETRY_ENABLED="0")


def _toml_str(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_federation_toml(*, folder: Path, opts: Options) -> Path:
    path = folder / "federation.toml"
    path.write_text(
        "[federation]\n"
        'name = "round-overhead"\n\n'
        "[server]\n"
        'address = "127.0.0.1:0"\n'
        f"state_dir = {_toml_str(folder / 'coordinator-state')}\n"
        f"chunk_bytes = {opts.chunk_mib * MiB}\n\n"
        "[study]\n"
        'name = "round-overhead"\n'
        f"rounds = {opts.rounds}\n"
        f"min_institutions = {opts.institutions}\n"
        f"round_timeout_s = {opts.timeout_s}\n\n"
        "[study.model]\n"
        'kind = "blob"\n'
        f"params = {{ num_parameters = {opts.params} }}\n",
        encoding="utf-8",
    )
    return path


def write_institution_toml(*, folder: Path, name: str, port: int) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(
        "[institution]\n"
        f"name = {_toml_str(name)}\n"
        f'coordinator = "127.0.0.1:{port}"\n'
        f"state_dir = {_toml_str(folder / name)}\n"
        'trainer = "synthetic"\n',
        encoding="utf-8",
    )
    return path


def measure_import_baseline(*, env: dict[str, str]) -> int:
    """RSS of a process that has only imported what `fedcollab coordinator serve` imports
    (python, torch, grpc, protobuf, safetensors, cryptography): the floor under the
    coordinator's figures."""
    code = (
        "import fedcollab.cli, fedcollab.coordinator\n"
        "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmRSS:')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    if done.returncode != 0:
        raise BenchError(f"cannot import fedcollab with {sys.executable}:\n{done.stderr[-3000:]}")
    return int(done.stdout.split()[-1])


def loopback_bytes() -> int | None:
    """Bytes received on `lo` so far (all loopback traffic in this network namespace)."""
    try:
        with open("/proc/net/dev", encoding="ascii") as f:
            for line in f:
                name, _, data = line.partition(":")
                if name.strip() == "lo":
                    return int(data.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---------------------------------------------------------------------------- the run
@dataclass
class RunRecord:
    t_start: float
    t_serving: float
    t_end: float
    port: int
    coordinator: Child
    institutions: list[Child]
    serving_rss_bytes: int
    serving_vmhwm_bytes: int
    loopback_bytes: int | None


def wait_for_port(*, coordinator: Child, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    with console.status("coordinator starting (python, torch, the initial model)..."):
        while time.monotonic() < deadline:
            text = coordinator.log_path.read_text(encoding="utf-8", errors="replace")
            if match := _PORT.search(text):
                return int(match.group(1))
            if not coordinator.running:
                raise _failure(coordinator, f"exited with code {coordinator.exit_code} before serving")
            time.sleep(0.1)
    raise _failure(coordinator, f"printed no 'on 127.0.0.1:PORT' line within {timeout_s:.0f} s")


def _progress_line(*, children: Sequence[Child], t_start: float, last_event: str) -> str:
    coordinator, institutions = children[0], children[1:]
    rss = coordinator.samples[-1][1] / MiB if coordinator.samples and coordinator.running else 0.0
    running = sum(c.running for c in institutions)
    return (f"{time.time() - t_start:6.1f} s | coordinator RSS {rss:7.0f} MiB | "
            f"institutions running {running}/{len(institutions)} | {last_event[-90:]}")


def _strip_log_prefix(line: str) -> str:
    """'[12:00:00] INFO     fedcollab.coordinator: round 1 ...' -> 'round 1 ...'."""
    _, sep, rest = line.partition("fedcollab.coordinator: ")
    return rest if sep else line.strip()


def wait_for_exit(*, children: Sequence[Child], t_start: float, timeout_s: float) -> None:
    """Until every child has exited 0; any other exit, or the deadline, is an error."""
    coordinator = children[0]
    follower = LogFollower(coordinator.log_path)
    deadline = time.monotonic() + timeout_s
    last_event = "institutions starting"
    with console.status("") as status:
        while any(c.running for c in children):
            for line in follower.new_lines():
                if any(e in line for e in _EVENTS):
                    last_event = _strip_log_prefix(line)
                    console.log(f"coordinator: {last_event}", highlight=False)
            for child in children:
                if child.exit_code not in (None, 0):
                    raise _failure(child, f"exited with code {child.exit_code}")
            if coordinator.exited is not None and time.time() - coordinator.exited > AFTER_COORDINATOR_S:
                late = next(c for c in children if c.running)
                raise _failure(late, f"still runs {AFTER_COORDINATOR_S:.0f} s after the coordinator exited")
            if time.monotonic() > deadline:
                late = next(c for c in children if c.running)
                raise _failure(late, f"still runs after --timeout {timeout_s:.0f} s")
            status.update(_progress_line(children=children, t_start=t_start, last_event=last_event))
            time.sleep(0.25)
    for child in children:
        if child.exit_code != 0:
            raise _failure(child, f"exited with code {child.exit_code}")


def run_federation(*, opts: Options, folder: Path, env: dict[str, str]) -> RunRecord:
    federation = write_federation_toml(folder=folder, opts=opts)
    watcher = Watcher(interval_s=opts.sample_s)
    watcher.start()
    children: list[Child] = []
    lo_before = loopback_bytes()
    try:
        t_start = time.time()
        coordinator = spawn(name="coordinator", cwd=folder, env=env, log_path=folder / "coordinator.log",
                            args=["coordinator", "serve", "--config", str(federation), "--insecure",
                                  "--exit-when-done", "--linger", "1"])
        children.append(coordinator)
        watcher.add(coordinator)
        port = wait_for_port(coordinator=coordinator, timeout_s=PORT_TIMEOUT_S)
        t_serving = time.time()
        serving_rss = coordinator.ps.memory_info().rss
        serving_hwm = _proc_status_bytes(coordinator.pid, "VmHWM") or 0
        console.log(f"coordinator serving on 127.0.0.1:{port} after {t_serving - t_start:.1f} s "
                    f"(RSS {serving_rss / MiB:.0f} MiB, start-up peak {serving_hwm / MiB:.0f} MiB)")
        for i in range(opts.institutions):
            name = f"bench-i{i}"
            config = write_institution_toml(folder=folder, name=name, port=port)
            child = spawn(name=name, cwd=folder, env=env, log_path=folder / f"{name}.log",
                          args=["institution", "run", "--config", str(config), "--insecure", "--exit-when-done"])
            children.append(child)
            watcher.add(child)
        console.log(f"{opts.institutions} institutions started")
        wait_for_exit(children=children, t_start=t_start, timeout_s=opts.timeout_s)
        t_end = max(c.exited or 0.0 for c in children)
        console.log(f"all processes exited after {t_end - t_start:.1f} s")
    finally:
        with _signals_deferred():  # a second Ctrl-C must not cut the clean-up short
            watcher.stop()
            stop_all(children)
    lo_after = loopback_bytes()
    return RunRecord(
        t_start=t_start, t_serving=t_serving, t_end=t_end, port=port, coordinator=coordinator,
        institutions=children[1:], serving_rss_bytes=serving_rss, serving_vmhwm_bytes=serving_hwm,
        loopback_bytes=None if lo_before is None or lo_after is None else lo_after - lo_before,
    )


# ---------------------------------------------------------------------------- results
def read_state(db: Path) -> dict[str, list[dict[str, Any]]]:
    if not db.is_file():
        raise BenchError(f"{db}: the coordinator left no state")
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        state = {t: [dict(r) for r in con.execute(f"SELECT * FROM {t}")]
                 for t in ("rounds", "participations", "evaluations", "models")}
    finally:
        con.close()
    for row in state["rounds"] + state["participations"]:
        row["metrics"] = json.loads(row["metrics"])
    return state


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def round_figures(*, rnd: dict[str, Any], models: dict[int, dict[str, Any]], folder: Path,
                  institutions: Sequence[str], evaluated: set[tuple[str, int]], model_bytes: int) -> dict[str, Any]:
    """Wall time of one committed round, split where the files on disk allow. An
    institution that evaluated the base model after the previous round has it cached:
    it downloads nothing in this round."""
    opened, closed, m = rnd["opened_at"], rnd["closed_at"], rnd["metrics"]
    base, new = models[rnd["base_version"]], models[rnd["model_version"]]
    to_fetch = [n for n in institutions if (n, base["version"]) not in evaluated]
    cached = [_mtime(folder / name / "models" / f"{base['sha256']}.safetensors") for name in to_fetch]
    downloads = [t - opened for t in cached if t is not None and t >= opened]
    written = _mtime(Path(new["path"]))
    aggregated = m.get("train_seconds")
    return {
        "round": rnd["round"],
        "attempt": rnd["attempt"],
        "round_s": closed - opened,
        "downloads": len(to_fetch),
        "downloads_done_s": max(downloads) if downloads and len(downloads) == len(to_fetch) else None,
        "first_download_done_s": min(downloads) if downloads else None,
        "aggregated_s": aggregated,
        "model_file_written_s": None if written is None else written - opened,
        "commit_s": None if aggregated is None else closed - opened - aggregated,
        "bytes_in": int(m.get("bytes_in", 0)),  # payload of the chunks, no gRPC framing
        "bytes_out": int(m.get("bytes_out", 0)),
        "expected_bytes_in": len(institutions) * model_bytes,  # updates: raw tensor bytes
        "expected_bytes_out": len(to_fetch) * int(base["size_bytes"]),  # the safetensors file
        "num_updates": int(m.get("num_updates", 0)),
        "opened_at": opened,
        "closed_at": closed,
    }


def memory_figures(child: Child, *, model_bytes: int) -> dict[str, Any]:
    peak = child.maxrss_bytes or child.last_vmhwm_bytes
    return {
        "pid": child.pid,
        "exit_code": child.exit_code,
        "peak_rss_bytes": peak,
        "peak_source": "ru_maxrss (wait4)" if child.maxrss_bytes else "VmHWM (last read)",
        "last_vmhwm_bytes": child.last_vmhwm_bytes,
        "sampled_peak_rss_bytes": child.sampled_peak_bytes,
        "num_samples": len(child.samples),
        "peak_x_model": peak / model_bytes,
    }


def rss_timeline(child: Child, *, t0: float, bucket_s: float = 0.25) -> list[tuple[float, float]]:
    """(seconds after t0, peak MiB) per `bucket_s`: where in the run the memory goes."""
    buckets: dict[int, int] = {}
    for t, rss in child.samples:
        key = int((t - t0) / bucket_s)
        buckets[key] = max(buckets.get(key, 0), rss)
    return [(round(k * bucket_s, 2), round(v / MiB, 1)) for k, v in sorted(buckets.items())]


def _peak_between(samples: Sequence[tuple[float, int]], start: float, end: float) -> int:
    return max((rss for t, rss in samples if start <= t <= end), default=0)


def build_results(*, opts: Options, run: RunRecord, state: dict[str, list[dict[str, Any]]],
                  baseline_bytes: int, folder: Path) -> dict[str, Any]:
    models = {m["version"]: m for m in state["models"]}
    names = [c.name for c in run.institutions]
    committed = [r for r in state["rounds"] if r["status"] == "committed"]
    if len(committed) != opts.rounds:
        raise BenchError(f"{len(committed)} of {opts.rounds} rounds committed: {state['rounds']}")
    evaluated = {(e["institution"], e["model_version"]) for e in state["evaluations"]}
    rounds = [round_figures(rnd=r, models=models, folder=folder, institutions=names, evaluated=evaluated,
                            model_bytes=opts.model_bytes) for r in committed]
    coord = memory_figures(run.coordinator, model_bytes=opts.model_bytes)
    coord.update({
        "import_baseline_rss_bytes": baseline_bytes,
        "serving_rss_bytes": run.serving_rss_bytes,
        "startup_peak_rss_bytes": run.serving_vmhwm_bytes,
        "sampled_peak_in_rounds_bytes": max(
            _peak_between(run.coordinator.samples, r["opened_at"], r["closed_at"]) for r in rounds),
        "above_baseline_x_model": (coord["peak_rss_bytes"] - baseline_bytes) / opts.model_bytes,
    })
    last = committed[-1]
    eval_dl = [_mtime(folder / n / "models" / f"{models[last['model_version']]['sha256']}.safetensors") for n in names]
    return {
        "benchmark": "fedcollab round_overhead",
        "params": opts.params,
        "model_bytes": opts.model_bytes,
        "institutions": opts.institutions,
        "rounds_requested": opts.rounds,
        "chunk_bytes": opts.chunk_mib * MiB,
        "round_definition": "rounds.opened_at -> closed_at: downloads, noise, uploads, verification, "
                            "streaming FedAvg, apply, atomic commit of the new model (fsync, SHA-256, SQLite)",
        "rounds": rounds,
        "round_attempts": [{k: r[k] for k in ("round", "attempt", "status", "reason")} for r in state["rounds"]],
        "participations": [{k: p[k] for k in ("round", "institution", "status", "reason")}
                           for p in state["participations"]],
        "evaluation_reports": len(state["evaluations"]),
        "evaluation_downloads_done_after_commit_s": (
            max(t for t in eval_dl if t is not None) - last["closed_at"] if any(eval_dl) else None),
        "coordinator_startup_s": run.t_serving - run.t_start,
        "first_round_opened_after_start_s": committed[0]["opened_at"] - run.t_start,
        "total_wall_s": run.t_end - run.t_start,
        "after_last_commit_s": run.t_end - last["closed_at"],
        "loopback_bytes_whole_run": run.loopback_bytes,
        "coordinator": coord,
        "institution_processes": {c.name: memory_figures(c, model_bytes=opts.model_bytes) for c in run.institutions},
        "rss_timeline_mib": {c.name: rss_timeline(c, t0=run.t_start) for c in (run.coordinator, *run.institutions)},
        "versions": _versions(),
    }


def _versions() -> dict[str, Any]:
    import grpc
    import torch

    import fedcollab

    return {"fedcollab": fedcollab.__version__, "torch": torch.__version__, "grpcio": grpc.__version__,
            "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total}


# ---------------------------------------------------------------------------- output
def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:,.0f} MiB"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def print_results(res: dict[str, Any]) -> None:
    mb = res["model_bytes"]
    console.rule(f"fedcollab round overhead: {res['params']:,} params ({_mib(mb)}), "
                 f"{res['institutions']} institutions, chunks of {_mib(res['chunk_bytes'])}")
    rounds = Table(title="Rounds (seconds after the round opened)", title_justify="left")
    for col in ("round", "attempt", "wall", "downloads done (first .. last)", "aggregated", "model file written",
                "commit"):
        rounds.add_column(col, justify="right")
    moved = Table(title="Bytes moved in the round (payload counted by the coordinator)", title_justify="left")
    for col in ("round", "out: model downloads", "expected", "in: updates", "expected", "total"):
        moved.add_column(col, justify="right")
    for r in res["rounds"]:
        fetched = (f"{_s(r['first_download_done_s'])} .. {_s(r['downloads_done_s'])}" if r["downloads"]
                   else "none: cached while evaluating")
        rounds.add_row(str(r["round"]), str(r["attempt"]), _s(r["round_s"]), fetched, _s(r["aggregated_s"]),
                       _s(r["model_file_written_s"]), _s(r["commit_s"]))
        moved.add_row(str(r["round"]), f"{r['bytes_out']:,}", f"{r['expected_bytes_out']:,}", f"{r['bytes_in']:,}",
                      f"{r['expected_bytes_in']:,}", f"{r['bytes_in'] + r['bytes_out']:,}")
    console.print(rounds)
    console.print(moved)
    console.print("  wall = round opened -> new model committed: downloads, noise, uploads, verification, "
                  "streaming FedAvg, apply, atomic commit (fsync, SHA-256, SQLite). Evaluation is after it.\n"
                  "  aggregated = all updates folded and applied (the round's train_seconds); "
                  "commit = wall - aggregated.\n"
                  "  After each round every institution downloads the new model to evaluate it (the synthetic "
                  "trainer evaluates nothing), so later rounds find their base model cached.", style="dim")

    mem = Table(title="Peak memory per process (RSS)", title_justify="left")
    for col in ("process", "exit", "peak (ru_maxrss)", "x model", "last VmHWM", "sampled peak", "samples"):
        mem.add_column(col, justify="right")
    procs = {"coordinator": res["coordinator"], **res["institution_processes"]}
    for name, p in procs.items():
        mem.add_row(name, str(p["exit_code"]), _mib(p["peak_rss_bytes"]), f"{p['peak_x_model']:.2f}",
                    _mib(p["last_vmhwm_bytes"]), _mib(p["sampled_peak_rss_bytes"]), str(p["num_samples"]))
    console.print(mem)
    c = res["coordinator"]
    console.print(
        f"  coordinator: import-only baseline {_mib(c['import_baseline_rss_bytes'])}, RSS once serving "
        f"{_mib(c['serving_rss_bytes'])} (start-up peak {_mib(c['startup_peak_rss_bytes'])}), sampled peak "
        f"during rounds {_mib(c['sampled_peak_in_rounds_bytes'])}; peak above baseline = "
        f"{c['above_baseline_x_model']:.2f} x model", style="dim")
    lo = res["loopback_bytes_whole_run"]
    console.print(
        f"  timeline: coordinator serving after {_s(res['coordinator_startup_s'])}, round 1 opened after "
        f"{_s(res['first_round_opened_after_start_s'])}, evaluation downloads done "
        f"{_s(res['evaluation_downloads_done_after_commit_s'])} after the last commit, all exited "
        f"{_s(res['after_last_commit_s'])} after it; total {_s(res['total_wall_s'])}. "
        f"Loopback traffic over the whole run (framing, evaluation downloads, anything else on lo): "
        f"{'-' if lo is None else f'{lo:,} bytes'}", style="dim")
    console.print(summary_line(res), highlight=False)


def summary_line(res: dict[str, Any]) -> str:
    r, c = res["rounds"][0], res["coordinator"]
    inst_peak = max(p["peak_rss_bytes"] for p in res["institution_processes"].values())
    walls = ", ".join(f"{x['round_s']:.2f}" for x in res["rounds"])
    return (
        f"fedcollab {res['params']:,} params x {res['institutions']} institutions: "
        f"round {r['round_s']:.2f} s" + (f" (all rounds: {walls} s)" if len(res["rounds"]) > 1 else "")
        + f"; moved {(r['bytes_in'] + r['bytes_out']) / 1e6:,.1f} MB in the round "
        f"(expected {(r['expected_bytes_in'] + r['expected_bytes_out']) / 1e6:,.1f} MB); "
        f"coordinator peak RSS {c['peak_rss_bytes'] / GiB:.2f} GiB = {c['peak_x_model']:.2f} x model "
        f"(import baseline {c['import_baseline_rss_bytes'] / GiB:.2f} GiB, "
        f"+{c['above_baseline_x_model']:.2f} x model); "
        f"institution peak {inst_peak / GiB:.2f} GiB max; total wall {res['total_wall_s']:.1f} s"
    )


# ---------------------------------------------------------------------------- main
def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def benchmark(*, opts: Options) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="fedcollab-round-overhead-", dir=opts.workdir))
    ok = False
    try:
        env = child_env()
        baseline = measure_import_baseline(env=env)
        console.log(f"work folder {folder}; a process that only imports fedcollab has RSS {baseline / MiB:.0f} MiB")
        run = run_federation(opts=opts, folder=folder, env=env)
        state = read_state(folder / "coordinator-state" / "coordinator.sqlite")
        results = build_results(opts=opts, run=run, state=state, baseline_bytes=baseline, folder=folder)
        results["work_folder"] = str(folder) if opts.keep else None
        ok = True
        return results
    finally:
        if ok and not opts.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            console.print(f"logs and state kept in {folder}", style="yellow")


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=50_000_000, help="float32 parameters in the model (default 50M)")
    p.add_argument("--institutions", type=int, default=4, help="institution processes (default 4)")
    p.add_argument("--rounds", type=int, default=1, help="rounds (default 1)")
    p.add_argument("--chunk-mib", type=int, default=1,
                   help="transfer chunk size in MiB, 1..64 (default 1, the server's)")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds (default 1800)")
    p.add_argument("--sample-ms", type=float, default=25.0, help="RSS sampling interval (default 25 ms)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--workdir", type=Path, help="where the temporary work folder goes (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, state, models)")
    a = p.parse_args(argv)
    if a.params < 1 or a.institutions < 1 or a.rounds < 1:
        p.error("--params, --institutions and --rounds must be at least 1")
    if not 1 <= a.chunk_mib <= 64:
        p.error("--chunk-mib must be in 1..64 (the coordinator's chunk_bytes limit)")
    return Options(params=a.params, institutions=a.institutions, rounds=a.rounds, chunk_mib=a.chunk_mib,
                   timeout_s=a.timeout, sample_s=a.sample_ms / 1000, json_path=a.json, workdir=a.workdir,
                   keep=a.keep)


def run_cli(run: Callable[[], dict[str, Any]], *, json_path: Path | None,
            show: Callable[[dict[str, Any]], None] | None = None) -> tuple[dict[str, Any] | None, int]:
    """Runs a benchmark as its command line does: children stopped on SIGTERM as on
    Ctrl-C, a failure reported with its log, results shown and written as JSON.
    Returns (results, exit code); results is None when it did not complete."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        results = run()
    except BenchError as e:  # e.g. fedcollab cannot be imported by the children
        console.print("[red]benchmark failed:[/]")
        console.print(str(e), markup=False, highlight=False)
        return None, 1
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: every process started here was stopped")
        return None, 130
    if show is not None:
        show(results)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
        console.print(f"results written to {json_path}")
    return results, 0


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    return run_cli(lambda: benchmark(opts=opts), json_path=opts.json_path, show=print_results)[1]


if __name__ == "__main__":
    sys.exit(main())
