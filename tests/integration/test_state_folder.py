"""A coordinator's state folder can be moved or copied (backups, new disks) and the
coordinator resumes from it with every model and its signed lineage intact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedcollab.coordinator import Coordinator
from fedcollab.lineage import verify_chain
from tests.conftest import institution_config, recording_daemon, running, tiny_federation, wait_until

pytestmark = pytest.mark.integration


def test_a_moved_state_folder_keeps_its_models_and_resumes(tmp_path: Path) -> None:
    names = ["hospital-a", "hospital-b", "lab-c"]
    config = tiny_federation(tmp_path / "before", rounds=2)
    with Coordinator(config=config) as coordinator:
        daemons = [recording_daemon(institution_config(n, address=f"127.0.0.1:{coordinator.port}", index=i, parts=3,
                                                       state_root=tmp_path))[0] for i, n in enumerate(names)]
        with running(daemons) as outcome:
            assert coordinator.wait(timeout=90)
            wait_until(lambda: len(outcome) == 3, timeout=20, what="daemons to finish")
    moved = tmp_path / "after"
    shutil.move(str(tmp_path / "before"), str(moved))
    resumed = Coordinator(config=tiny_federation(moved, rounds=3))
    try:
        assert resumed.engine.current_model.version == 2
        assert resumed.engine.current_model.path.is_file()
        assert sorted(p.name[:7] for p in (moved / "models").glob("*.safetensors")) == ["v000000", "v000001",
                                                                                     "v000002"]
    finally:
        resumed.close()
    report = verify_chain(moved)
    assert report.ok, report.problem


def test_spools_left_by_a_killed_coordinator_are_removed_at_start(tmp_path: Path) -> None:
    """A coordinator killed mid-upload leaves the upload's spool; no round is in flight
    after a restart, so it is removed then (the crash-resume harness found it left)."""
    spool = tmp_path / "c" / "spool"
    spool.mkdir(parents=True)
    (spool / "r1-a1-hospital-a.upload").write_bytes(b"\0" * 4096)
    with Coordinator(config=tiny_federation(tmp_path / "c")):
        assert not list(spool.glob("*.upload"))
