#!/usr/bin/env python
"""The coordinator at scale: one FedAvg round of a 1-billion-parameter float32 model
(4 GB) from 8 institutions, with the coordinator's peak memory as a multiple of the
model's size (target: at most 2.5x).

How
---
The coordinator is the real one, started through the command line
(`python -m fedcollab coordinator serve --insecure`, plaintext gRPC on loopback) on a
"blob" model of --params float32 parameters. Eight real daemons would each hold the
model and its update (8 x 8 GB), which does not fit a 24 GiB machine, so the
institutions here are streaming clients, all in one second process, each speaking the
real protocol with fedcollab's gRPC stubs: Join, heartbeats, PollTask, DownloadModel
(every chunk and the whole file checked against their SHA-256, then discarded rather
than cached), UploadUpdate of a generated update (a 64 MiB pool of small Gaussian
values, read cyclically from a different offset per institution: the header's SHA-256
is computed in a first pass, the chunks are sent in a second), and ReportEvaluation
with no examples (no evaluation is run). The coordinator cannot tell them from
daemons: it verifies, spools and folds every chunk, then commits the mean as usual.

Figures: the round's wall time (`rounds.opened_at -> closed_at` in the coordinator's
SQLite store), bytes in and out, and the exact peak RSS (ru_maxrss) of the coordinator
and of the clients' process, with the coordinator's as a multiple of the model's bytes
next to its RSS once serving (python + torch + grpc).

    .venv/bin/python benchmarks/scale_1b.py                           # 1e9 params x 8 (~10 min, ~45 GB of disk)
    .venv/bin/python benchmarks/scale_1b.py --params 50000000 --institutions 4   # quick

Disk: the coordinator writes the initial and the new model and spools each upload
(institutions + 2 model sizes; 40 GB at the defaults), in --workdir (default: a
temporary folder, removed afterwards unless --keep).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import psutil  # noqa: E402
import round_overhead as ro  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(width=160)
MiB = 1024 * 1024
POOL_ELEMENTS = 16 * MiB  # 64 MiB of float32 values, reused cyclically


# ---------------------------------------------------------------------------- clients
def _update_pieces(*, total_bytes: int, chunk_bytes: int, offset_elements: int) -> Iterator[bytes]:
    """The generated update: the pool's bytes cyclically from an offset, in chunks."""
    import torch

    g = torch.Generator().manual_seed(12345)
    pool = (torch.randn(POOL_ELEMENTS, generator=g) * 1e-3).numpy().tobytes()
    pos = (offset_elements * 4) % len(pool)
    sent = 0
    while sent < total_bytes:
        n = min(chunk_bytes, total_bytes - sent)
        n -= n % 4 if n > 4 else 0
        piece = pool[pos:pos + n]
        if len(piece) < n:  # wrap around the pool
            piece += pool[:n - len(piece)]
        pos = (pos + n) % len(pool)
        sent += n
        yield piece


def _client(*, name: str, index: int, address: str, errors: list[str]) -> None:
    import grpc

    from fedcollab.institution import CoordinatorClient
    from fedcollab.v1 import coordinator_service_pb2 as pb
    from fedcollab.v1 import tensor_pb2
    from fedcollab.wire import manifest_nbytes

    client = CoordinatorClient(address=address, credentials=None, rpc_timeout_s=600)
    stop = threading.Event()
    try:
        session = client.join(institution=name, num_train_examples=1000).session_id

        def beat() -> None:
            while not stop.wait(2.0):
                try:
                    client.heartbeat(session_id=session)
                except Exception:  # noqa: BLE001 - a missed beat is not fatal here
                    pass

        threading.Thread(target=beat, daemon=True).start()
        stub = client._stub  # the raw stub: the update is streamed, never held as tensors
        while True:
            task = client.poll(session_id=session, wait_s=10)
            if task.kind == pb.TASK_KIND_FINISHED:
                return
            if task.kind == pb.TASK_KIND_EVALUATE:
                client.report_evaluation(pb.ReportEvaluationRequest(
                    session_id=session, round=task.round, nonce=task.nonce, model_sha256=task.model.sha256,
                    num_examples=0, loss=0.0, accuracy=0.0))
                continue
            if task.kind != pb.TASK_KIND_TRAIN:
                continue
            digest = hashlib.sha256()
            for response in stub.DownloadModel(pb.DownloadModelRequest(session_id=session, sha256=task.model.sha256),
                                               timeout=3600):
                if hashlib.sha256(response.chunk.data).digest() != response.chunk.sha256:
                    raise RuntimeError("download chunk does not match its SHA-256")
                digest.update(response.chunk.data)
            if digest.hexdigest() != task.model.sha256:
                raise RuntimeError("downloaded model does not match its SHA-256")
            total = manifest_nbytes(task.manifest)
            chunk = client.chunk_bytes
            whole = hashlib.sha256()
            for piece in _update_pieces(total_bytes=total, chunk_bytes=chunk, offset_elements=index * 7919):
                whole.update(piece)
            header = pb.UpdateHeader(session_id=session, round=task.round, nonce=task.nonce,
                                     base_version=task.model.version, manifest=task.manifest, total_bytes=total,
                                     sha256=whole.digest(), num_examples=1000)

            def requests(header: pb.UpdateHeader = header, total: int = total,
                         chunk: int = chunk) -> Iterator[pb.UploadUpdateRequest]:
                yield pb.UploadUpdateRequest(header=header)
                offset = 0
                for piece in _update_pieces(total_bytes=total, chunk_bytes=chunk, offset_elements=index * 7919):
                    yield pb.UploadUpdateRequest(chunk=tensor_pb2.Chunk(
                        offset=offset, data=piece, sha256=hashlib.sha256(piece).digest()))
                    offset += len(piece)

            try:
                stub.UploadUpdate(requests(), timeout=3600)
            except grpc.RpcError as e:
                raise RuntimeError(f"upload refused: {e.code()}: {e.details()}") from None
    except Exception as e:  # noqa: BLE001 - reported by the parent
        errors.append(f"{name}: {type(e).__name__}: {e}")
    finally:
        stop.set()
        client.close()


def serve_clients(*, address: str, count: int) -> int:
    errors: list[str] = []
    threads = [threading.Thread(target=_client, kwargs=dict(name=f"stream-i{i}", index=i, address=address,
                                                            errors=errors)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in errors:
        print(e, file=sys.stderr, flush=True)
    return 1 if errors else 0


# ---------------------------------------------------------------------------- the run
def _federation_toml(*, folder: Path, params: int, institutions: int, chunk_mib: int, timeout_s: float) -> Path:
    path = folder / "federation.toml"
    path.write_text(
        '[federation]\nname = "scale"\n\n'
        f'[server]\naddress = "127.0.0.1:0"\nstate_dir = {json.dumps(str(folder / "coordinator-state"))}\n'
        f"chunk_bytes = {chunk_mib * MiB}\nheartbeat_interval_s = 5.0\n\n"
        f'[study]\nname = "scale"\nrounds = 1\nmin_institutions = {institutions}\n'
        f"round_timeout_s = {timeout_s}\nevaluation_timeout_s = 60\n\n"
        f'[study.model]\nkind = "blob"\nparams = {{ num_parameters = {params} }}\n',
        encoding="utf-8")
    return path


def run(*, params: int, institutions: int, chunk_mib: int, timeout_s: float, folder: Path) -> dict[str, Any]:
    env = ro.child_env()
    federation = _federation_toml(folder=folder, params=params, institutions=institutions, chunk_mib=chunk_mib,
                                  timeout_s=timeout_s)
    watcher = ro.Watcher(interval_s=0.1)
    watcher.start()
    children: list[ro.Child] = []
    try:
        t0 = time.time()
        coordinator = ro.spawn(name="coordinator", cwd=folder, env=env, log_path=folder / "coordinator.log",
                               args=["coordinator", "serve", "--config", str(federation), "--insecure",
                                     "--exit-when-done", "--linger", "1"])
        children.append(coordinator)
        watcher.add(coordinator)
        port = ro.wait_for_port(coordinator=coordinator, timeout_s=max(ro.PORT_TIMEOUT_S, params / 2e7))
        serving_rss = coordinator.ps.memory_info().rss
        console.log(f"coordinator serving on port {port} after {time.time() - t0:.1f} s "
                    f"(RSS {serving_rss / MiB:.0f} MiB)")
        log = folder / "clients.log"
        with log.open("wb") as out:
            popen = subprocess.Popen([sys.executable, __file__, "--serve-clients", f"127.0.0.1:{port}",
                                      "--institutions", str(institutions)], stdout=out, stderr=subprocess.STDOUT,
                                     env=env, cwd=folder, start_new_session=True)
        clients = ro.Child(name="clients", popen=popen, ps=psutil.Process(popen.pid), log_path=log,
                           started=time.time())
        children.append(clients)
        watcher.add(clients)
        ro.wait_for_exit(children=children, t_start=t0, timeout_s=timeout_s)
    finally:
        watcher.stop()
        ro.stop_all(children)
    state = ro.read_state(folder / "coordinator-state" / "coordinator.sqlite")
    committed = [r for r in state["rounds"] if r["status"] == "committed"]
    if not committed:
        raise ro.BenchError(f"no round committed; see {folder / 'coordinator.log'}")
    rnd = committed[-1]
    model_bytes = params * 4
    return {
        "params": params, "institutions": institutions, "model_bytes": model_bytes,
        "round_s": rnd["closed_at"] - rnd["opened_at"],
        "bytes_in": rnd["metrics"].get("bytes_in"), "bytes_out": rnd["metrics"].get("bytes_out"),
        "num_updates": rnd["metrics"].get("num_updates"),
        "coordinator": ro.memory_figures(coordinator, model_bytes=model_bytes),
        "coordinator_serving_rss_bytes": serving_rss,
        "clients": ro.memory_figures(clients, model_bytes=model_bytes),
    }


def show(res: dict[str, Any]) -> None:
    c, model = res["coordinator"], res["model_bytes"]
    table = Table(title=f"one round, {res['params']:,} float32 parameters ({model / 2**30:.2f} GiB) x "
                        f"{res['institutions']} institutions")
    for col in ("round", "updates", "bytes in", "bytes out", "coordinator peak RSS", "x model",
                "above serving RSS", "clients' process peak"):
        table.add_column(col, justify="right")
    above = c["peak_rss_bytes"] - res["coordinator_serving_rss_bytes"]
    table.add_row(f"{res['round_s']:.1f} s", f"{res['num_updates']:.0f}", f"{res['bytes_in'] / 1e9:.1f} GB",
                  f"{res['bytes_out'] / 1e9:.1f} GB", f"{c['peak_rss_bytes'] / 2**30:.2f} GiB",
                  f"{c['peak_x_model']:.2f}", f"{above / 2**30:.2f} GiB ({above / model:.2f}x)",
                  f"{res['clients']['peak_rss_bytes'] / 2**30:.2f} GiB")
    console.print(table)
    verdict = "met" if c["peak_x_model"] <= 2.5 else "NOT met"
    console.print(f"coordinator peak {c['peak_x_model']:.2f}x the model (target <= 2.5x: {verdict})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=1_000_000_000)
    parser.add_argument("--institutions", type=int, default=8)
    parser.add_argument("--chunk-mib", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--serve-clients", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_clients:
        return serve_clients(address=args.serve_clients, count=args.institutions)
    folder = Path(tempfile.mkdtemp(prefix="fedcollab-scale-", dir=args.workdir))
    try:
        res = run(params=args.params, institutions=args.institutions, chunk_mib=args.chunk_mib,
                  timeout_s=args.timeout, folder=folder)
    except ro.BenchError as e:
        console.print(f"[red]{e}[/red]")
        console.print(f"logs kept in {folder}")
        return 1
    show(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2), encoding="utf-8")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
