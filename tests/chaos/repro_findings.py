#!/usr/bin/env python
"""Minimal reproductions of what the crash-resume harness found in fedcollab. Each
exits 1 while its bug is there and 0 once it is fixed.

    .venv/bin/python tests/chaos/repro_findings.py spool-leak
    .venv/bin/python tests/chaos/repro_findings.py part-leak
    .venv/bin/python tests/chaos/repro_findings.py status-writes
    .venv/bin/python tests/chaos/repro_findings.py reconnect-backoff [--down 30] [--with-fix]

spool-leak (fixed in RoundEngine.__init__ while this harness was written): one
  institution, one round; the coordinator kills itself
  (FEDCOLLAB_CRASH_AT=coordinator.upload_chunk:3) after folding the 3rd chunk of the
  update, is restarted, and the study finishes. The interrupted upload's spool file
  (spool/r1-a1-<institution>.upload) must not be there afterwards.

part-leak (fixed: the daemon drops partial downloads when the study finishes and
  whenever it evicts old versions): one institution, one round; the daemon kills itself
  (FEDCOLLAB_CRASH_AT=institution.download_chunk:<v0's chunks + 2>) while downloading
  v1 to evaluate it, is restarted after the evaluation gave up on it, and hears that
  the study finished. Its partial download models/<sha>.part stays: the cache
  eviction only looks at *.safetensors, and a .part is only ever resumed if the same
  model is asked for again (here never; in a study, whenever the round or evaluation
  it was fetched for ends without the daemon).

status-writes (fixed: `coordinator status` opens the store read-only):
  `fedcollab coordinator status` run while a coordinator serves a round
  opens the state with Store(), whose start-up marks every 'open' round 'abandoned'
  ('coordinator stopped'): the live round is shown, and stored, as abandoned.

reconnect-backoff (fixed in transport.create_channel while this harness was written):
  a daemon started while its coordinator is down (reconnect.max_backoff_s = 0.5) and a
  coordinator that comes up `--down` seconds later; prints how long after the
  coordinator serves the daemon joins. Without a bound on gRPC's own channel reconnect
  backoff (1 s x 1.6^n, up to 120 s) that decides: 12.7 s after a 30 s outage.
  `--with-fix` runs it with such a bound patched in here. Exit 1 if the join took
  longer than max_backoff_s + 1 s.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.chaos.harness import Fault, Plan, Settings, free_port, run_chaos


def spool_leak() -> int:
    folder = Path(tempfile.mkdtemp(prefix="fedcollab-spool-leak-"))
    settings = Settings(rounds=1, institutions=("hospital-a",), min_institutions=1, central_evaluation=False)
    plan = Plan(coordinator=(Fault("targeted", point="coordinator.upload_chunk", count=3),))
    result = run_chaos(folder, settings=settings, plan=plan, timeout_s=120, run_cli=False, on_event=print)
    spool = folder / "coordinator-state" / "spool"
    left = sorted(spool.iterdir()) if spool.is_dir() else []
    print(f"\nrun {'finished' if result.error is None else 'failed: ' + result.error}; "
          f"{len(result.kills)} kill(s): {[lf.crash_at for lf in result.kills]}")
    for c in result.checks:
        if c.name in ("exactly `rounds` rounds committed", "model chain v0..vR intact (files, SHA-256, parents)",
                      "no stray files left"):
            print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    print(f"{spool}: {[(p.name, p.stat().st_size) for p in left]}")
    if left:
        print("BUG: the spool file of the upload cut by the crash survived the restart and the end of the study")
        print(f"(state kept in {folder})")
        return 1
    shutil.rmtree(folder, ignore_errors=True)
    print("no spool file left: fixed")
    return 0


def part_leak() -> int:
    folder = Path(tempfile.mkdtemp(prefix="fedcollab-part-leak-"))
    # The evaluation gives up on the daemon (its lease, 3 s) before it is back (about 4+ s).
    settings = Settings(rounds=1, institutions=("hospital-a",), min_institutions=1, central_evaluation=False,
                        evaluation_timeout_s=2.0)
    n = settings.download_chunks + 2  # v0 for training, then 2 chunks into v1 for the evaluation
    plan = Plan(institutions={"hospital-a": (Fault("targeted", point="institution.download_chunk", count=n),)})
    result = run_chaos(folder, settings=settings, plan=plan, timeout_s=120, run_cli=False, on_event=print)
    cache = folder / "hospital-a" / "models"
    parts = sorted(cache.glob("*.part"))
    print(f"\nrun {'finished' if result.error is None else 'failed: ' + result.error}; "
          f"{len(result.kills)} kill(s): {[lf.crash_at for lf in result.kills]}")
    print(f"{cache}: {[(p.name[:16] + '...' + p.suffix, p.stat().st_size) for p in sorted(cache.iterdir())]}")
    if parts:
        print("BUG: the partial download of a model nobody will ask for again survives the end of the study")
        print(f"(state kept in {folder})")
        return 1
    shutil.rmtree(folder, ignore_errors=True)
    print("no partial download left: fixed")
    return 0


def status_writes() -> int:
    import grpc

    from fedcollab.config import FederationConfig, ModelConfig, ServerConfig, StudyConfig
    from fedcollab.coordinator import Coordinator
    from fedcollab.v1 import coordinator_service_pb2 as pb
    from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc
    from tests.chaos.harness import _connect_ro, fedcollab_cli

    folder = Path(tempfile.mkdtemp(prefix="fedcollab-status-writes-"))
    state = folder / "coordinator-state"
    (folder / "federation.toml").write_text(
        f'[server]\nstate_dir = "{state}"\n[study]\nname = "status"\n[study.model]\nkind = "mlp"\n'
        'params = { in_features = 4, hidden = [4], num_classes = 2 }\n', encoding="utf-8")
    config = FederationConfig(server=ServerConfig(address="127.0.0.1:0", state_dir=state, heartbeat_interval_s=0.5),
                              study=StudyConfig(name="status", rounds=1, min_institutions=1, round_timeout_s=60,
                                                model=ModelConfig(kind="mlp", params={"in_features": 4,
                                                                                      "hidden": [4],
                                                                                      "num_classes": 2})))

    def rows() -> list[tuple[int, int, str, str | None]]:
        con = _connect_ro(state / "coordinator.sqlite")
        try:
            return [tuple(r) for r in con.execute("SELECT round, attempt, status, reason FROM rounds")]
        finally:
            con.close()

    with Coordinator(config=config) as coordinator:
        channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
        stub = pb_grpc.CoordinatorServiceStub(channel)
        session = stub.Join(pb.JoinRequest(institution="site-a", num_train_examples=1)).session_id
        beating = threading.Event()

        def beat() -> None:  # site-a stays selected: the round stays open until its deadline
            while not beating.wait(0.2):
                stub.Heartbeat(pb.HeartbeatRequest(session_id=session))

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        deadline = time.monotonic() + 10
        while not any(r[2] == "open" for r in rows()) and time.monotonic() < deadline:
            time.sleep(0.1)
        before = rows()
        done = fedcollab_cli(["coordinator", "status", "--config", str(folder / "federation.toml")], cwd=folder)
        during = rows()
        live = coordinator.engine._round is not None and not coordinator.engine._round.closed
        beating.set()
        beater.join()
        channel.close()
    after = rows()
    print(f"rounds before `coordinator status`: {before}")
    print(f"`coordinator status` exited {done.returncode}; rows right after it: {during} "
          f"(the engine's round still open: {live})")
    print(f"rows once the coordinator stopped: {after}")
    shutil.rmtree(folder, ignore_errors=True)
    if any(r[2] == "abandoned" for r in during) and live:
        print("BUG: a read-only status command rewrote the live round as abandoned in the coordinator's store")
        return 1
    return 0


def reconnect_backoff(down_s: float, with_fix: bool) -> int:
    import grpc

    import fedcollab.institution._client as client_module
    from fedcollab.config import (
        FederationConfig,
        InstitutionConfig,
        InstitutionInfo,
        ModelConfig,
        ReconnectConfig,
        ServerConfig,
        StudyConfig,
    )
    from fedcollab.coordinator import Coordinator
    from fedcollab.institution import daemon_from_config

    reconnect = ReconnectConfig(initial_backoff_s=0.1, max_backoff_s=0.5)
    if with_fix:  # what create_channel would pass: gRPC's reconnect backoff bounded by the daemon's
        original = client_module.create_channel

        def create_channel(address: str, *, credentials: object, chunk_bytes: int, **_: object) -> grpc.Channel:
            options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                       ("grpc.keepalive_time_ms", 30_000),
                       ("grpc.initial_reconnect_backoff_ms", int(reconnect.initial_backoff_s * 1000)),
                       ("grpc.min_reconnect_backoff_ms", int(reconnect.initial_backoff_s * 1000)),
                       ("grpc.max_reconnect_backoff_ms", int(reconnect.max_backoff_s * 1000))]
            assert credentials is None
            return grpc.insecure_channel(address, options=options)

        client_module.create_channel = create_channel  # type: ignore[assignment]
    folder = Path(tempfile.mkdtemp(prefix="fedcollab-reconnect-"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    daemon = daemon_from_config(InstitutionConfig(
        institution=InstitutionInfo(name="hospital-a", coordinator=address, state_dir=folder / "hospital-a",
                                    trainer="synthetic"),
        reconnect=reconnect))
    stop = threading.Event()
    thread = threading.Thread(target=daemon.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    print(f"daemon started against {address}, nothing listening there; coordinator up in {down_s:.0f} s")
    time.sleep(down_s)
    coordinator = Coordinator(config=FederationConfig(
        server=ServerConfig(address=address, state_dir=folder / "coordinator", heartbeat_interval_s=0.5),
        study=StudyConfig(name="reconnect", rounds=1, min_institutions=2,
                          model=ModelConfig(kind="mlp", params={"in_features": 4, "hidden": [4], "num_classes": 2}))))
    coordinator.start()
    serving = time.monotonic()
    try:
        while "hospital-a" not in coordinator.engine.online_institutions():
            if time.monotonic() - serving > 150:
                print("the daemon did not join within 150 s")
                return 1
            time.sleep(0.01)
        delay = time.monotonic() - serving
    finally:
        stop.set()
        thread.join(timeout=10)
        coordinator.stop(grace=0.5)
        shutil.rmtree(folder, ignore_errors=True)
        if with_fix:
            client_module.create_channel = original  # type: ignore[assignment]
    bound = reconnect.max_backoff_s + 1.0
    print(f"coordinator down {down_s:.0f} s: the daemon joined {delay:.2f} s after it served "
          f"(reconnect.max_backoff_s = {reconnect.max_backoff_s} s{', channel backoff bounded' if with_fix else ''})")
    if delay > bound:
        print(f"SLOW: more than max_backoff_s + 1 s = {bound:.1f} s: gRPC's channel reconnect backoff decides")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("spool-leak")
    sub.add_parser("part-leak")
    sub.add_parser("status-writes")
    rb = sub.add_parser("reconnect-backoff")
    rb.add_argument("--down", type=float, default=30.0, help="seconds the coordinator stays down (default 30)")
    rb.add_argument("--with-fix", action="store_true", help="bound gRPC's reconnect backoff as the fix would")
    a = p.parse_args(argv)
    if a.what == "spool-leak":
        return spool_leak()
    if a.what == "part-leak":
        return part_leak()
    if a.what == "status-writes":
        return status_writes()
    return reconnect_backoff(a.down, a.with_fix)


if __name__ == "__main__":
    sys.exit(main())
