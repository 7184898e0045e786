"""The coordinator fuzz target (fuzz/fuzz_coordinator.py) runs without atheris: its
seeds and a few hundred random inputs go through one_input() in a few seconds, and
none is a finding."""

from __future__ import annotations

import importlib.util
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"


@pytest.fixture(scope="module")
def harness() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("fuzz_coordinator", FUZZ / "fuzz_coordinator.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.HEARTBEAT_S = 1.0  # leases of 2 s: the seeds' honest sessions survive a busy machine
    try:
        yield module
    finally:
        module.shutdown()
        sys.modules.pop(spec.name, None)


def test_seeds_are_accepted_requests(harness: ModuleType) -> None:
    seeds = sorted((FUZZ / "seeds").iterdir())
    assert seeds
    for seed in seeds:
        harness.one_input(seed.read_bytes())
    # The structured seeds take the right value everywhere: a valid upload is accepted.
    assert harness.stats["UploadUpdate:OK"] >= 1
    assert harness.stats["Heartbeat:OK"] >= 1


def test_random_inputs(harness: ModuleType) -> None:
    rng = random.Random(20241124)
    for _ in range(200):
        harness.one_input(rng.randbytes(rng.randint(0, 400)))
    assert harness.stats["inputs"] >= 200


def test_secure_aggregation_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    """FUZZ_SECAGG=1: a study under secure aggregation, the honest institutions walking
    every stage (consistency round included) while random SecAggPoll/SecAggSubmit
    inputs hit them; rounds still commit and no input is a finding."""
    monkeypatch.setenv("FUZZ_SECAGG", "1")
    spec = importlib.util.spec_from_file_location("fuzz_coordinator_secagg", FUZZ / "fuzz_coordinator.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.HEARTBEAT_S = 1.0
    try:
        e = module.env()
        rng = random.Random(20261201)
        secagg = [module.RPCS.index("SecAggPoll"), module.RPCS.index("SecAggSubmit")]
        for seed in sorted((FUZZ / "seeds").iterdir()):
            module.one_input(seed.read_bytes())
        for i in range(300):
            if i % 3 == 0:
                module.one_input(rng.randbytes(rng.randint(0, 300)))
            else:  # structured, right session/round/nonce (zeros pick them), then random payload choices
                body = bytes([secagg[i % 2], 0]) + bytes(rng.randint(4, 10)) + rng.randbytes(rng.randint(0, 60))
                module.one_input(body)
        import time

        deadline = time.monotonic() + 30
        while e.engine.current_model.version < 2 and time.monotonic() < deadline:
            module.one_input(bytes([secagg[0]]))  # keep the invariants checked while rounds go on
            time.sleep(0.05)
        assert e.walk is not None and e.walk.rounds_walked >= 2
        assert e.engine.current_model.version >= 2, "secure-aggregation rounds should commit between inputs"
        reasons = {k for k in module.stats if k.startswith("SecAgg")}
        assert any(k.startswith("SecAggSubmit:SECAGG_") for k in reasons), reasons
    finally:
        module.shutdown()
        sys.modules.pop(spec.name, None)
