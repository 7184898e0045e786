"""The coordinator's store: a read-only look leaves a serving coordinator's round
open; the coordinator's own start marks a round a crash left open as abandoned."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from fedcollab.coordinator import Store
from fedcollab.institution._daemon import evict_cache


def _state_with_an_open_round(tmp_path: Path) -> Path:
    db = tmp_path / "coordinator.sqlite"
    store = Store(db)
    store.open_round(round_number=1, attempt=1, base_version=0, participants=["a", "b"])
    store.close()
    return db


def test_a_read_only_store_leaves_the_open_round_open_and_writes_nothing(tmp_path: Path) -> None:
    db = _state_with_an_open_round(tmp_path)
    before = db.read_bytes()
    store = Store(db, read_only=True)
    assert [r["status"] for r in store.rounds()] == ["open"]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.open_round(round_number=2, attempt=1, base_version=0, participants=["a"])
    store.close()
    assert db.read_bytes() == before


def test_the_coordinators_own_store_abandons_a_round_left_open(tmp_path: Path) -> None:
    db = _state_with_an_open_round(tmp_path)
    store = Store(db)
    [r] = store.rounds()
    assert (r["status"], r["reason"]) == ("abandoned", "coordinator stopped")
    store.close()


def test_cache_eviction_keeps_two_versions_and_drops_partial_downloads(tmp_path: Path) -> None:
    now = time.time()
    for i, name in enumerate(["v1", "v2", "v3"]):
        f = tmp_path / f"{name}.safetensors"
        f.write_bytes(b"x")
        os.utime(f, (now + i, now + i))
    (tmp_path / "v0.part").write_bytes(b"half")
    evict_cache(tmp_path, keep=tmp_path / "v3.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v2.safetensors", "v3.safetensors"]
