"""Institution-owned DP over real gRPC: ledgers, reported spend, refusals past the
budget, and a crash between recording the spend and sending the update."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fedcollab.config import InstitutionConfig, PrivacyConfig
from fedcollab.coordinator import Coordinator
from fedcollab.institution import InstitutionDaemon, daemon_from_config
from fedcollab.privacy._ledger import PrivacyLedger, ledger_path
from tests.conftest import institution_config, running, tiny_federation, wait_until

pytestmark = pytest.mark.integration

NAMES = ["hospital-a", "hospital-b", "lab-c"]


def _private(name: str, i: int, *, port: int, root: Path, epsilon: float = 5.0, **privacy: object) -> InstitutionConfig:
    base = institution_config(name, address=f"127.0.0.1:{port}", index=i, parts=3, state_root=root)
    settings: dict[str, object] = {"target_epsilon": epsilon, "target_delta": 1e-5, "accountant": "rdp",
                                   "grad_sample_mode": "hooks"}
    settings.update(privacy)
    return base.model_copy(update={"privacy": PrivacyConfig(**settings)})


def _daemon(config: InstitutionConfig) -> InstitutionDaemon:
    d = daemon_from_config(config)
    d._poll_wait = 1.0  # the tiny federation's rounds are short
    return d


def test_spend_is_recorded_in_each_ledger_and_reported_to_the_coordinator(tmp_path: Path) -> None:
    config = tiny_federation(tmp_path / "coordinator")
    with Coordinator(config=config) as coordinator:
        configs = [_private(n, i, port=coordinator.port, root=tmp_path,
                            grad_sample_mode="auto" if i == 0 else "hooks") for i, n in enumerate(NAMES)]
        daemons = [_daemon(c) for c in configs]
        with running(daemons) as outcome:
            assert coordinator.wait(timeout=120), "study did not finish"
            wait_until(lambda: len(outcome) == 3, timeout=20, what="daemons to finish")
        reported = {(p["round"], p["institution"]): p for p in coordinator.store.privacy_spend()}
        uploads = {(p["round"], p["institution"]): p["update_sha256"] for p in coordinator.store.participations()}
    assert daemons[0]._trainer.last_mode in ("hooks", "ghost", "functorch")  # measured, not assumed
    for d in daemons:
        assert d.privacy is not None
        entries = d.privacy.ledger.entries(study="tiny")
        assert [e.round for e in entries] == [1, 2, 3]
        assert [e.epsilon for e in entries] == sorted(e.epsilon for e in entries)
        assert 0 < entries[-1].epsilon <= 5.0
        assert d.privacy.ledger.verify().ok
        for e in entries:
            # The coordinator holds what the institution declared, for what it sent.
            assert reported[(e.round, d.name)]["epsilon"] == e.epsilon
            assert reported[(e.round, d.name)]["noise_multiplier"] == e.noise_multiplier
            assert uploads[(e.round, d.name)] == e.update_sha256


def test_an_institution_past_its_budget_declines_and_the_study_goes_on(tmp_path: Path) -> None:
    # Round 1 waits for all three, so lab-c is asked (and declines) in round 1.
    config = tiny_federation(tmp_path / "coordinator", min_institutions=2, min_available_institutions=3)
    with Coordinator(config=config) as coordinator:
        configs = [_private(n, i, port=coordinator.port, root=tmp_path) for i, n in enumerate(NAMES)]
        # lab-c already spent nearly all of its budget in this study (an earlier run).
        with PrivacyLedger(ledger_path(configs[2].institution.state_dir)) as ledger:
            ledger.append(study="tiny", dataset="builtin:digits", round=1, nonce="earlier", epsilon=4.99,
                          site_epsilon=4.99, delta=1e-5, noise_multiplier=1.0, sample_rate=0.5, steps=100,
                          accountant="rdp", history=[[1.0, 0.5, 100]], budget_epsilon=5.0, site_budget_epsilon=5.0)
        daemons = [_daemon(c) for c in configs]
        with running(daemons) as outcome:
            assert coordinator.wait(timeout=120), "study did not finish"
            wait_until(lambda: len(outcome) == 3, timeout=20, what="daemons to finish")
        rounds = [r for r in coordinator.store.rounds() if r["status"] == "committed"]
        lab = [p for p in coordinator.store.participations() if p["institution"] == "lab-c"]
        history = [(p["round"], p["attempt"], p["institution"], p["status"], p["reason"])
                   for p in coordinator.store.participations()]
    assert [r["round"] for r in rounds] == [1, 2, 3], history
    assert all(r["metrics"]["num_updates"] == 2 for r in rounds)
    # Declined once, with the reason and its spend; never selected again in this study.
    assert [(p["round"], p["status"]) for p in lab] == [(1, "declined")]
    assert lab[0]["reason"].startswith("BUDGET_EXHAUSTED")
    assert lab[0]["privacy"]["epsilon"] == 4.99 and lab[0]["privacy"]["budget_epsilon"] == 5.0
    entries = daemons[2].privacy.ledger.entries()  # type: ignore[union-attr]
    assert [e.nonce for e in entries] == ["earlier"]  # a refusal spends nothing


class _Crash(BaseException):
    """Stands in for kill -9 between the ledger write and the upload."""


def test_a_crash_between_spend_and_upload_neither_loses_nor_double_counts(tmp_path: Path) -> None:
    config = tiny_federation(tmp_path / "coordinator", rounds=2)
    with Coordinator(config=config) as coordinator:
        configs = [_private(n, i, port=coordinator.port, root=tmp_path) for i, n in enumerate(NAMES)]
        victim = _daemon(configs[0])

        def crash(**_: object) -> None:
            raise _Crash

        victim._client.upload = crash  # type: ignore[method-assign]
        crashed = threading.Event()

        def run_victim() -> None:
            try:
                victim.run(stop=threading.Event())
            except _Crash:
                crashed.set()

        threading.Thread(target=run_victim, daemon=True).start()
        with running([_daemon(c) for c in configs[1:]]) as outcome:
            assert crashed.wait(60), "the victim should reach its upload"
            spent_at_crash = victim.privacy.ledger.entries()  # type: ignore[union-attr]
            assert [e.round for e in spent_at_crash] == [1]  # recorded before anything left
            victim.privacy.ledger.close()  # type: ignore[union-attr]
            restarted = _daemon(configs[0])  # same state folder: same ledger, same kept update
            with running([restarted]) as outcome_restarted:
                assert coordinator.wait(timeout=120), "study did not finish"
                wait_until(lambda: len(outcome) == 2 and len(outcome_restarted) == 1, timeout=20,
                           what="daemons to finish")
        uploads = {(p["round"], p["institution"]): p["update_sha256"] for p in coordinator.store.participations()}
    entries = restarted.privacy.ledger.entries()  # type: ignore[union-attr]
    assert [e.round for e in entries] == [1, 2], "one spend per round: the crash neither lost nor doubled one"
    assert entries[0] == spent_at_crash[0]
    assert uploads[(1, "hospital-a")] == entries[0].update_sha256  # the update paid for is the one sent
    assert uploads[(2, "hospital-a")] == entries[1].update_sha256
    assert not any((Path(configs[0].institution.state_dir) / "pending-updates").iterdir())
