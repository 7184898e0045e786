"""`fedcollab lineage verify RUN_DIR`: intact, broken, pinned, and not a state at all."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fedcollab import cli
from fedcollab.coordinator import Coordinator
from fedcollab.lineage import PUBLIC_KEY_FILE, key_fingerprint, load_or_create_signing_key, load_public_key
from tests.conftest import institution_config, recording_daemon, running, tiny_federation, wait_until

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.console, "_width", 300)  # messages must not wrap in the assertions


def verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["lineage", "verify", *args])
    return int(exit_.value.code or 0), capsys.readouterr().out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `fedcollab simulate` leaves it: the coordinator's state in coordinator/."""
    run = tmp_path_factory.mktemp("run")
    names = ["hospital-a", "hospital-b", "lab-c"]
    with Coordinator(config=tiny_federation(run / "coordinator", rounds=2)) as coordinator:
        daemons = [recording_daemon(institution_config(n, address=coordinator.address, index=i, parts=3,
                                                       state_root=run / "institutions"))[0]
                   for i, n in enumerate(names)]
        with running(daemons) as outcome:
            assert coordinator.wait(timeout=60), "study did not finish"
            wait_until(lambda: len(outcome) == len(names), timeout=20, what="daemons to see the study finish")
    return run


@pytest.fixture
def copy(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir / "coordinator", tmp_path / "coordinator")
    return tmp_path / "coordinator"


def test_an_intact_chain_exits_0_and_names_the_key(capsys: pytest.CaptureFixture[str], run_dir: Path) -> None:
    fingerprint = key_fingerprint(load_public_key(run_dir / "coordinator" / PUBLIC_KEY_FILE))
    for where in (run_dir, run_dir / "coordinator"):
        code, out = verify(capsys, str(where))
        assert code == 0, out
        assert out.strip() == f"lineage intact: v0..v2, signed by {fingerprint}"
    code, out = verify(capsys, str(run_dir), "--public-key", str(run_dir / "coordinator" / PUBLIC_KEY_FILE))
    assert code == 0, out


def test_the_key_fingerprint_is_printed_whole_in_a_narrow_terminal(
        capsys: pytest.CaptureFixture[str], run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator compares it with the one the coordinator's operator read out: one
    line, never cut at 60 or 80 columns (the terminal wraps it, a copy has it whole)."""
    fingerprint = key_fingerprint(load_public_key(run_dir / "coordinator" / PUBLIC_KEY_FILE))
    monkeypatch.setattr(cli.console, "_width", 60)
    code, out = verify(capsys, str(run_dir))
    assert code == 0 and out == f"lineage intact: v0..v2, signed by {fingerprint}\n", out



def test_a_changed_model_exits_1_naming_the_version(capsys: pytest.CaptureFixture[str], copy: Path) -> None:
    path = sorted((copy / "models").glob("v000001-*.safetensors"))[0]
    path.write_bytes(path.read_bytes() + b"\0")
    code, out = verify(capsys, str(copy))
    assert code == 1
    assert out.startswith("lineage broken at v1: v1: model file changed: its SHA-256 is "), out


def test_an_edited_record_exits_1_naming_the_version(capsys: pytest.CaptureFixture[str], copy: Path) -> None:
    db = sqlite3.connect(copy / "coordinator.sqlite")
    with db:
        (record,) = db.execute("SELECT record FROM lineage WHERE version=2").fetchone()
        db.execute("UPDATE lineage SET record=? WHERE version=2", (record.replace(b'"fedavg"', b'"krum"'),))
    db.close()
    code, out = verify(capsys, str(copy))
    assert code == 1
    assert out.splitlines()[0] == ("lineage broken at v2: v2: signature does not verify (record edited, or signed "
                                   "by another key?)")
    assert "also v2: lineage/v000002.json differs from the signed record in coordinator.sqlite" in out


def test_another_pinned_key_exits_1(capsys: pytest.CaptureFixture[str], run_dir: Path, tmp_path: Path) -> None:
    load_or_create_signing_key(tmp_path)
    code, out = verify(capsys, str(run_dir), "--public-key", str(tmp_path / PUBLIC_KEY_FILE))
    assert code == 1
    assert "warning: lineage-public-key.pem in the state is ed25519:" in out
    assert "lineage broken at v0: v0: signature does not verify" in out


def test_json_report(capsys: pytest.CaptureFixture[str], run_dir: Path) -> None:
    code, out = verify(capsys, str(run_dir), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True and report["versions"] == [0, 1, 2] and report["first_broken_version"] is None


def test_a_folder_without_state_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out = verify(capsys, str(tmp_path))
    assert code == 1
    assert "no coordinator state here" in out


def test_the_installed_command(run_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "fedcollab", "lineage", "verify", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lineage intact: v0..v2, signed by ed25519:" in done.stdout
