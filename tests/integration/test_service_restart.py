"""The federation run as services, as systemd runs them: `fedcollab coordinator serve`
and two `fedcollab institution run` processes with their default (service) behaviour,
over mutual TLS on loopback. The coordinator is restarted mid-round the way
`systemctl restart` does it (SIGTERM, then a fresh start); the study resumes the round
as a new attempt, both institutions re-send what they paid for, and every ledger ends
at exactly the planned epsilon. The services then stay up until they are stopped, and
exit 0 on SIGTERM."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcollab.pki import issue_ephemeral
from fedcollab.privacy._ledger import LedgerEntry, PrivacyLedger, ledger_path
from tests.chaos.harness import child_env, free_port, read_store
from tests.conftest import assert_spent_as_planned

pytestmark = pytest.mark.integration

ROUNDS, TARGET = 4, 4.0
# hospital-b trains on all of digits, hospital-a on a tenth (10 epochs: b takes seconds): while b trains round 2,
# a has already spent and sent, and the round is still open.
SITES = {"hospital-a": 'scheme = "iid"\nnum_partitions = 10\nindex = 0', "hospital-b": None}


def _toml(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\") + '"'


def _write(root: Path, port: int) -> tuple[Path, dict[str, Path]]:
    pki = issue_ephemeral(directory=root / "pki", federation="services", institutions=list(SITES))
    cert, key = pki.coordinator
    federation = root / "federation.toml"
    federation.write_text(f"""
[server]
address = "127.0.0.1:{port}"
state_dir = {_toml(root / "coordinator-state")}
chunk_bytes = 1024
heartbeat_interval_s = 0.25
lease_intervals = 12
max_poll_wait_s = 1.0
[server.tls]
ca_cert = {_toml(pki.ca_cert)}
cert = {_toml(cert)}
key = {_toml(key)}
crl = {_toml(pki.crl)}
[study]
name = "services"
rounds = {ROUNDS}
min_institutions = 2
round_timeout_s = 60
evaluation_timeout_s = 10
max_round_attempts = 5
[study.model]
kind = "mlp"
params = {{ in_features = 64, hidden = [16], num_classes = 10 }}
[study.train]
local_epochs = 10
batch_size = 32
learning_rate = 0.01
optimizer = "adam"
""", encoding="utf-8")
    sites = {}
    for name, partition in SITES.items():
        c, k = pki.institutions[name]
        path = root / f"{name}.toml"
        path.write_text(f"""
[institution]
name = "{name}"
coordinator = "127.0.0.1:{port}"
state_dir = {_toml(root / name)}
device = "cpu"
threads = 1
[data]
dataset = "digits"
val_fraction = 0.2
{"[data.partition]" + chr(10) + partition if partition else ""}
[privacy]
target_epsilon = {TARGET}
target_delta = 1e-5
accountant = "rdp"
grad_sample_mode = "hooks"
[reconnect]
initial_backoff_s = 0.1
max_backoff_s = 1.0
[tls]
ca_cert = {_toml(pki.ca_cert)}
cert = {_toml(c)}
key = {_toml(k)}
""", encoding="utf-8")
        sites[name] = path
    return federation, sites


def _start(args: list[str], *, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fedcollab", *args], cwd=cwd, env=child_env(),
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _wait_for(condition: object, *, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in logs if p.exists())
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tails}")
        time.sleep(0.01)


def _rows(path: Path) -> list[LedgerEntry]:
    if not path.is_file():
        return []
    try:
        with PrivacyLedger(path, readonly=True) as ledger:
            return ledger.entries()
    except Exception:  # being created by the daemon at this instant
        return []


def _rounds(store: Path) -> list[dict[str, object]]:
    if not store.is_file():
        return []
    try:
        return read_store(store).get("rounds", [])
    except sqlite3.Error:
        return []


def test_a_coordinator_restarted_mid_round_leaves_every_ledger_at_the_planned_epsilon(tmp_path: Path) -> None:
    port = free_port()
    federation, sites = _write(tmp_path, port)
    store = tmp_path / "coordinator-state" / "coordinator.sqlite"
    logs = [tmp_path / "coordinator.log", *(tmp_path / f"{n}.log" for n in sites)]
    serve = ["coordinator", "serve", "--config", str(federation)]  # as the shipped unit runs it
    coordinator = _start(serve, cwd=tmp_path, log=logs[0])
    institutions = [_start(["institution", "run", "--config", str(p)], cwd=tmp_path, log=tmp_path / f"{n}.log")
                    for n, p in sites.items()]
    ledger_a = ledger_path(tmp_path / "hospital-a")
    try:
        _wait_for(lambda: any(e.round == 2 for e in _rows(ledger_a)), timeout=120,
                  what="hospital-a to spend round 2", logs=logs)
        open_at_restart = not any(r["round"] == 2 and r["status"] == "committed" for r in _rounds(store))
        coordinator.send_signal(signal.SIGTERM)  # systemctl restart: stop...
        assert coordinator.wait(timeout=60) == 0, logs[0].read_text()[-3000:]
        coordinator = _start(serve, cwd=tmp_path, log=logs[0])  # ...and start again
        _wait_for(lambda: sum(r["status"] == "committed" for r in _rounds(store)) == ROUNDS, timeout=180,
                  what=f"{ROUNDS} committed rounds", logs=logs)
        time.sleep(2.0)  # services: nobody exits once the study is over
        assert coordinator.poll() is None and all(p.poll() is None for p in institutions), \
            [p.poll() for p in [coordinator, *institutions]]
    finally:
        for p in [*institutions, coordinator]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in [*institutions, coordinator]]
    assert codes == [0, 0, 0], "\n".join(p.read_text(errors="replace")[-2000:] for p in logs)
    rounds = _rounds(store)
    assert [r["round"] for r in rounds if r["status"] == "committed"] == list(range(1, ROUNDS + 1))
    if open_at_restart:
        assert max(int(r["attempt"]) for r in rounds if r["round"] == 2) >= 2, rounds  # resumed as a new attempt
    assert_spent_as_planned({name: _rows(ledger_path(tmp_path / name)) for name in sites}, rounds=ROUNDS,
                            target=TARGET)
