"""One coordinator per address and per state folder, one institution daemon per state
folder, and a start that fails leaves its state folder as it found it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from fedcollab.config import FederationConfig, InstitutionConfig, InstitutionInfo, ModelConfig, ReconnectConfig
from fedcollab.coordinator import Coordinator
from fedcollab.errors import ConfigError, FedcollabError, InUseError
from fedcollab.institution._agent import InstitutionAgent
from tests.conftest import tiny_federation
from tests.integration._tls_files import coordinator_tls, institution_tls

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _server(config: FederationConfig, **changes: Any) -> FederationConfig:
    return config.model_copy(update={"server": config.server.model_copy(update=changes)})


def _contents(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_a_second_coordinator_on_a_taken_port_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    with Coordinator(config=tiny_federation(tmp_path / "first")) as first:
        second = _server(tiny_federation(tmp_path / "second"), address=f"127.0.0.1:{first.port}")
        with pytest.raises(InUseError) as err:
            Coordinator(config=second)
        message = str(err.value)
        assert message.startswith(f"server.address: cannot listen on 127.0.0.1:{first.port}: the port is in use")
        assert "change server.address" in message
        assert not (tmp_path / "second").exists()  # refused before the state folder was made
    # Its port is free again once the first has stopped, and the second can have it.
    with Coordinator(config=second) as again:
        assert again.port == first.port


def test_a_port_another_program_holds_is_refused(tmp_path: Path) -> None:
    """Not only another coordinator: any listener (gRPC's SO_REUSEPORT is off, so it is
    not shared), and the dashboard's port too."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        for changes, key in (({"address": f"127.0.0.1:{port}"}, "server.address"),
                             ({"http_address": f"127.0.0.1:{port}"}, "server.http_address")):
            state = tmp_path / key
            with pytest.raises(InUseError, match=f"^{key}: cannot listen on 127.0.0.1:{port}: the port is in use"):
                Coordinator(config=_server(tiny_federation(state), **changes))
            assert not state.exists(), _contents(state)


def test_an_address_of_another_machine_is_a_config_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(ConfigError, match=r"^server.address: cannot listen on 192.0.2.1:0: 192.0.2.1 is not an "
                                          r"address of this machine"):
        Coordinator(config=_server(tiny_federation(state), address="192.0.2.1:0"))  # TEST-NET-1: nobody's
    assert not state.exists()


def test_a_second_coordinator_on_one_state_folder_is_refused_until_the_first_stops(tmp_path: Path) -> None:
    config = tiny_federation(tmp_path / "state")
    first = Coordinator(config=config)
    first.start()
    try:
        with pytest.raises(InUseError) as err:
            Coordinator(config=config)
        message = str(err.value)
        assert message.startswith(f"server.state_dir: {tmp_path / 'state'} is in use by a coordinator (this very "
                                  f"process"), message
        assert "give this one its own server.state_dir" in message
    finally:
        first.stop()
    restarted = Coordinator(config=config)  # stop() released it: a restart in the same process opens it
    restarted.close()
    again = Coordinator(config=config)  # and so did close(), for one never started
    again.close()


def test_the_holder_is_named_and_its_lock_dies_with_it(tmp_path: Path) -> None:
    """The lock is flock(2): another process holding it is named by pid, and kill -9
    of that process leaves no stale lock behind."""
    state = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom fedcollab._state_lock import StateLock\n"
         "lock = StateLock.acquire(sys.argv[1], key='server.state_dir', role='coordinator')\n"
         "print('locked', flush=True)\ntime.sleep(120)\n", str(state)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(InUseError, match=rf"is in use by a coordinator \(pid {holder.pid} on "
                                             rf"{socket.gethostname()}, `-c {state}`, since "):
            Coordinator(config=tiny_federation(state))
        assert _contents(state) == [".lock"]  # the refused start wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with Coordinator(config=tiny_federation(state)) as coordinator:
        assert coordinator.port


def _agent(state: Path) -> InstitutionAgent:
    config = InstitutionConfig(
        # Port 1: nothing listens, so the agent keeps retrying until it is stopped.
        institution=InstitutionInfo(name="hospital-a", coordinator="127.0.0.1:1", state_dir=state,
                                    trainer="synthetic"),
        reconnect=ReconnectConfig(initial_backoff_s=0.05, max_backoff_s=0.2))
    return InstitutionAgent(config=config, list_every_s=0.05)


def test_a_second_institution_daemon_on_one_state_folder_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "hospital-a"
    stop = threading.Event()
    first = _agent(state)
    ran: list[bool] = []
    thread = threading.Thread(target=lambda: ran.append(first.run(stop=stop)), daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if (state / ".lock").exists():
                break
            stop.wait(0.01)
        with pytest.raises(InUseError, match=rf"^institution.state_dir: {state} is in use by an institution daemon "
                                             r"\(this very process"):
            _agent(state).run(stop=threading.Event())
    finally:
        stop.set()
        thread.join(timeout=30)
    assert ran == [False]  # stopped, not refused
    first.close()
    # It wrote nothing there, so it leaves no folder behind; the next one takes it.
    assert not state.exists(), _contents(state)
    done = threading.Event()
    done.set()
    assert _agent(state).run(stop=done) is False


def _garbage(path: Path) -> Path:
    path.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    return path


BAD_STARTS = [
    pytest.param(lambda tls, tmp: {"cert": _garbage(tmp / "garbage.pem")}, ConfigError,
                 "server.tls.cert: .* holds no PEM certificate", id="garbage certificate"),
    pytest.param(lambda tls, tmp: {"cert": tmp / "missing.pem"}, ConfigError,
                 "server.tls.cert: cannot read .*missing.pem", id="missing certificate"),
    pytest.param(lambda tls, tmp: {"key": tmp / "missing.key"}, ConfigError,
                 "server.tls.key: cannot read", id="missing key"),
    pytest.param(lambda tls, tmp: {"key": tls.cert}, ConfigError,
                 "server.tls.key: .* is not a PEM private key", id="certificate as key"),
    pytest.param(lambda tls, tmp: {"ca_cert": _garbage(tmp / "ca-garbage.pem")}, ConfigError,
                 "server.tls.ca_cert: .* holds no PEM certificate", id="garbage CA"),
]


@pytest.mark.parametrize("change, error, match", BAD_STARTS)
def test_bad_tls_files_refuse_the_start_before_anything_is_written(test_ca: Any, tmp_path: Path, change: Any,
                                                                    error: type, match: str) -> None:
    state = tmp_path / "state"
    config = coordinator_tls(test_ca, tmp_path / "pki", tiny_federation(state))
    tls = config.server.tls
    assert tls is not None
    config = _server(config, tls=tls.model_copy(update=change(tls, tmp_path)))
    with pytest.raises(error, match=match):
        Coordinator(config=config)
    assert not state.exists(), _contents(state)  # no lineage key, no v0 model, no store


def test_an_institution_with_unusable_tls_files_is_refused_at_start(test_ca: Any, tmp_path: Path) -> None:
    good = institution_tls(test_ca, tmp_path / "pki", _agent(tmp_path / "state").config)
    assert good.tls is not None
    InstitutionAgent(config=good)  # the files as issued pass
    for change, match in [({"ca_cert": _garbage(tmp_path / "ca.pem")}, "tls.ca_cert: .* holds no PEM certificate"),
                          ({"key": good.tls.cert}, "tls.key: .* is not a PEM private key"),
                          ({"cert": tmp_path / "missing.pem"}, "tls.cert: cannot read")]:
        with pytest.raises(ConfigError, match=match):
            InstitutionAgent(config=good.model_copy(update={"tls": good.tls.model_copy(update=change)}))
    assert not (tmp_path / "state").exists()


def test_a_key_that_is_not_the_certificates_is_refused(test_ca: Any, tmp_path: Path) -> None:
    config = coordinator_tls(test_ca, tmp_path / "pki", tiny_federation(tmp_path / "state"))
    other = coordinator_tls(test_ca, tmp_path / "other", tiny_federation(tmp_path / "state"))
    assert config.server.tls is not None and other.server.tls is not None
    config = _server(config, tls=config.server.tls.model_copy(update={"key": other.server.tls.key}))
    with pytest.raises(ConfigError, match="server.tls.key: .* is not the key of the certificate"):
        Coordinator(config=config)
    assert not (tmp_path / "state").exists()
    # The files as issued start it (the checks refuse only what is wrong).
    good = coordinator_tls(test_ca, tmp_path / "pki", tiny_federation(tmp_path / "state"))
    with Coordinator(config=good) as coordinator:
        assert coordinator.port


def test_a_start_failing_after_the_checks_empties_a_new_folder_and_keeps_an_old_one(tmp_path: Path) -> None:
    """A model that does not build fails only once the state is being opened: in a
    folder that was new, what was written by then is removed again; a folder that held
    state keeps every file."""
    # Config loading refuses an unknown kind; built around it, it fails when the store's v0 is made.
    broken = {"model": ModelConfig.model_construct(kind="no-such-model", params={}), "central_evaluation": None}
    new = tmp_path / "new"
    with pytest.raises(ConfigError):
        Coordinator(config=tiny_federation(new, **broken))
    assert not new.exists(), _contents(new)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError):
        Coordinator(config=tiny_federation(empty, **broken))
    assert _contents(empty) == []  # made by the operator: kept, empty

    old = tmp_path / "old"
    Coordinator(config=tiny_federation(old)).close()
    (old / "lineage-signing-key.pem").write_text("not a key\n")  # fails as the state is opened
    before = {p: (old / p).read_bytes() for p in _contents(old) if (old / p).is_file()}
    assert "coordinator.sqlite" in before and any(p.startswith("models/v000000") for p in before), sorted(before)
    with pytest.raises(FedcollabError, match="cannot load the lineage signing key"):
        Coordinator(config=tiny_federation(old))
    assert {p: (old / p).read_bytes() for p in _contents(old) if (old / p).is_file()} == before


def test_the_command_line_says_the_port_is_taken(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = tmp_path / "federation.toml"
        config.write_text(f'[server]\naddress = "127.0.0.1:{port}"\nstate_dir = "state"\n'
                          '[study.model]\nkind = "mlp"\n')
        done = subprocess.run([sys.executable, "-m", "fedcollab", "coordinator", "serve", "--config", str(config),
                               "--insecure"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"server.address: cannot listen on 127.0.0.1:{port}: the port is in use" in done.stdout, done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "state").exists()
