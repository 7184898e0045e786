"""Crash-resume chaos harness: a real federation, every process a `fedcollab` command of
its own, killed with SIGKILL at chosen or random moments and restarted, then checked.

One run
-------
A tiny study (the 1,210-parameter MLP on scikit-learn's digits, 1 KiB chunks so every
transfer spans several, plaintext gRPC on 127.0.0.1 only) with a coordinator
(`fedcollab coordinator serve --insecure`) and N institution daemons
(`fedcollab institution run --insecure`), each with its own state folder. A `Plan`
says how each process's lives end:

- targeted: the life is started with FEDCOLLAB_CRASH_AT="point:n" (fedcollab/_faults.py)
  and kills itself the n-th time it reaches that point;
- timed: the harness sends SIGKILL (`kill -9`) after a delay, counted from the moment
  the life has seen some rounds committed (or from its start).

Whenever a life dies that way it is restarted at once with the same command, config,
state folder and port, and the next fault of its plan (or none). Daemons reconnect by
themselves. When every daemon has exited (they exit 0 once they hear the study
finished), the lingering coordinator gets SIGTERM and must exit 0 too.

Then `inspect_run` checks, from the files, the SQLite store (read-only) and the CLI
(`lineage verify --json`, `coordinator status`), that exactly `rounds` rounds committed,
each once, on a contiguous, intact, signed model chain, with no stray files left, and
that every process exited 0. Every kill is recorded with where it landed.

Nothing here depends on pytest; `crash_resume.py` is the command line around it and
tests/integration/test_crash_resume.py a reduced run in the test suite.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

COORDINATOR_POINTS: tuple[str, ...] = (
    "coordinator.upload_chunk",
    "coordinator.aggregated",
    "coordinator.commit_written",
    "coordinator.commit_recorded",
)
INSTITUTION_POINTS: tuple[str, ...] = (
    "institution.download_chunk",
    "institution.trained",
    "institution.upload_chunk",
)
DEFAULT_INSTITUTIONS: tuple[str, ...] = ("hospital-a", "hospital-b", "lab-c")
COORDINATOR = "coordinator"
TINY_MLP: dict[str, Any] = {"in_features": 64, "hidden": [16], "num_classes": 10}
SAFETENSORS_HEADER_BYTES = 300  # about, for the tiny MLP's four tensors


class HarnessError(RuntimeError):
    """The run could not go on (a process exited unexpectedly, or it took too long)."""


# ---------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """The federation under test. Short timeouts: a dead institution is given up on
    after its lease (heartbeat_s * lease_intervals), a round after round_timeout_s."""

    rounds: int = 20
    institutions: tuple[str, ...] = DEFAULT_INSTITUTIONS
    min_institutions: int = 2
    # A round opens only once every institution is online, so each takes part in
    # (nearly) every round and its targeted kills are reached.
    min_available_institutions: int | None = None  # default: all of them
    chunk_bytes: int = 1024
    heartbeat_s: float = 0.25
    lease_intervals: float = 12.0
    max_poll_wait_s: float = 1.0
    round_timeout_s: float = 30.0
    evaluation_timeout_s: float = 10.0
    # Every coordinator crash in a round abandons an attempt of it, and attempts are
    # what max_round_attempts counts: a plan with several kills in one round needs room.
    max_round_attempts: int = 25
    linger_s: float = 120.0  # the harness stops the coordinator once every daemon has finished
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 1.0
    study_seed: int = 0
    # The coordinator scores each new model on digits' test split between writing its
    # file and recording the commit (a wider window for timed kills), at the cost of
    # loading scikit-learn at every start: about 3 s more per coordinator restart.
    central_evaluation: bool = True

    @property
    def model_parameters(self) -> int:
        sizes = [TINY_MLP["in_features"], *TINY_MLP["hidden"], TINY_MLP["num_classes"]]
        return sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))

    @property
    def update_chunks(self) -> int:
        """Chunks of one uploaded update (float32, uncompressed)."""
        return math.ceil(self.model_parameters * 4 / self.chunk_bytes)

    @property
    def download_chunks(self) -> int:
        """Chunks of one model download (the safetensors file)."""
        return math.ceil((self.model_parameters * 4 + SAFETENSORS_HEADER_BYTES) / self.chunk_bytes)

    def hits_per_round(self, point: str) -> int:
        """About how often a crash point is reached per round by one process."""
        return {
            "coordinator.upload_chunk": len(self.institutions) * self.update_chunks,
            "institution.upload_chunk": self.update_chunks,
            "institution.download_chunk": self.download_chunks,  # the new model, to evaluate it
        }.get(point, 1)


# ---------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Fault:
    """How one life of a process ends.

    targeted: FEDCOLLAB_CRASH_AT=point:count. Without `count`, the count is chosen when
      the life starts, so that `rounds_first` rounds commit first and the kill lands on
      the `chunk`-th hit of the point in the round after (capped to the rounds left).
    timed: SIGKILL `delay_s` seconds after the life has served (coordinator) or joined
      (institution) and seen `rounds_first` more rounds committed (anchor "round"), or
      `delay_s` after it was started (anchor "spawn": start-up, resume).
    """

    kind: str  # "targeted" | "timed"
    point: str = ""
    count: int | None = None
    rounds_first: int = 0
    chunk: int = 1
    delay_s: float = 0.0
    anchor: str = "round"

    def __post_init__(self) -> None:
        if self.kind == "targeted":
            if self.point not in COORDINATOR_POINTS + INSTITUTION_POINTS:
                raise ValueError(f"unknown crash point {self.point!r}")
        elif self.kind == "timed":
            if self.anchor not in ("round", "spawn"):
                raise ValueError(f"timed fault anchor must be 'round' or 'spawn', not {self.anchor!r}")
        else:
            raise ValueError(f"fault kind must be 'targeted' or 'timed', not {self.kind!r}")

    @property
    def label(self) -> str:
        """The column this kill is counted in: the crash point, or '<role>.timed'."""
        return self.point if self.kind == "targeted" else "timed"

    def describe(self) -> str:
        if self.kind == "targeted":
            how = f"n={self.count}" if self.count else f"after {self.rounds_first} round(s), hit {self.chunk}"
            return f"targeted {self.point} ({how})"
        if self.anchor == "spawn":
            return f"timed kill -9 {self.delay_s:.2f}s after start"
        return f"timed kill -9 {self.delay_s:.2f}s after {self.rounds_first} round(s)"


@dataclass(frozen=True)
class Plan:
    """Faults per process, in the order its lives meet them; after the last, a clean life."""

    coordinator: tuple[Fault, ...] = ()
    institutions: Mapping[str, tuple[Fault, ...]] = field(default_factory=dict)

    def faults_of(self, process: str) -> tuple[Fault, ...]:
        return self.coordinator if process == COORDINATOR else tuple(self.institutions.get(process, ()))

    def describe(self) -> list[str]:
        out = [f"{COORDINATOR}: " + ("; ".join(f.describe() for f in self.coordinator) or "no kills")]
        for name, faults in self.institutions.items():
            out.append(f"{name}: " + ("; ".join(f.describe() for f in faults) or "no kills"))
        return out


def random_plan(settings: Settings, *, seed: int, coordinator_timed: int = 3, institution_timed: int = 1,
                coordinator_at_start: int = 1) -> Plan:
    """Every coordinator crash point once, `coordinator_timed` timed kills of it (of
    which `coordinator_at_start` counted from its start: they land in start-up and
    resume), the institution crash points spread over the institutions, and
    `institution_timed` timed kills of each; in a random order, spread over the rounds."""
    rng = random.Random(seed)
    rounds = settings.rounds

    def spread(n_kills: int) -> int:  # rounds to let commit before a kill: about rounds / (kills + 3) on average,
        mean = max(0.0, (rounds - 1) / (n_kills + 3))  # as restarts and other kills let rounds go by too
        return rng.randint(0, max(0, round(2 * mean)))

    coordinator: list[Fault] = [Fault("targeted", point=p) for p in COORDINATOR_POINTS]
    coordinator += [Fault("timed", anchor="spawn" if i < coordinator_at_start else "round")
                    for i in range(coordinator_timed)]
    rng.shuffle(coordinator)
    coordinator = [_randomised(f, rng=rng, settings=settings, rounds_first=spread(len(coordinator)))
                   for f in coordinator]

    names = list(settings.institutions)
    points = list(INSTITUTION_POINTS)
    rng.shuffle(points)
    per: dict[str, list[Fault]] = {n: [] for n in names}
    for i, point in enumerate(points):
        per[names[i % len(names)]].append(Fault("targeted", point=point))
    for n in names:
        per[n] += [Fault("timed") for _ in range(institution_timed)]
        rng.shuffle(per[n])
        per[n] = [_randomised(f, rng=rng, settings=settings, rounds_first=spread(len(per[n]))) for f in per[n]]
    return Plan(coordinator=tuple(coordinator), institutions={n: tuple(f) for n, f in per.items()})


def _randomised(f: Fault, *, rng: random.Random, settings: Settings, rounds_first: int) -> Fault:
    if f.kind == "targeted":
        return Fault("targeted", point=f.point, rounds_first=rounds_first,
                     chunk=rng.randint(1, settings.hits_per_round(f.point)))
    if f.anchor == "spawn":  # from start-up (imports, resume) into the first rounds
        return Fault("timed", anchor="spawn", delay_s=round(rng.uniform(0.3, 4.0), 2))
    # A round of the tiny study takes 0.05-0.5 s: a delay of up to one or two rounds
    # lands anywhere in one (training, uploading, aggregating, committing, evaluating).
    return Fault("timed", rounds_first=rounds_first, delay_s=round(rng.uniform(0.0, 0.6), 3))


# ---------------------------------------------------------------------------- processes
@dataclass
class Life:
    """One process start: its fault, how it ended and where."""

    process: str
    index: int
    fault: Fault | None
    crash_at: str  # FEDCOLLAB_CRASH_AT given to it ('' if none)
    pid: int
    log: str
    started_s: float  # since the run started
    committed_at_start: int
    gap: int = 0  # rounds this life lets commit before its fault (targeted without count, timed)
    serving_after_s: float | None = None  # coordinator: start -> "serving" printed
    joined_after_s: float | None = None  # institution: start -> its first Join
    armed_at_s: float | None = None  # timed: when its timer started
    kill_at_s: float | None = None
    kill_sent: bool = False
    ended_s: float | None = None
    rc: int | None = None
    outcome: str = ""  # killed | exited 0 | exited N
    killed_by: str = ""  # the crash point, "timed", or "" (not killed)
    where: str = ""  # what was going on when it died
    committed_at_end: int | None = None
    finished_logged: bool = False  # coordinator: this life logged that the study finished
    join_times_s: list[float] = field(default_factory=list)  # institution: each Join (run time, as seen here)


class _LogFollower:
    """New complete lines of a growing log file."""

    def __init__(self, path: Path) -> None:
        self._path, self._offset, self._partial = path, 0, b""

    def new_lines(self) -> list[str]:
        try:
            with self._path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in lines]


@dataclass
class _Slot:
    """A process name and its lives; `popen` is the running one."""

    name: str
    args: list[str]
    faults: list[Fault]
    lives: list[Life] = field(default_factory=list)
    popen: subprocess.Popen[bytes] | None = None
    done: bool = False  # its last life exited 0
    stop_sent: bool = False
    follower: _LogFollower | None = None

    @property
    def life(self) -> Life | None:
        return self.lives[-1] if self.lives else None


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    invariant: bool = True  # False: informational, does not fail the run


@dataclass
class RunResult:
    seed: int | None
    settings: Settings
    plan: Plan
    folder: Path
    port: int
    wall_s: float = 0.0
    error: str | None = None
    lives: list[Life] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)
    not_reached: list[str] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)  # status -> rows of the rounds table

    @property
    def ok(self) -> bool:
        return self.error is None and all(c.ok for c in self.checks if c.invariant)

    @property
    def kills(self) -> list[Life]:
        return sorted((lf for lf in self.lives if lf.outcome == "killed"), key=lambda lf: lf.ended_s or 0.0)

    def kill_counts(self) -> dict[str, int]:
        """Kills per column: the crash point ('coordinator.aggregated'), or
        'coordinator.timed' / 'institution.timed'."""
        out: dict[str, int] = {}
        for life in self.kills:
            key = life.killed_by if life.killed_by != "timed" else (
                "coordinator.timed" if life.process == COORDINATOR else "institution.timed")
            out[key] = out.get(key, 0) + 1
        return out

    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if c.invariant and not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "ok": self.ok, "error": self.error, "wall_s": round(self.wall_s, 2),
            "folder": str(self.folder), "port": self.port, "settings": asdict(self.settings),
            "plan": self.plan.describe(), "kill_counts": self.kill_counts(), "attempts": self.attempts,
            "not_reached": self.not_reached, "strays": self.strays,
            "checks": [asdict(c) for c in self.checks],
            "lives": [{**asdict(lf), "fault": lf.fault.describe() if lf.fault else None} for lf in self.lives],
        }


def free_port() -> int:
    """A port free on 127.0.0.1 now; the coordinator keeps it across its restarts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_str(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_configs(folder: Path, *, settings: Settings, port: int) -> tuple[Path, dict[str, Path]]:
    """federation.toml and one <institution>.toml each, with their state folders in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    available = settings.min_available_institutions or len(settings.institutions)
    federation = folder / "federation.toml"
    federation.write_text(
        "[federation]\n"
        'name = "chaos"\n\n'
        "[server]\n"
        f'address = "127.0.0.1:{port}"\n'
        f"state_dir = {_toml_str(folder / 'coordinator-state')}\n"
        f"chunk_bytes = {settings.chunk_bytes}\n"
        f"heartbeat_interval_s = {settings.heartbeat_s}\n"
        f"lease_intervals = {settings.lease_intervals}\n"
        f"max_poll_wait_s = {settings.max_poll_wait_s}\n"
        "max_workers = 16\n\n"
        "[study]\n"
        'name = "crash-resume"\n'
        f"rounds = {settings.rounds}\n"
        f"min_institutions = {settings.min_institutions}\n"
        f"min_available_institutions = {available}\n"
        f"round_timeout_s = {settings.round_timeout_s}\n"
        f"evaluation_timeout_s = {settings.evaluation_timeout_s}\n"
        f"max_round_attempts = {settings.max_round_attempts}\n"
        f"seed = {settings.study_seed}\n\n"
        "[study.model]\n"
        'kind = "mlp"\n'
        f"params = {{ in_features = {TINY_MLP['in_features']}, hidden = {json.dumps(TINY_MLP['hidden'])}, "
        f"num_classes = {TINY_MLP['num_classes']} }}\n\n"
        "[study.train]\n"
        "local_epochs = 1\n"
        "batch_size = 32\n"
        "learning_rate = 0.01\n"
        'optimizer = "adam"\n'
        + ('\n[study.central_evaluation]\ndataset = "digits"\n' if settings.central_evaluation else ""),
        encoding="utf-8",
    )
    institutions = {}
    for i, name in enumerate(settings.institutions):
        path = folder / f"{name}.toml"
        path.write_text(
            "[institution]\n"
            f"name = {_toml_str(name)}\n"
            f'coordinator = "127.0.0.1:{port}"\n'
            f"state_dir = {_toml_str(folder / name)}\n"
            'device = "cpu"\n'
            "threads = 1\n\n"
            "[data]\n"
            'dataset = "digits"\n'
            "val_fraction = 0.2\n\n"
            "[data.partition]\n"
            'scheme = "dirichlet"\n'
            f"num_partitions = {len(settings.institutions)}\n"
            f"index = {i}\n"
            "seed = 1\n\n"
            "[reconnect]\n"
            f"initial_backoff_s = {settings.initial_backoff_s}\n"
            f"max_backoff_s = {settings.max_backoff_s}\n",
            encoding="utf-8",
        )
        institutions[name] = path
    return federation, institutions


def child_env(crash_at: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FEDCOLLAB_CRASH_AT"}
    env.update(COLUMNS="250", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               FLWR_TELEMETRY_ENABLED="0", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                                    env.get("PYTHONPATH")])))
    if crash_at:
        env["FEDCOLLAB_CRASH_AT"] = crash_at
    return env


def fedcollab_cli(args: Sequence[str], *, cwd: Path, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedcollab", *args], cwd=cwd, env=child_env(), text=True,
                          capture_output=True, timeout=timeout_s, check=False)


# ---------------------------------------------------------------------------- observing
def _connect_ro(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=5.0)


def committed_rounds(db: Path) -> int:
    """Distinct rounds committed so far (0 before the store exists or while unreadable)."""
    if not db.is_file():
        return 0
    try:
        con = _connect_ro(db)
        try:
            return int(con.execute("SELECT COUNT(DISTINCT round) FROM rounds WHERE status='committed'").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return -1


_OPENED = re.compile(r"round (\d+) \(attempt (\d+)\) opened")
_ACCEPTED = re.compile(r"round (\d+): update from (\S+) accepted")
_COMMITTED = re.compile(r"round (\d+) committed: model v(\d+)")
_ROUND_FAILED = re.compile(r"round (\d+) failed: (.*)")
_RESUMED = re.compile(r"resuming after round (\d+) with model v(\d+)")
_FINISHED = re.compile(r"study \S+ finished after (\d+) rounds")
_SERVING = "coordinator serving study"
_INST_JOINED = ": joined study"  # the daemon's log


def coordinator_phase(log_text: str) -> str:
    """What a coordinator was doing, from its log (the last events before it ended)."""
    phase = "starting (imports, opening its state)"
    accepted = 0
    current = ""
    for line in log_text.splitlines():
        if m := _RESUMED.search(line):
            phase = f"resumed after round {m[1]}, waiting for a quorum"
        elif "initial model v0" in line:
            phase = "initial model v0 written, waiting for a quorum"
        elif _SERVING in line and phase.startswith("starting"):
            phase = "serving, waiting for a quorum"
        elif m := _OPENED.search(line):
            current, accepted = f"round {m[1]} attempt {m[2]}", 0
            phase = f"{current} open"
        elif m := _ACCEPTED.search(line):
            accepted += 1
            phase = f"{current or 'round ' + m[1]} open, {accepted} update{'s' if accepted > 1 else ''} accepted"
        elif m := _COMMITTED.search(line):
            phase = f"round {m[1]} committed v{m[2]}, evaluating it"
        elif m := _ROUND_FAILED.search(line):
            phase = f"round {m[1]} failed ({m[2][:50]})"
        elif m := _FINISHED.search(line):
            phase = f"study finished after {m[1]} rounds, lingering"
    return phase


def store_phase(db: Path) -> str:
    """The latest round attempt in the store and where each participant stands in it
    ('selected' covers downloading, training and uploading: only the outcome is stored)."""
    if not db.is_file():
        return ""
    try:
        con = _connect_ro(db)
        try:
            row = con.execute("SELECT round, attempt, status FROM rounds ORDER BY round DESC, attempt DESC "
                              "LIMIT 1").fetchone()
            if row is None:
                return "store: no round opened yet"
            parts = con.execute("SELECT institution, status FROM participations WHERE round=? AND attempt=?",
                                (row[0], row[1])).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return ""
    by: dict[str, list[str]] = {}
    for name, status in parts:
        by.setdefault(status, []).append(name)
    who = "; ".join(f"{status}: {', '.join(sorted(names))}" for status, names in sorted(by.items()))
    return f"store: round {row[0]} attempt {row[1]} {row[2]}" + (f" ({who})" if who else "")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(_read(path).splitlines()[-lines:]) or "(empty)"


# ---------------------------------------------------------------------------- the run
EventSink = Callable[[str], None]
STRAYS_COORDINATOR = "no stray files in the coordinator's state"
STRAYS_INSTITUTIONS = "no stray files in the institutions' state"


class ChaosRun:
    """Starts the federation, applies the plan, waits for the study to finish, and
    stops everything it started (only those processes, by their pid)."""

    def __init__(self, folder: Path, *, settings: Settings, plan: Plan, seed: int | None = None,
                 port: int | None = None, timeout_s: float = 900.0, on_event: EventSink | None = None,
                 on_progress: Callable[[int], None] | None = None) -> None:
        self.folder = Path(folder)
        self.settings = settings
        self.plan = plan
        self.seed = seed
        self.port = port or free_port()
        self.timeout_s = timeout_s
        self._on_event = on_event or (lambda _msg: None)
        self._on_progress = on_progress or (lambda _n: None)
        self.db = self.folder / "coordinator-state" / "coordinator.sqlite"
        self.logs = self.folder / "logs"
        self._t0 = 0.0
        self._committed = 0

    # -- helpers
    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _event(self, msg: str) -> None:
        self._on_event(f"[{self._now():6.1f}s] {msg}")

    def _spawn(self, slot: _Slot) -> None:
        fault = slot.faults.pop(0) if slot.faults else None
        index = len(slot.lives) + 1
        crash_at = ""
        # The rounds left are shared among this process's faults still to come, so that
        # a plan's late faults are not all lost when its early ones let rounds go by.
        left = max(0, self.settings.rounds - max(self._committed, 0) - 1)
        gap = min(fault.rounds_first, left // (len(slot.faults) + 1)) if fault is not None else 0
        if fault is not None and fault.kind == "targeted":
            if fault.count:
                n = fault.count
            else:
                per = self.settings.hits_per_round(fault.point)
                n = gap * per + min(max(fault.chunk, 1), per)
            crash_at = f"{fault.point}:{n}"
        log = self.logs / f"{slot.name}.{index}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "fedcollab", *slot.args], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=child_env(crash_at), cwd=self.folder, start_new_session=True,
            )
        life = Life(process=slot.name, index=index, fault=fault, crash_at=crash_at, pid=popen.pid,
                    log=str(log.relative_to(self.folder)), started_s=self._now(),
                    committed_at_start=self._committed, gap=gap)
        if fault is not None and fault.kind == "timed" and fault.anchor == "spawn":
            life.armed_at_s = life.started_s
            life.kill_at_s = life.started_s + fault.delay_s
        slot.popen = popen
        slot.stop_sent = False
        slot.follower = _LogFollower(log)
        slot.lives.append(life)
        what = fault.describe() if fault else "no fault"
        self._event(f"{slot.name} life {index} started (pid {popen.pid}): {what}"
                    + (f" [FEDCOLLAB_CRASH_AT={crash_at}]" if crash_at else ""))

    def _where(self, slot: _Slot, life: Life) -> str:
        """What was going on: the coordinator's last logged events, the latest attempt
        in its store, and for a daemon whether it had a download in progress."""
        coord = next(s for s in self._slots if s.name == COORDINATOR)
        phase = coordinator_phase(_read(self.folder / coord.life.log)) if coord.life else "?"
        stored = store_phase(self.db)
        if slot.name == COORDINATOR:
            return f"{phase} | {stored}" if stored else phase
        parts = list((self.folder / slot.name / "models").glob("*.part"))
        state = f"; {len(parts)} partial download(s) on disk" if parts else ""
        return f"coordinator: {phase}{state} | {stored}" if stored else f"coordinator: {phase}{state}"

    def _arm_timed(self, slot: _Slot, life: Life) -> None:
        fault = life.fault
        if fault is None or fault.kind != "timed" or life.kill_at_s is not None:
            return
        if life.serving_after_s is None and life.joined_after_s is None:
            return  # counted from when the coordinator serves, or the daemon has joined
        if self._committed >= life.committed_at_start + life.gap:
            life.armed_at_s = self._now()
            life.kill_at_s = life.armed_at_s + fault.delay_s

    def _ended(self, slot: _Slot, life: Life, rc: int) -> None:
        life.rc, life.ended_s = rc, self._now()
        life.committed_at_end = self._committed
        slot.popen = None
        if rc == -signal.SIGKILL and life.fault is not None:
            life.outcome = "killed"
            life.killed_by = life.fault.point if life.fault.kind == "targeted" else "timed"
            if not life.where:
                life.where = self._where(slot, life)
            self._event(f"{slot.name} life {life.index} killed ({life.killed_by}) during: {life.where}")
            self._spawn(slot)
            return
        life.outcome = f"exited {rc}"
        life.where = self._where(slot, life)
        if rc == 0:
            slot.done = True
            if life.fault is not None:
                self.not_reached.append(f"{slot.name} life {life.index}: {life.fault.describe()}"
                                        + (f" [FEDCOLLAB_CRASH_AT={life.crash_at}]" if life.crash_at else ""))
            self._event(f"{slot.name} life {life.index} exited 0")
            return
        raise HarnessError(f"{slot.name} life {life.index} exited with {rc} (fault: "
                           f"{life.fault.describe() if life.fault else 'none'}); last lines of "
                           f"{life.log}:\n{log_tail(self.folder / life.log)}")

    # -- main loop
    def run(self) -> RunResult:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        federation, inst_configs = write_configs(self.folder, settings=self.settings, port=self.port)
        self.not_reached: list[str] = []
        # -vv: "X joined" and "update from X accepted", which the phase and rejoin figures
        # read from its log, are DEBUG lines (per call: too many at INFO for 200 institutions).
        self._slots = [_Slot(COORDINATOR, ["-vv", "coordinator", "serve", "--config", str(federation), "--insecure",
                                           "--exit-when-done", "--linger", str(self.settings.linger_s)],
                             list(self.plan.faults_of(COORDINATOR)))]
        self._slots += [_Slot(name, ["institution", "run", "--config", str(path), "--insecure", "--exit-when-done"],
                              list(self.plan.faults_of(name))) for name, path in inst_configs.items()]
        result = RunResult(seed=self.seed, settings=self.settings, plan=self.plan, folder=self.folder,
                           port=self.port)
        self._t0 = time.monotonic()
        coordinator_done_at: float | None = None
        try:
            for slot in self._slots:
                self._spawn(slot)
            while True:
                committed = committed_rounds(self.db)
                if committed >= 0 and committed != self._committed:
                    self._committed = committed
                    self._on_progress(committed)
                for slot in self._slots:
                    self._step(slot)
                institutions = [s for s in self._slots if s.name != COORDINATOR]
                coord = self._slots[0]
                # Once every daemon has finished and the coordinator (a life restarted late,
                # too) says the study finished: SIGTERM ends its linger, and it must exit 0.
                if (all(s.done for s in institutions) and coord.popen is not None and not coord.stop_sent
                        and coord.life is not None and coord.life.finished_logged):
                    coord.stop_sent = True
                    self._event("every institution has finished: SIGTERM to the lingering coordinator")
                    coord.popen.send_signal(signal.SIGTERM)
                if all(s.done for s in self._slots):
                    break
                if coord.done:
                    coordinator_done_at = coordinator_done_at or self._now()
                    if self._now() - coordinator_done_at > 30:
                        late = ", ".join(s.name for s in institutions if not s.done)
                        raise HarnessError(f"the coordinator exited 0 but {late} still run 30 s later: they never "
                                           "heard that the study finished")
                if self._now() > self.timeout_s:
                    raise HarnessError(f"the run took more than {self.timeout_s:.0f} s; {self._committed} of "
                                       f"{self.settings.rounds} rounds committed; coordinator log tail:\n"
                                       + (log_tail(self.folder / coord.life.log) if coord.life else ""))
                time.sleep(0.02)
        except HarnessError as e:
            result.error = str(e)
            self._event(f"run aborted: {e}")
        except BaseException as e:
            result.error = f"interrupted: {type(e).__name__}: {e}"
            self._stop_all()
            raise
        finally:
            self._stop_all()
            result.wall_s = self._now()
            result.lives = [life for slot in self._slots for life in slot.lives]
            result.lives.sort(key=lambda lf: lf.started_s)
            result.not_reached = list(self.not_reached)
            for slot in self._slots:  # faults never started: the study ended first
                for f in slot.faults:
                    result.not_reached.append(f"{slot.name}: {f.describe()} (its life never started)")
        return result

    def _step(self, slot: _Slot) -> None:
        life, popen = slot.life, slot.popen
        if popen is None or life is None:
            return
        rc = popen.poll()
        if rc is not None:
            self._ended(slot, life, rc)
            return
        if slot.name == COORDINATOR and slot.follower is not None:
            for line in slot.follower.new_lines():
                if _SERVING in line and life.serving_after_s is None:
                    life.serving_after_s = self._now() - life.started_s
                elif _FINISHED.search(line):
                    life.finished_logged = True
        elif slot.follower is not None:
            for line in slot.follower.new_lines():
                if _INST_JOINED in line:
                    life.join_times_s.append(round(self._now(), 3))
                    if life.joined_after_s is None:
                        life.joined_after_s = self._now() - life.started_s
        self._arm_timed(slot, life)
        if life.kill_at_s is not None and not life.kill_sent and self._now() >= life.kill_at_s:
            # Where it is now, before the kill: what the kill interrupts.
            life.where = self._where(slot, life)
            if popen.poll() is None:  # not reaped yet: the pid is still this child's
                os.kill(popen.pid, signal.SIGKILL)
            life.kill_sent = True
            rc = popen.wait()
            self._ended(slot, life, rc)

    def _stop_all(self) -> None:
        """Stops what is still running (only the processes this run started)."""
        running = [s for s in self._slots if s.popen is not None and s.popen.poll() is None]
        for s in running:
            assert s.popen is not None
            s.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for s in running:
            assert s.popen is not None and s.life is not None
            try:
                s.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.popen.kill()
                s.popen.wait()
            if s.life.rc is None:
                s.life.rc, s.life.ended_s = s.popen.returncode, self._now()
                s.life.outcome = f"stopped by the harness (rc {s.popen.returncode})"
            s.popen = None


# ---------------------------------------------------------------------------- checks
def read_store(db: Path) -> dict[str, list[dict[str, Any]]]:
    con = _connect_ro(db)
    con.row_factory = sqlite3.Row
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return {t: [dict(r) for r in con.execute(f"SELECT * FROM {t}")] for t in
                ("rounds", "participations", "models", "lineage", "evaluations", "institutions") if t in tables}
    finally:
        con.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _verify_signature(public_key_pem: bytes, record: bytes, signature: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(public_key_pem)
    if not isinstance(key, Ed25519PublicKey):
        return False
    try:
        key.verify(signature, record)
        return True
    except InvalidSignature:
        return False


def _spans(numbers: Sequence[int]) -> str:
    return ", ".join(str(n) for n in numbers[:12]) + (" ..." if len(numbers) > 12 else "")


def inspect_state(folder: Path, *, settings: Settings, lives: Sequence[Life] = (), run_cli: bool = True
                  ) -> tuple[list[Check], list[str], dict[str, int]]:
    """The invariants of a finished run, from its files, its store and the CLI.
    Returns (checks, stray files, rounds-table rows per status)."""
    state = folder / "coordinator-state"
    db = state / "coordinator.sqlite"
    checks: list[Check] = []

    def check(name: str, problems: Sequence[str], ok_detail: str, *, invariant: bool = True) -> None:
        checks.append(Check(name, not problems, "; ".join(problems[:8]) + (
            f" (+{len(problems) - 8} more)" if len(problems) > 8 else "") if problems else ok_detail, invariant))

    if not db.is_file():
        return [Check("coordinator state exists", False, f"{db} is missing")], [], {}
    store = read_store(db)
    R = settings.rounds
    rounds = store["rounds"]
    statuses: dict[str, int] = {}
    for r in rounds:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    committed = [r for r in rounds if r["status"] == "committed"]
    by_round: dict[int, list[dict[str, Any]]] = {}
    for r in committed:
        by_round.setdefault(r["round"], []).append(r)

    # 1. exactly R rounds, each committed once
    problems = []
    if sorted(by_round) != list(range(1, R + 1)):
        missing = sorted(set(range(1, R + 1)) - set(by_round))
        extra = sorted(set(by_round) - set(range(1, R + 1)))
        problems.append(f"committed rounds are {_spans(sorted(by_round))}; missing {missing}, unexpected {extra}")
    check("exactly `rounds` rounds committed", problems, f"{len(by_round)} rounds committed: 1..{R}")
    twice = {n: [r["attempt"] for r in rs] for n, rs in by_round.items() if len(rs) > 1}
    versions = [r["model_version"] for r in committed]
    dup_versions = sorted({v for v in versions if versions.count(v) > 1})
    problems = [f"round {n} committed by attempts {a}" for n, a in sorted(twice.items())]
    problems += [f"model v{v} committed by more than one round" for v in dup_versions]
    check("no round committed twice", problems, f"{len(committed)} committed rows for {len(by_round)} rounds")

    # 2. attempts: contiguous, closed, none after the commit, only commits name a model
    problems = []
    attempts: dict[int, list[dict[str, Any]]] = {}
    for r in rounds:
        attempts.setdefault(r["round"], []).append(r)
    for n, rs in sorted(attempts.items()):
        numbers = sorted(r["attempt"] for r in rs)
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"round {n}: attempts {numbers} are not 1..{len(numbers)}")
        for r in rs:
            if r["status"] == "open":
                problems.append(f"round {n} attempt {r['attempt']} is still open")
            if r["status"] != "committed" and r["model_version"] is not None:
                problems.append(f"round {n} attempt {r['attempt']} is {r['status']} but names model "
                                f"v{r['model_version']}")
            if n in by_round and r["attempt"] > by_round[n][0]["attempt"]:
                problems.append(f"round {n} attempt {r['attempt']} ran after the round committed "
                                f"(attempt {by_round[n][0]['attempt']})")
    if any(n > R for n in attempts):
        problems.append(f"attempts of rounds beyond {R}: {sorted(n for n in attempts if n > R)}")
    extra = {k: v for k, v in statuses.items() if k != "committed"}
    check("round attempts consistent", problems,
          f"{len(rounds)} attempts; besides the commits: {extra or 'none'}")

    # 3. each commit builds on the previous one, with a quorum of accepted updates
    problems = []
    parts_by_attempt: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for p in store["participations"]:
        parts_by_attempt.setdefault((p["round"], p["attempt"]), []).append(p)
    for n, rs in sorted(by_round.items()):
        r = rs[0]
        if r["model_version"] != n or r["base_version"] != n - 1:
            problems.append(f"round {n} committed v{r['model_version']} on v{r['base_version']}, "
                            f"expected v{n} on v{n - 1}")
        done = [p for p in parts_by_attempt.get((n, r["attempt"]), []) if p["status"] == "done"]
        if len(done) < settings.min_institutions:
            problems.append(f"round {n}: {len(done)} accepted updates, quorum {settings.min_institutions}")
        updates = json.loads(r["metrics"]).get("num_updates")
        if updates is not None and int(updates) != len(done):
            problems.append(f"round {n}: metrics say {int(updates)} updates, {len(done)} participations are done")
    check("commits chain v(k-1) -> vk with a quorum", problems, "round k committed vk on v(k-1), quorum held")

    # 4. the model chain: versions 0..R, parents, files and their SHA-256
    models = {m["version"]: m for m in store["models"]}
    problems = []
    if sorted(models) != list(range(R + 1)):
        problems.append(f"model versions are {_spans(sorted(models))}, expected 0..{R}")
    for v, m in sorted(models.items()):
        expected_parent = None if v == 0 else v - 1
        if m["parent_version"] != expected_parent:
            problems.append(f"v{v}: parent v{m['parent_version']}, expected {expected_parent}")
        path = state / "models" / Path(m["path"]).name
        if Path(m["path"]).name != f"v{v:06d}-{m['sha256'][:16]}.safetensors":
            problems.append(f"v{v}: file name {Path(m['path']).name} does not name its version and hash")
        if not path.is_file():
            problems.append(f"v{v}: {path.relative_to(folder)} is missing")
            continue
        actual = _sha256(path)
        if actual != m["sha256"]:
            problems.append(f"v{v}: file SHA-256 {actual[:16]}.. differs from the store's {m['sha256'][:16]}..")
        if path.stat().st_size != m["size_bytes"]:
            problems.append(f"v{v}: file is {path.stat().st_size} bytes, the store says {m['size_bytes']}")
    check("model chain v0..vR intact (files, SHA-256, parents)", problems,
          f"{len(models)} versions, every file present and matching its SHA-256")

    # 5. signed lineage, checked here independently of fedcollab
    lineage = {int(r["version"]): (bytes(r["record"]), bytes(r["signature"])) for r in store.get("lineage", [])}
    problems = []
    pem_path = state / "lineage-public-key.pem"
    pem = pem_path.read_bytes() if pem_path.is_file() else b""
    if not pem:
        problems.append("lineage-public-key.pem is missing")
    if sorted(lineage) != list(range(R + 1)):
        problems.append(f"lineage records for versions {_spans(sorted(lineage))}, expected 0..{R}")
    committing = {r["model_version"]: r for r in committed}
    for v, (record_bytes, signature) in sorted(lineage.items()):
        if pem and not _verify_signature(pem, record_bytes, signature):
            problems.append(f"v{v}: signature does not verify")
        record = json.loads(record_bytes)
        m = models.get(v)
        if record.get("version") != v:
            problems.append(f"v{v}: record is for version {record.get('version')}")
        if m is not None and record.get("model_sha256") != m["sha256"]:
            problems.append(f"v{v}: record signs {str(record.get('model_sha256'))[:16]}.., store has "
                            f"{m['sha256'][:16]}..")
        parent = models.get(v - 1)
        want_parent = parent["sha256"] if v > 0 and parent else None
        if record.get("parent_sha256") != want_parent:
            problems.append(f"v{v}: record's parent {str(record.get('parent_sha256'))[:16]}.. is not v{v - 1}'s "
                            "model")
        if record.get("signed_at_restart"):
            problems.append(f"v{v}: signed at a restart, not at its commit")
        if v > 0:
            r = committing.get(v)
            if r is None:
                problems.append(f"v{v}: no committed round names it")
                continue
            if record.get("round") != r["round"]:
                problems.append(f"v{v}: record says round {record.get('round')}, committed by round {r['round']}")
            done = sorted((p["institution"], p["update_sha256"], p["num_examples"])
                          for p in parts_by_attempt.get((r["round"], r["attempt"]), []) if p["status"] == "done")
            signed = sorted((c["institution"], c["update_sha256"], c["num_examples"])
                            for c in record.get("contributions", []))
            if done != signed:
                problems.append(f"v{v}: signed contributions {[c[0] for c in signed]} are not the accepted "
                                f"updates {[d[0] for d in done]} of round {r['round']} attempt {r['attempt']}")
        copy = state / "lineage" / f"v{v:06d}.json"
        try:
            doc = json.loads(copy.read_text(encoding="utf-8"))
            same = (base64.b64decode(doc["record_b64"]) == record_bytes
                    and base64.b64decode(doc["signature_b64"]) == signature)
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"v{v}: readable copy {copy.relative_to(folder)} unusable ({type(e).__name__})")
        else:
            if not same:
                problems.append(f"v{v}: {copy.relative_to(folder)} differs from the signed record in the store")
    check("signed lineage v0..vR (signatures, parents, contributions, copies)", problems,
          f"{len(lineage)} records verify with the state's key, chain and copies match")

    # 6. the CLI agrees
    if run_cli:
        done_cli = fedcollab_cli(["lineage", "verify", str(state), "--json"], cwd=folder)
        problems = []
        try:
            report = json.loads(done_cli.stdout)
        except ValueError:
            report = {}
            problems.append(f"no JSON from `lineage verify` (rc {done_cli.returncode}): "
                            f"{(done_cli.stdout + done_cli.stderr)[-400:]}")
        if done_cli.returncode != 0:
            problems.append(f"`lineage verify` exited {done_cli.returncode}: {report.get('problems')}")
        if report and report.get("versions", [None])[-1] != R:
            problems.append(f"`lineage verify` checked versions up to {report.get('versions', [None])[-1]}, not {R}")
        if report.get("warnings"):
            problems.append(f"`lineage verify` warnings: {report['warnings'][:3]}")
        check("`fedcollab lineage verify` passes", problems,
              f"lineage intact v0..v{R}, key {report.get('key_fingerprint', '')[:23]}")
        fed = folder / "federation.toml"
        done_cli = fedcollab_cli(["coordinator", "status", "--config", str(fed)], cwd=folder)
        rows = [line for line in done_cli.stdout.splitlines()
                if re.search(r"[│|]\s*\d+\s*[│|]\s*\d+\s*[│|]\s*committed\b", line)]
        problems = []
        if done_cli.returncode != 0:
            problems.append(f"`coordinator status` exited {done_cli.returncode}: {done_cli.stdout[-300:]}")
        if len(rows) != R:
            problems.append(f"`coordinator status` lists {len(rows)} committed rows, expected {R}")
        check("`fedcollab coordinator status` lists each round committed once", problems, f"{len(rows)} committed rows")

    # 7. stray files
    strays = stray_files(folder, settings=settings, store=store)
    coordinator_strays = [x for x in strays if x.startswith("coordinator-state")]
    check(STRAYS_COORDINATOR, coordinator_strays,
          "none: spool/ empty, models/ and lineage/ hold only the committed versions")
    check(STRAYS_INSTITUTIONS, [x for x in strays if x not in coordinator_strays],
          "none: no partial downloads, temp files or pending updates; at most 2 cached models each")

    # 8. processes
    if lives:
        problems = []
        last: dict[str, Life] = {}
        for life in lives:
            last[life.process] = life
        for name in (COORDINATOR, *settings.institutions):
            life = last.get(name)
            if life is None:
                problems.append(f"{name} never started")
                continue
            if life.rc != 0:
                problems.append(f"{name}'s last life ({life.index}) ended {life.outcome or life.rc}")
            text = _read(folder / life.log)
            if name == COORDINATOR and not _FINISHED.search(text):
                problems.append("the coordinator's last life never logged that the study finished")
            if name != COORDINATOR and "study finished" not in text:
                problems.append(f"{name}'s last life never heard that the study finished")
        unexpected = [f"{lf.process} life {lf.index}: {lf.outcome}" for lf in lives
                      if lf.outcome not in ("killed", "exited 0")]
        problems += unexpected
        kills = sum(1 for lf in lives if lf.outcome == "killed")
        check("every process exits 0 at the end (the study finishes)", problems,
              f"{len(last)} processes, {len(lives)} lives ({kills} killed and restarted), last lives exited 0")
    return checks, strays, statuses


def stray_files(folder: Path, *, settings: Settings, store: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """Files a finished run should not have left, each with its size and what it is."""
    state = folder / "coordinator-state"
    out: list[str] = []

    def note(path: Path, why: str) -> None:
        size = path.stat().st_size if path.is_file() else 0
        out.append(f"{path.relative_to(folder)} ({size} B): {why}")

    known_top = {"coordinator.sqlite", "coordinator.sqlite-wal", "coordinator.sqlite-shm", "lineage-signing-key.pem",
                 "lineage-public-key.pem", "models", "lineage", "spool", "consortium.sqlite",
                 "consortium.sqlite-wal", "consortium.sqlite-shm", "operator.token", "coordinator.address",
                 ".lock"}  # the state folder's lock (fedcollab/_state_lock.py), kept
    for p in sorted(state.iterdir()) if state.is_dir() else []:
        if p.name not in known_top:
            note(p, "unexpected in the coordinator's state folder")
    committed_files = {Path(m["path"]).name for m in store.get("models", [])}
    for p in sorted((state / "models").iterdir()) if (state / "models").is_dir() else []:
        if p.name not in committed_files:
            note(p, "model file no committed round names (orphan or temp file)")
    records = {f"v{int(r['version']):06d}.json" for r in store.get("lineage", [])}
    for p in sorted((state / "lineage").iterdir()) if (state / "lineage").is_dir() else []:
        if p.name not in records:
            note(p, "not a committed version's record copy (temp file of an interrupted write?)")
    spool_re = re.compile(r"r(\d+)-a(\d+)-(.+)\.upload$")
    for p in sorted((state / "spool").rglob("*")) if (state / "spool").is_dir() else []:
        m = spool_re.match(p.name)
        why = (f"spooled upload of {m[3]} for round {m[1]} attempt {m[2]}, never removed" if m
               else "left in the upload spool")
        note(p, why)
    for name in settings.institutions:
        root = folder / name
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(root)
            if p.suffix in (".part", ".tmp"):
                note(p, "partial download" if p.suffix == ".part" else "temporary file")
            elif rel.parts[0] == "pending-updates":
                note(p, "pending update kept after the study finished")
        cached = sorted((root / "models").glob("*.safetensors")) if (root / "models").is_dir() else []
        if len(cached) > 2:
            out.append(f"{name}/models: {len(cached)} cached models (the cache keeps 2)")
    return out


@dataclass(frozen=True)
class Rejoin:
    """A daemon that was running all along, reconnecting to a restarted coordinator."""

    coordinator_life: int
    institution: str
    outage_s: float  # previous coordinator life's end -> this one serving
    delay_s: float  # this one serving -> the daemon's Join


def rejoins(lives: Sequence[Life]) -> list[Rejoin]:
    coords = [lf for lf in lives if lf.process == COORDINATOR]
    out = []
    for prev, life in zip(coords, coords[1:], strict=False):
        if life.serving_after_s is None or prev.ended_s is None:
            continue
        serving = life.started_s + life.serving_after_s
        # Daemons whose life began before the coordinator died and joined this one.
        for inst in (lf for lf in lives if lf.process != COORDINATOR and lf.started_s < prev.ended_s):
            after = [t for t in inst.join_times_s if t >= serving - 0.05]
            if after and (life.ended_s is None or after[0] <= life.ended_s):
                out.append(Rejoin(life.index, inst.process, round(serving - prev.ended_s, 2),
                                  round(max(0.0, after[0] - serving), 2)))
    return out


def rejoin_check(lives: Sequence[Life], *, settings: Settings) -> Check:
    """Informational: how long daemons that stayed up took to join a restarted
    coordinator, against their reconnect.max_backoff_s (before fedcollab bounded gRPC's
    channel backoff, 5-13 s after outages of 10-30 s)."""
    found = rejoins(lives)
    if not found:
        return Check("daemons rejoin a restarted coordinator within reconnect.max_backoff_s", True,
                     "no coordinator restart with a daemon waiting", invariant=False)
    # The daemon's own backoff and the gRPC channel's reconnect backoff (bounded by the same
    # max_backoff_s since fedcollab's transport fix) stack: twice it, and a second to join.
    bound = 2 * settings.max_backoff_s + 1.0
    slow = [r for r in found if r.delay_s > bound]
    worst = max(found, key=lambda r: r.delay_s)
    detail = (f"{len(found)} rejoins, median {sorted(r.delay_s for r in found)[len(found) // 2]:.1f} s, worst "
              f"{worst.delay_s:.1f} s ({worst.institution} after coordinator life {worst.coordinator_life}, down "
              f"{worst.outage_s:.1f} s); {len(slow)} slower than 2 x max_backoff_s "
              f"({settings.max_backoff_s:g} s) + 1 s")
    return Check("daemons rejoin a restarted coordinator within reconnect.max_backoff_s", not slow, detail,
                 invariant=False)


def run_chaos(folder: Path, *, settings: Settings, plan: Plan, seed: int | None = None, timeout_s: float = 900.0,
              on_event: EventSink | None = None, on_progress: Callable[[int], None] | None = None,
              run_cli: bool = True) -> RunResult:
    """One run: the federation under `plan`, then every check. Never raises for a
    failed run: see RunResult.error and RunResult.checks."""
    result = ChaosRun(folder, settings=settings, plan=plan, seed=seed, timeout_s=timeout_s, on_event=on_event,
                      on_progress=on_progress).run()
    try:
        checks, strays, statuses = inspect_state(folder, settings=settings, lives=result.lives, run_cli=run_cli)
    except Exception as e:  # a check that cannot even read the state is itself a finding
        checks, strays, statuses = [Check("state readable", False, f"{type(e).__name__}: {e}")], [], {}
    if result.error:
        checks.insert(0, Check("run completed", False, result.error.splitlines()[0]))
    reached = not result.not_reached
    checks.append(Check("every planned kill happened", reached,
                        "; ".join(result.not_reached) if not reached else
                        f"{len(result.kills)} kills, all as planned", invariant=False))
    checks.append(rejoin_check(result.lives, settings=settings))
    result.checks, result.strays, result.attempts = checks, strays, statuses
    return result
