#!/usr/bin/env python
"""Load on one coordinator: 200 light institutions for 60 s, latency per RPC kind.

What it measures
----------------
The real coordinator, its own process started through the command line
(`python -m fedcollab coordinator serve --insecure`, plaintext gRPC on loopback, as in
`round_overhead.py`, whose helpers are imported), runs an endless study on a tiny model
(kind "mlp": 64 -> 16 -> 10, 1,210 float32 parameters, a 5 KB file): each round selects
--per-round of the online institutions (default 30, quorum 20), commits the FedAvg of
their updates, then asks --evaluate-per-round of the online institutions (default 30;
0: every one) to evaluate the new model, and the next round opens. --institutions light
institutions (default 200) drive it for --seconds (default 60). They train nothing: each
one speaks the real protocol with the generated stubs
(`fedcollab.v1.coordinator_service_pb2_grpc`), as the daemon's client
(`fedcollab/institution/_client.py`) builds every message:

    Join -> Heartbeat every heartbeat_interval_seconds (as Join says) -> PollTask
    long-polls (wait_seconds 10, as the daemon) -> on TRAIN: DownloadModel unless
    this version is cached (each chunk and the whole file checked against their
    SHA-256; like a daemon, each version is downloaded once), then UploadUpdate of
    small Gaussian noise of the manifest's shapes (header + chunks, SHA-256s,
    num_examples 100) -> on EVALUATE: ReportEvaluation with small numbers (with
    --evaluate-downloads, DownloadModel first, once per version, as a real daemon
    does) -> poll again. No think time: as soon as one call returns the next starts,
    so the coordinator runs rounds back to back, as fast as it can.

Each has its own channel (and its own TCP connection: local subchannel pool), like a
daemon process. The clients are grpc.aio coroutines in --client-procs processes
(default 2), not 200 OS threads, so that on a small machine the client side is not
what is measured; each process also records its event loop's lag (how late a 10 ms
sleep wakes), which bounds what its scheduling adds to the figures.

Figures
- per RPC kind: calls completed in the window, calls/s, p50, p99 and max latency
  (client-side, time.perf_counter around the call; a stream from the call to its last
  message; successful calls only) and errors. Non-waiting calls: Join, Heartbeat,
  DownloadModel, UploadUpdate, ReportEvaluation. PollTask is a long-poll that may wait
  (up to 10 s when there is nothing to do): its call times are shown apart, and what
  matters for it, the delay from a task becoming due to the poller holding it, is
  shown per task kind: TRAIN from the round's `rounds.opened_at`, EVALUATE from the
  round's commit (`rounds.closed_at`; the evaluation opens just after it), or from the
  call's start when the task was already due then.
- errors by RPC kind, gRPC status code and the coordinator's reason (the ErrorInfo of
  the rich status, as `fedcollab.wire.from_rpc_error` reads it). Calls the benchmark
  itself cancels when the window ends (long-polls still waiting) are counted apart,
  not as errors.
- rounds committed in the window (`rounds.closed_at` in the coordinator's SQLite
  store), their wall time, failed attempts.
- the coordinator process: CPU seconds in the window (and as % of one core), threads,
  peak RSS (ru_maxrss from wait4); the client processes' CPU, loop lag and peak RSS;
  how busy the whole machine was, and how much of that was neither the coordinator,
  nor the clients, nor interrupts: other jobs, which make the figures worse than on an
  idle machine (flagged when above 10% of a core).

Target: no errors, and p99 of the non-waiting calls (all kinds pooled) under 100 ms.
The kinds whose own p99 is over 100 ms are named next to the verdict (Join, for one:
by default all institutions join at once, as after a coordinator restart, and those
200 calls are a burst of their own).

    .venv/bin/python benchmarks/load.py                          # 200 institutions, 60 s
    .venv/bin/python benchmarks/load.py --institutions 50 --seconds 15   # quick check
    # options: --per-round K, --evaluate-per-round E, --client-procs P, --max-workers W, --join-ramp S,
    #          --evaluate-downloads, --json out.json, --keep (keep logs and state),
    #          --py-spy OUT (profile the coordinator; its figures are then not the benchmark's)

Linux only (/proc, wait4). Only loopback addresses are used. Run it on an otherwise
idle machine: the coordinator and the clients share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import psutil  # noqa: E402
import round_overhead as ro  # noqa: E402  (a sibling script, not a package)
from rich.table import Table  # noqa: E402

console = ro.console
MiB = ro.MiB
TARGET_P99_S = 0.100
NON_WAITING = ("Join", "Heartbeat", "DownloadModel", "UploadUpdate", "ReportEvaluation")
POLL_WAIT_S = 10.0  # what the daemon asks for (InstitutionDaemon's poll_wait_s)
RPC_TIMEOUT_S = 30.0  # the daemon's rpc_timeout_s
GRACE_S = 15.0  # after the window: for calls already in flight to complete
LOOP_TICK_S = 0.010
ERROR_DOMAIN = "fedcollab.dev"  # fedcollab.wire.ERROR_DOMAIN (not imported: it would load torch here)


@dataclass(frozen=True)
class Options:
    institutions: int
    seconds: float
    per_round: int
    evaluate_per_round: int
    min_institutions: int
    round_timeout_s: float
    evaluation_timeout_s: float
    max_workers: int
    client_procs: int
    join_ramp_s: float
    evaluate_downloads: bool
    json_path: Path | None
    workdir: Path | None
    keep: bool
    py_spy: Path | None


# ============================================================================ clients
# Run in the --serve-clients child processes: grpc and the generated stubs, no torch,
# so 100 institutions cost one small process (about 80 MiB).
class Recorder:
    """What one client process saw: latencies per kind, errors, task deliveries."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: list[dict[str, Any]] = []
        self.deliveries: list[dict[str, Any]] = []
        self.cancelled_at_end: Counter[str] = Counter()
        self.loop_lag: list[float] = []
        self.closing = False  # the window is over: cancellations from here on are ours

    def error(self, kind: str, e: BaseException) -> None:
        import grpc

        if isinstance(e, grpc.aio.AioRpcError):
            code, reason, message = e.code().name, _reason(e), e.details() or ""
        elif isinstance(e, asyncio.CancelledError):
            code, reason, message = "CANCELLED", "CLIENT", "cancelled by the benchmark"
        else:
            code, reason, message = "CLIENT", type(e).__name__, str(e)
        if self.closing and code == "CANCELLED":
            self.cancelled_at_end[kind] += 1
            return
        self.errors.append({"kind": kind, "code": code, "reason": reason, "message": message[:300],
                            "at": time.time()})


def _reason(e: BaseException) -> str:
    """The ErrorInfo reason of a rich status, as fedcollab.wire.from_rpc_error reads it;
    "TRANSPORT" when the status carries none (the call failed below the coordinator)."""
    import grpc
    from google.rpc import error_details_pb2, status_pb2

    if not isinstance(e, grpc.aio.AioRpcError):
        return ""
    try:
        trailers = e.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - no trailers at all
        return "TRANSPORT"
    for key, value in trailers:
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                return info.reason
    return "TRANSPORT"


_ITEMSIZE = {1: 4, 2: 8, 3: 2, 4: 2, 5: 4}  # TensorDtype -> bytes per element


def _update_bytes(manifest: Any, rng: random.Random) -> bytes:
    """A small update of the manifest's tensors, in order, little-endian: Gaussian
    noise (std 1e-4) for float32/float64/float16 tensors, zeros otherwise."""
    import numpy as np

    parts = []
    for spec in manifest.tensors:
        n = math.prod(spec.shape)
        dtype = {1: "<f4", 2: "<f8", 3: "<f2"}.get(spec.dtype)
        if dtype is None:
            parts.append(bytes(n * _ITEMSIZE.get(spec.dtype, 4)))
        else:
            values = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 1e-4, n)
            parts.append(values.astype(dtype).tobytes())
    return b"".join(parts)


class LightInstitution:
    """One institution: its own channel, session, heartbeats, long-polls and tasks."""

    def __init__(self, *, name: str, address: str, rec: Recorder, stop: asyncio.Event,
                 evaluate_downloads: bool) -> None:
        import grpc

        from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc

        self.name = name
        self.rec = rec
        self.stop = stop
        # Its own subchannel (TCP connection), as a separate daemon process would have;
        # by default grpc shares one between channels of equal arguments.
        self.channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 * MiB + 64 * 1024),
            ("grpc.max_send_message_length", 64 * MiB + 64 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.use_local_subchannel_pool", 1),
        ])
        self.stub = pb_grpc.CoordinatorServiceStub(self.channel)
        self.session = ""
        self.heartbeat_s = 2.0
        self.chunk_bytes = 1 * MiB
        self.cached: list[str] = []  # SHA-256 of versions held, newest last (a daemon keeps two)
        self.rng = random.Random(name)
        self.evaluate_downloads = evaluate_downloads

    async def timed(self, kind: str, call: Any) -> Any:
        """Awaits one unary call, records its latency, or its error (re-raised)."""
        t = time.perf_counter()
        try:
            response = await call
        except BaseException as e:
            self.rec.error(kind, e)
            raise
        self.rec.latency[kind].append(time.perf_counter() - t)
        return response

    async def join(self) -> None:
        from fedcollab.v1 import coordinator_service_pb2 as pb

        while not self.stop.is_set():
            try:
                r = await self.timed("Join", self.stub.Join(
                    pb.JoinRequest(institution=self.name, num_train_examples=100, client_version="load-bench"),
                    timeout=RPC_TIMEOUT_S))
            except Exception as e:  # noqa: BLE001 - recorded; retried like the daemon does
                await self._backoff(e)
                continue
            self.session = r.session_id
            self.heartbeat_s = max(0.05, r.heartbeat_interval_seconds or 2.0)
            self.chunk_bytes = int(r.chunk_bytes) or self.chunk_bytes
            return

    async def _backoff(self, e: BaseException) -> None:
        delay = 2.0 if _reason(e) == "RATE_LIMITED" else 0.2  # as the daemon backs off
        try:
            await asyncio.wait_for(self.stop.wait(), delay)
        except TimeoutError:
            pass

    async def heartbeats(self) -> None:
        from fedcollab.v1 import coordinator_service_pb2 as pb

        await self._sleep(self.rng.uniform(0, self.heartbeat_s))  # spread the beats, as daemons start apart
        while not self.stop.is_set():
            try:
                await self.timed("Heartbeat", self.stub.Heartbeat(pb.HeartbeatRequest(session_id=self.session),
                                                                  timeout=RPC_TIMEOUT_S))
            except Exception:  # noqa: BLE001 - recorded; a missed beat is not fatal
                pass
            await self._sleep(self.heartbeat_s)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            pass

    async def poll(self) -> Any | None:
        """One long-poll; None when the window ended while it waited (it is cancelled)."""
        from fedcollab.v1 import coordinator_service_pb2 as pb

        start_wall, t = time.time(), time.perf_counter()
        call = self.stub.PollTask(pb.PollTaskRequest(session_id=self.session, wait_seconds=POLL_WAIT_S),
                                  timeout=POLL_WAIT_S + RPC_TIMEOUT_S)
        waiter = asyncio.ensure_future(call)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not waiter.done():
            call.cancel()
            self.rec.cancelled_at_end["PollTask"] += 1
            try:
                await waiter
            except BaseException:  # noqa: BLE001 - cancelled by us
                pass
            return None
        try:
            task = waiter.result().task
        except Exception as e:
            self.rec.error("PollTask", e)
            raise
        elapsed = time.perf_counter() - t
        kind = pb.TaskKind.Name(task.kind).removeprefix("TASK_KIND_")
        self.rec.latency[f"PollTask:{kind}"].append(elapsed)
        if task.kind in (pb.TASK_KIND_TRAIN, pb.TASK_KIND_EVALUATE):
            self.rec.deliveries.append({"kind": kind, "round": int(task.round), "call_start": start_wall,
                                        "received": start_wall + elapsed})
        return task

    async def download(self, model: Any) -> None:
        """The version's file unless cached: chunk and whole-file SHA-256s checked."""
        from fedcollab.v1 import coordinator_service_pb2 as pb

        if model.sha256 in self.cached:
            return
        t = time.perf_counter()
        digest, offset = hashlib.sha256(), 0
        try:
            call = self.stub.DownloadModel(pb.DownloadModelRequest(session_id=self.session, sha256=model.sha256),
                                           timeout=RPC_TIMEOUT_S + model.size_bytes / 1e6)
            async for response in call:
                chunk = response.chunk
                if chunk.offset != offset or hashlib.sha256(chunk.data).digest() != chunk.sha256:
                    raise ValueError(f"model chunk at offset {chunk.offset} is corrupt")
                digest.update(chunk.data)
                offset += len(chunk.data)
            if digest.hexdigest() != model.sha256 or offset != model.size_bytes:
                raise ValueError("downloaded model does not match its SHA-256 or size")
        except BaseException as e:
            self.rec.error("DownloadModel", e)
            raise
        self.rec.latency["DownloadModel"].append(time.perf_counter() - t)
        self.cached = [*self.cached[-1:], model.sha256]

    async def upload(self, task: Any) -> None:
        from fedcollab.v1 import coordinator_service_pb2 as pb
        from fedcollab.v1 import tensor_pb2

        data = _update_bytes(task.manifest, self.rng)
        header = pb.UpdateHeader(session_id=self.session, round=task.round, nonce=task.nonce,
                                 base_version=task.model.version, manifest=task.manifest, total_bytes=len(data),
                                 sha256=hashlib.sha256(data).digest(), num_examples=100,
                                 metrics={"train_loss": 0.5})
        header.encoding.CopyFrom(task.compression)  # the task's compression, echoed (none here)
        requests = [pb.UploadUpdateRequest(header=header)]
        for offset in range(0, len(data), self.chunk_bytes):
            piece = data[offset:offset + self.chunk_bytes]
            requests.append(pb.UploadUpdateRequest(chunk=tensor_pb2.Chunk(
                offset=offset, data=piece, sha256=hashlib.sha256(piece).digest())))
        call = self.stub.UploadUpdate(iter(requests), timeout=RPC_TIMEOUT_S + len(data) / 1e6)
        await self.timed("UploadUpdate", call)

    async def evaluate(self, task: Any) -> None:
        from fedcollab.v1 import coordinator_service_pb2 as pb

        if self.evaluate_downloads:  # as the daemon does: it evaluates the model it was sent
            await self.download(task.model)
        loss = 0.5 + self.rng.random() * 0.1
        await self.timed("ReportEvaluation", self.stub.ReportEvaluation(pb.ReportEvaluationRequest(
            session_id=self.session, round=task.round, nonce=task.nonce, model_sha256=task.model.sha256,
            num_examples=20, loss=loss, accuracy=0.9), timeout=RPC_TIMEOUT_S))

    async def run(self, start_at: float) -> None:
        from fedcollab.v1 import coordinator_service_pb2 as pb

        await self._sleep(max(0.0, start_at - time.time()))
        await self.join()
        beats = asyncio.ensure_future(self.heartbeats())
        try:
            while not self.stop.is_set():
                try:
                    task = await self.poll()
                    if task is None or task.kind == pb.TASK_KIND_FINISHED:
                        break
                    if self.stop.is_set():
                        break  # the window ended: no new calls
                    if task.kind == pb.TASK_KIND_TRAIN:
                        await self.download(task.model)
                        if not self.stop.is_set():
                            await self.upload(task)
                    elif task.kind == pb.TASK_KIND_EVALUATE:
                        await self.evaluate(task)
                except Exception as e:  # noqa: BLE001 - recorded where it happened; go on like the daemon
                    if _reason(e) == "SESSION_UNKNOWN":
                        await self.join()
                    else:
                        await self._backoff(e)
        finally:
            await beats


async def _loop_lag(rec: Recorder, stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(LOOP_TICK_S)
        rec.loop_lag.append(time.perf_counter() - t - LOOP_TICK_S)


async def _serve(args: argparse.Namespace) -> dict[str, Any]:
    rec = Recorder()
    stop = asyncio.Event()
    names = [f"load-i{i:04d}" for i in range(args.first_index, args.first_index + args.count)]
    clients = [LightInstitution(name=n, address=args.serve_clients, rec=rec, stop=stop,
                                evaluate_downloads=args.evaluate_downloads) for n in names]
    # Connected before the window, as running daemons would be: the window times calls.
    await asyncio.wait_for(asyncio.gather(*(c.channel.channel_ready() for c in clients)), 60)
    print("READY", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    t0 = float(line.split()[1])
    end = t0 + args.seconds
    n = len(clients)
    ramp = args.join_ramp
    lag = asyncio.ensure_future(_loop_lag(rec, stop))
    runs = [asyncio.ensure_future(c.run(t0 + ramp * (args.first_index + i) / max(1, args.total)))
            for i, c in enumerate(clients)]
    await asyncio.sleep(max(0.0, end - time.time()))
    rec.closing = True
    stop.set()  # no new calls; waiting long-polls are cancelled; calls in flight complete
    _, pending = await asyncio.wait(runs, timeout=GRACE_S)
    for task in pending:  # stuck past the grace: cancelled, counted by the recorder
        task.cancel()
    await asyncio.gather(*runs, return_exceptions=True)
    await lag
    for c in clients:
        await c.channel.close()
    times = os.times()
    return {
        "institutions": n, "first_index": args.first_index, "t0": t0, "end": end,
        "latency": dict(rec.latency), "errors": rec.errors, "deliveries": rec.deliveries,
        "cancelled_at_end": dict(rec.cancelled_at_end), "stuck_after_grace": len(pending),
        "loop_lag": rec.loop_lag, "cpu_s": times.user + times.system,
    }


def serve_clients(args: argparse.Namespace) -> int:
    results = asyncio.run(_serve(args))
    Path(args.results).write_text(json.dumps(results), encoding="utf-8")
    return 0


# ============================================================================ the run
def write_federation_toml(*, folder: Path, opts: Options) -> Path:
    path = folder / "federation.toml"
    path.write_text(
        '[federation]\nname = "load"\n\n'
        "[server]\n"
        'address = "127.0.0.1:0"\n'
        f"state_dir = {json.dumps(str(folder / 'coordinator-state'))}\n"
        # Each PollTask waiting for a task holds one of the server's threads for up to
        # max_poll_wait_s (the engine waits on a condition in that thread), so with N
        # institutions polling, N threads are taken before any other call arrives; a
        # heartbeat or an upload that finds no free thread queues behind long-polls
        # for seconds. max_workers = N + 64 leaves room for bursts of short calls
        # (gRPC also caps concurrent RPCs at 4 x max_workers).
        f"max_workers = {opts.max_workers}\n"
        "heartbeat_interval_s = 2.0\n"
        "max_poll_wait_s = 10.0\n\n"
        "[study]\n"
        'name = "load"\n'
        "rounds = 1000000\n"  # more than any window: rounds keep opening
        f"min_institutions = {opts.min_institutions}\n"
        f"institutions_per_round = {opts.per_round}\n"
        # A sample evaluates each new model, as a large federation would configure it:
        # with all 200, each commit sent 200 EVALUATE tasks at once, those polls and
        # reports were about 3/4 of all calls, and ReportEvaluation the slowest kind
        # (p99 ~400 ms). 30 institutions' reports still give each round's eval_* metrics.
        f"evaluation_institutions_per_round = {opts.evaluate_per_round}\n"
        f"round_timeout_s = {opts.round_timeout_s}\n"
        f"evaluation_timeout_s = {opts.evaluation_timeout_s}\n"
        "max_round_attempts = 1000\n\n"
        "[study.model]\n"
        'kind = "mlp"\n'
        "params = { in_features = 64, hidden = [16], num_classes = 10 }\n",
        encoding="utf-8",
    )
    return path


@dataclass
class ClientProc:
    child: ro.Child
    results: Path


def spawn_clients(*, opts: Options, port: int, folder: Path, env: dict[str, str]) -> list[ClientProc]:
    procs = []
    per = math.ceil(opts.institutions / opts.client_procs)
    for k in range(opts.client_procs):
        first, count = k * per, min(per, opts.institutions - k * per)
        if count <= 0:
            break
        log = folder / f"clients-{k}.log"
        results = folder / f"clients-{k}.json"
        with log.open("wb") as err:
            popen = subprocess.Popen(
                [sys.executable, __file__, "--serve-clients", f"127.0.0.1:{port}", "--first-index", str(first),
                 "--count", str(count), "--total", str(opts.institutions), "--seconds", str(opts.seconds),
                 "--join-ramp", str(opts.join_ramp_s), "--results", str(results),
                 *(["--evaluate-downloads"] if opts.evaluate_downloads else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, cwd=folder,
                start_new_session=True,
            )
        child = ro.Child(name=f"clients-{k}", popen=popen, ps=psutil.Process(popen.pid), log_path=log,
                         started=time.time())
        procs.append(ClientProc(child=child, results=results))
    return procs


def _wait_ready(procs: Sequence[ClientProc], *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        assert p.child.popen.stdout is not None
        while True:
            ready, _, _ = select.select([p.child.popen.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ro.BenchError(f"{p.child.name} did not connect its channels within {timeout_s:.0f} s:\n"
                                    f"{ro.log_tail(p.child.log_path)}")
            line = p.child.popen.stdout.readline()
            if line.strip() == b"READY":
                break
            if not line:
                raise ro.BenchError(f"{p.child.name} exited before it was ready:\n{ro.log_tail(p.child.log_path)}")


def _busy_pct(a: Any, b: Any) -> float:
    """Share of all the machine's cores that was busy between two psutil.cpu_times()."""
    idle = (b.idle - a.idle) + (getattr(b, "iowait", 0.0) - getattr(a, "iowait", 0.0))
    total = sum(b) - sum(a)
    return 100.0 * (1.0 - idle / total) if total > 0 else 0.0


def _cpu_s(child: ro.Child) -> float:
    t = child.ps.cpu_times()
    return t.user + t.system


def run_load(*, opts: Options, folder: Path) -> dict[str, Any]:
    env = ro.child_env()
    federation = write_federation_toml(folder=folder, opts=opts)
    watcher = ro.Watcher(interval_s=0.1)
    watcher.start()
    children: list[ro.Child] = []
    spy: subprocess.Popen[bytes] | None = None
    try:
        coordinator = ro.spawn(name="coordinator", cwd=folder, env=env, log_path=folder / "coordinator.log",
                               args=["coordinator", "serve", "--config", str(federation), "--insecure",
                                     "--exit-when-done", "--linger", "0.5"])
        children.append(coordinator)
        watcher.add(coordinator)
        port = ro.wait_for_port(coordinator=coordinator, timeout_s=ro.PORT_TIMEOUT_S)
        serving_rss = coordinator.ps.memory_info().rss
        console.log(f"coordinator serving on 127.0.0.1:{port} (RSS {serving_rss / MiB:.0f} MiB, "
                    f"max_workers {opts.max_workers})")
        procs = spawn_clients(opts=opts, port=port, folder=folder, env=env)
        for p in procs:
            children.append(p.child)
            watcher.add(p.child)
        _wait_ready(procs, timeout_s=120)
        console.log(f"{opts.institutions} institutions connected in {len(procs)} client processes")
        t0 = time.time() + 0.5
        for p in procs:
            assert p.child.popen.stdin is not None
            p.child.popen.stdin.write(f"GO {t0!r}\n".encode())
            p.child.popen.stdin.flush()
        end = t0 + opts.seconds
        time.sleep(max(0.0, t0 - time.time()))
        cpu0 = _cpu_s(coordinator)
        clients0 = sum(_cpu_s(p.child) for p in procs)
        machine0 = psutil.cpu_times()
        load_before = os.getloadavg()[0]
        if opts.py_spy is not None:
            spy = _start_py_spy(coordinator.pid, seconds=opts.seconds, out=opts.py_spy)
        follower = ro.LogFollower(coordinator.log_path)
        committed, threads = 0, 0
        with console.status("") as status:
            while time.time() < end:
                committed += sum(" committed: model " in line for line in follower.new_lines())
                threads = max(threads, coordinator.ps.num_threads())
                if not coordinator.running:
                    raise ro.BenchError(f"the coordinator exited with code {coordinator.exit_code}:\n"
                                        f"{ro.log_tail(coordinator.log_path)}")
                rss = coordinator.samples[-1][1] / MiB if coordinator.samples else 0.0
                status.update(f"{time.time() - t0:5.1f} / {opts.seconds:.0f} s | rounds committed {committed} | "
                              f"coordinator CPU {_cpu_s(coordinator) - cpu0:6.1f} s, RSS {rss:5.0f} MiB, "
                              f"threads {threads}")
                time.sleep(min(0.5, max(0.0, end - time.time())))
        cpu1 = _cpu_s(coordinator)
        clients1 = sum(_cpu_s(p.child) for p in procs)
        machine1 = psutil.cpu_times()
        console.log(f"window over: coordinator used {cpu1 - cpu0:.1f} CPU s in {opts.seconds:.0f} s; "
                    "waiting for the clients' calls in flight")
        deadline = time.monotonic() + GRACE_S + 30
        while any(p.child.running for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in procs:
            if p.child.exit_code not in (0, None) or p.child.running:
                raise ro.BenchError(f"{p.child.name} failed (exit {p.child.exit_code}):\n"
                                    f"{ro.log_tail(p.child.log_path)}")
    finally:
        with ro._signals_deferred():
            if spy is not None:
                try:
                    spy.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    spy.kill()
            watcher.stop()
            ro.stop_all(children)
    clients = [json.loads(p.results.read_text(encoding="utf-8")) for p in procs]
    state = ro.read_state(folder / "coordinator-state" / "coordinator.sqlite")
    return {
        "t0": t0, "end": end, "coordinator_cpu_s": cpu1 - cpu0, "coordinator_threads_max": threads,
        "machine_busy_pct": _busy_pct(machine0, machine1), "load_before": load_before,
        "interrupts_cpu_s": sum(getattr(machine1, f, 0.0) - getattr(machine0, f, 0.0) for f in ("irq", "softirq")),
        "clients_cpu_s": clients1 - clients0,
        "coordinator": ro.memory_figures(coordinator, model_bytes=1), "coordinator_serving_rss_bytes": serving_rss,
        "client_procs": [{**ro.memory_figures(p.child, model_bytes=1), "cpu_s": c["cpu_s"],
                          "loop_lag": c["loop_lag"]} for p, c in zip(procs, clients, strict=True)],
        "clients": clients, "state": state,
    }


def _start_py_spy(pid: int, *, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or "/tmp/pyspy/bin/py-spy"
    if not Path(exe).exists():
        console.print("[yellow]py-spy not found: no profile[/]")
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "25",
                             "--format", "raw", "--gil", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ============================================================================ results
def _q(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted values."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def _stats(values: Sequence[float]) -> dict[str, Any]:
    v = sorted(values)
    return {"n": len(v), "p50": _q(v, 0.50), "p99": _q(v, 0.99), "max": v[-1] if v else None}


def build_results(*, opts: Options, run: dict[str, Any]) -> dict[str, Any]:
    t0, end, seconds = run["t0"], run["end"], opts.seconds
    latency: dict[str, list[float]] = defaultdict(list)
    errors: list[dict[str, Any]] = []
    deliveries: list[dict[str, Any]] = []
    cancelled: Counter[str] = Counter()
    for c in run["clients"]:
        for kind, values in c["latency"].items():
            latency[kind].extend(values)
        errors.extend(c["errors"])
        deliveries.extend(c["deliveries"])
        cancelled.update(c["cancelled_at_end"])
        cancelled["(stuck after grace)"] += c["stuck_after_grace"]
    errors_by_kind = Counter(e["kind"] for e in errors)
    kinds: dict[str, dict[str, Any]] = {}
    for kind in (*NON_WAITING, "PollTask:TRAIN", "PollTask:EVALUATE", "PollTask:WAIT", "PollTask:FINISHED",
                 "PollTask"):
        s = _stats(latency.get(kind, []))
        err = errors_by_kind.get(kind, 0)
        if kind in ("PollTask:FINISHED", "PollTask") and not s["n"] and not err:
            continue  # "PollTask": polls that failed (their errors), shown only if any did
        kinds[kind] = {**s, "per_s": s["n"] / seconds, "errors": err, "waiting": kind.startswith("PollTask")}
    non_waiting = [x for k in NON_WAITING for x in latency.get(k, [])]
    all_calls = [x for values in latency.values() for x in values]

    # Rounds: committed in the window, and when each task became due.
    rounds = run["state"]["rounds"]
    in_window = [r for r in rounds if r["status"] == "committed" and t0 <= r["closed_at"] <= end]
    failed = [r for r in rounds if r["status"] == "failed" and t0 <= (r["closed_at"] or 0) <= end]
    opened: dict[int, list[float]] = defaultdict(list)
    committed_at: dict[int, float] = {}
    for r in rounds:
        opened[r["round"]].append(r["opened_at"])
        if r["status"] == "committed":
            committed_at[r["round"]] = r["closed_at"]
    delays: dict[str, list[float]] = defaultdict(list)
    already_due: Counter[str] = Counter()
    unmatched = 0
    for d in deliveries:
        if d["kind"] == "TRAIN":
            due = max((o for o in opened.get(d["round"], []) if o <= d["received"]), default=None)
        else:
            due = committed_at.get(d["round"])
        if due is None:
            unmatched += 1
            continue
        if d["call_start"] > due:
            already_due[d["kind"]] += 1
        delays[d["kind"]].append(d["received"] - max(due, d["call_start"]))
    delivery = {k: {**_stats(v), "already_due_at_call": already_due[k]} for k, v in delays.items()}

    nw = _stats(non_waiting)
    over = [k for k in NON_WAITING if kinds[k]["p99"] is not None and kinds[k]["p99"] >= TARGET_P99_S]
    met = not errors and nw["n"] > 0 and nw["p99"] < TARGET_P99_S
    lags = [x for p in run["client_procs"] for x in p["loop_lag"]]
    return {
        "benchmark": "fedcollab load",
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.__dict__.items()},
        "window": {"t0": t0, "end": end, "seconds": seconds},
        "kinds": kinds,
        "non_waiting": {**nw, "per_s": nw["n"] / seconds},
        "all_calls": {"n": len(all_calls), "per_s": len(all_calls) / seconds},
        "errors": {
            "total": len(errors),
            "by_code_reason": [{"kind": k, "code": c, "reason": r, "count": n,
                                "example": next(e["message"] for e in errors
                                                if (e["kind"], e["code"], e["reason"]) == (k, c, r))}
                               for (k, c, r), n in Counter((e["kind"], e["code"], e["reason"])
                                                           for e in errors).most_common()],
        },
        "cancelled_at_end": dict(cancelled),
        "delivery": delivery,
        "deliveries_unmatched": unmatched,
        "rounds": {
            "committed_in_window": len(in_window),
            "per_s": len(in_window) / seconds,
            "failed_in_window": len(failed),
            "failed_reasons": Counter(r["reason"] for r in failed).most_common(5),
            "wall_s": _stats([r["closed_at"] - r["opened_at"] for r in in_window]),
            "train_s": _stats([r["metrics"].get("train_seconds", 0.0) for r in in_window]),
            "updates_per_round": _stats([r["metrics"].get("num_updates", 0.0) for r in in_window]),
            "eval_institutions": _stats([r["metrics"].get("eval_institutions", 0.0) for r in in_window]),
        },
        "coordinator": {
            "cpu_s": run["coordinator_cpu_s"],
            "cpu_pct_of_one_core": 100 * run["coordinator_cpu_s"] / seconds,
            "threads_max": run["coordinator_threads_max"],
            "peak_rss_bytes": run["coordinator"]["peak_rss_bytes"],
            "serving_rss_bytes": run["coordinator_serving_rss_bytes"],
        },
        "machine_busy_pct": run["machine_busy_pct"],
        "cpus": os.cpu_count(),
        "load_before": run["load_before"],
        "clients_cpu_s": run["clients_cpu_s"],
        # Busy core-seconds of the whole machine in the window that neither the
        # coordinator nor the clients used: other jobs (and interrupts) competing with them.
        # Interrupts (softirq: mostly the loopback traffic itself) are not charged to any process.
        "interrupts_cpu_s": run["interrupts_cpu_s"],
        "others_cpu_s": max(0.0, run["machine_busy_pct"] / 100 * (os.cpu_count() or 1) * seconds
                            - run["coordinator_cpu_s"] - run["clients_cpu_s"] - run["interrupts_cpu_s"]),
        "client_procs": [{"name": f"clients-{i}", "cpu_s": p["cpu_s"], "peak_rss_bytes": p["peak_rss_bytes"],
                          "loop_lag": _stats(p["loop_lag"])} for i, p in enumerate(run["client_procs"])],
        "client_loop_lag": _stats(lags),
        "target": {"p99_s": TARGET_P99_S, "met": met, "kinds_over": over, "errors": len(errors)},
        "versions": ro._versions(),
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:,.1f}"


def print_results(res: dict[str, Any]) -> None:
    o, w = res["options"], res["window"]["seconds"]
    evaluating = o.get("evaluate_per_round") or "all"  # results written before the option: all
    console.rule(f"fedcollab under load: {o['institutions']} institutions, {w:.0f} s, {o['per_round']} per round, "
                 f"{evaluating} evaluating, max_workers {o['max_workers']}")
    t = Table(title="Calls in the window (client-side latency of successful calls, ms)", title_justify="left")
    for col in ("RPC", "calls", "calls/s", "p50", "p99", "max", "errors"):
        t.add_column(col, justify="right" if col != "RPC" else "left")
    for kind, k in res["kinds"].items():
        if kind == "PollTask:TRAIN":
            nw = res["non_waiting"]
            t.add_row("[bold]all non-waiting[/]", f"{nw['n']:,}", f"{nw['per_s']:,.1f}", _ms(nw["p50"]),
                      _ms(nw["p99"]), _ms(nw["max"]),
                      str(sum(res["kinds"][x]["errors"] for x in NON_WAITING)), end_section=True)
        label = f"{kind} (long-poll)" if k["waiting"] else kind
        t.add_row(label, f"{k['n']:,}", f"{k['per_s']:,.1f}", _ms(k["p50"]), _ms(k["p99"]), _ms(k["max"]),
                  str(k["errors"]))
    a = res["all_calls"]
    t.add_row("[bold]all calls[/]", f"{a['n']:,}", f"{a['per_s']:,.1f}", "", "", "", str(res["errors"]["total"]))
    console.print(t)
    cancelled = ", ".join(f"{k} {v}" for k, v in res["cancelled_at_end"].items() if v) or "none"
    console.print(f"  PollTask:KIND = long-polls by what they returned (WAIT: nothing due within 10 s). "
                  f"Cancelled by the benchmark at the end of the window (not errors): {cancelled}.", style="dim")

    d = Table(title="Long-polls: delay from a task becoming due to the poller holding it (ms)", title_justify="left")
    for col in ("task", "delivered", "already due at the call", "p50", "p99", "max"):
        d.add_column(col, justify="right" if col != "task" else "left")
    for kind, s in sorted(res["delivery"].items(), reverse=True):
        d.add_row(kind, f"{s['n']:,}", f"{s['already_due_at_call']:,}", _ms(s["p50"]), _ms(s["p99"]), _ms(s["max"]))
    console.print(d)
    console.print("  due: TRAIN at rounds.opened_at, EVALUATE at the round's commit (rounds.closed_at), or the "
                  "call's start if later.", style="dim")

    if res["errors"]["by_code_reason"]:
        e = Table(title="Errors", title_justify="left")
        for col in ("RPC", "code", "reason", "count", "example"):
            e.add_column(col)
        for x in res["errors"]["by_code_reason"]:
            e.add_row(x["kind"], x["code"], x["reason"], str(x["count"]), x["example"][:90])
        console.print(e)

    r, c = res["rounds"], res["coordinator"]
    s = Table(title="Coordinator and clients", title_justify="left")
    s.add_column("figure")
    s.add_column("value", justify="right")
    s.add_row("rounds committed in the window", f"{r['committed_in_window']} ({r['per_s']:.2f}/s)")
    s.add_row("round wall (open -> commit), p50 / max", f"{_ms(r['wall_s']['p50'])} / {_ms(r['wall_s']['max'])} ms")
    s.add_row("updates per round, p50; evaluations per round, p50",
              f"{r['updates_per_round']['p50'] or 0:.0f}; {r['eval_institutions']['p50'] or 0:.0f}")
    s.add_row("failed round attempts in the window", f"{r['failed_in_window']}"
              + (f" ({r['failed_reasons'][0][0][:60]})" if r["failed_reasons"] else ""))
    s.add_row("coordinator CPU in the window", f"{c['cpu_s']:.1f} s = {c['cpu_pct_of_one_core']:.0f}% of one core")
    s.add_row("coordinator threads (max seen)", str(c["threads_max"]))
    s.add_row("coordinator peak RSS (ru_maxrss)",
              f"{c['peak_rss_bytes'] / MiB:,.0f} MiB (serving: {c['serving_rss_bytes'] / MiB:,.0f} MiB)")
    s.add_row("clients' CPU in the window (all client processes)",
              f"{res['clients_cpu_s']:.1f} s = {100 * res['clients_cpu_s'] / w:.0f}% of one core")
    s.add_row("machine: cores busy in the window; load average before",
              f"{res['machine_busy_pct']:.0f}% of {res['cpus']}; {res['load_before']:.1f}")
    others = res["others_cpu_s"]
    s.add_row("interrupts (softirq: mostly loopback networking)",
              f"{res['interrupts_cpu_s']:.1f} s = {100 * res['interrupts_cpu_s'] / w:.0f}% of one core")
    s.add_row("CPU used by other processes in the window",
              f"{others:.1f} s = {100 * others / w:.0f}% of one core" + (" [bold red](machine not idle)[/]"
                                                                       if others > 0.1 * w else ""))
    for p in res["client_procs"]:
        s.add_row(f"{p['name']}: event loop lag p99 / max, peak RSS",
                  f"{_ms(p['loop_lag']['p99'])} / {_ms(p['loop_lag']['max'])} ms, {p['peak_rss_bytes'] / MiB:,.0f} MiB")
    console.print(s)
    tgt = res["target"]
    nw = res["non_waiting"]
    over = ", ".join(f"{k} {_ms(res['kinds'][k]['p99'])} ms" for k in tgt["kinds_over"]) or "none"
    verdict = "[bold green]met[/]" if tgt["met"] else "[bold red]NOT met[/]"
    console.print(f"target: no errors, p99 of non-waiting calls < {TARGET_P99_S * 1000:.0f} ms: {verdict} "
                  f"(errors {tgt['errors']}; p99 of all non-waiting calls {_ms(nw['p99'])} ms; kinds whose own "
                  f"p99 is over: {over})")


# ============================================================================ main
def benchmark(*, opts: Options) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="fedcollab-load-", dir=opts.workdir))
    ok = False
    try:
        run = run_load(opts=opts, folder=folder)
        results = build_results(opts=opts, run=run)
        results["work_folder"] = str(folder) if opts.keep else None
        ok = True
        return results
    finally:
        if ok and not opts.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            console.print(f"logs and state kept in {folder}", style="yellow")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--institutions", type=int, default=200, help="light institutions (default 200)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the measured window (default 60)")
    p.add_argument("--per-round", type=int, default=30, help="institutions_per_round (default 30)")
    p.add_argument("--evaluate-per-round", type=int, default=30,
                   help="evaluation_institutions_per_round (default 30; 0: every online institution evaluates)")
    p.add_argument("--min-institutions", type=int, default=None,
                   help="the quorum, min_institutions (default: 2/3 of --per-round)")
    p.add_argument("--round-timeout", type=float, default=10.0, help="round_timeout_s (default 10)")
    p.add_argument("--evaluation-timeout", type=float, default=10.0, help="evaluation_timeout_s (default 10)")
    p.add_argument("--max-workers", type=int, default=None,
                   help="the coordinator's max_workers (default: institutions + 64, at most 1024)")
    p.add_argument("--client-procs", type=int, default=2, help="client processes (default 2)")
    p.add_argument("--join-ramp", type=float, default=0.0,
                   help="spread the Joins over this many seconds (default 0: all at once, as after a restart)")
    p.add_argument("--evaluate-downloads", action="store_true",
                   help="on EVALUATE, download the model first (once per version) as a real daemon does; by "
                        "default a light institution only reports, and downloads on TRAIN")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--workdir", type=Path, help="where the temporary work folder goes (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, coordinator state)")
    p.add_argument("--py-spy", type=Path, metavar="OUT",
                   help="record the coordinator with `py-spy record --format raw` into OUT during the window "
                        "(py-spy takes CPU too: the figures of such a run are not the benchmark's)")
    # internal: one client process
    p.add_argument("--serve-clients", metavar="ADDRESS", help=argparse.SUPPRESS)
    p.add_argument("--first-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--total", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def options_from(a: argparse.Namespace) -> Options:
    if a.institutions < 2 or a.seconds <= 0 or a.client_procs < 1 or a.evaluate_per_round < 0:
        raise SystemExit("--institutions must be at least 2, --seconds positive, --client-procs at least 1, "
                         "--evaluate-per-round not negative")
    per_round = min(a.per_round, a.institutions)
    quorum = a.min_institutions or max(1, (2 * per_round) // 3)
    return Options(
        institutions=a.institutions, seconds=a.seconds, per_round=per_round, evaluate_per_round=a.evaluate_per_round,
        min_institutions=min(quorum, per_round),
        round_timeout_s=a.round_timeout, evaluation_timeout_s=a.evaluation_timeout,
        max_workers=a.max_workers or min(1024, a.institutions + 64), client_procs=a.client_procs,
        join_ramp_s=a.join_ramp, evaluate_downloads=a.evaluate_downloads, json_path=a.json, workdir=a.workdir,
        keep=a.keep, py_spy=a.py_spy,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_clients:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
        return serve_clients(args)
    opts = options_from(args)
    return ro.run_cli(lambda: benchmark(opts=opts), json_path=opts.json_path, show=print_results)[1]


if __name__ == "__main__":
    sys.exit(main())
