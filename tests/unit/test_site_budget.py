"""The budget is the site's, per dataset: every study on the same data composes into
one accountant history checked against privacy.budget_epsilon; policy.budgets are
sub-limits inside it; a race between two studies cannot overspend; older per-study
ledgers are migrated into the site's, or refused with how to fix them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from fedcollab.config import DataConfig, PrivacyConfig
from fedcollab.privacy import BudgetExhausted, InstitutionPrivacy, compose, epsilon_of
from fedcollab.privacy._budget import composed_epsilon
from fedcollab.privacy._dataset import dataset_key
from fedcollab.privacy._ledger import (
    FORMAT_V1,
    GENESIS_HASH,
    LedgerConflict,
    LedgerError,
    OverLimit,
    PrivacyLedger,
    canonical_json,
    ledger_path,
    row_hash,
)
from fedcollab.privacy._ledger_migrate import V1_FILENAME, open_site_ledger

N, BATCH = 300, 60  # rate 0.2, 5 steps per epoch
# The composition here is the accountant's business, whichever it is; GDP answers in
# milliseconds where RDP and PRV take a good part of a second per figure.
ACCOUNTANT = "gdp"
pytestmark = pytest.mark.filterwarnings("ignore:GDP accounting is experimental")


def _privacy(ledger: PrivacyLedger, *, dataset: str = "builtin:digits", budgets: dict[str, float] | None = None,
             budget: float = 3.0) -> InstitutionPrivacy:
    config = PrivacyConfig(target_epsilon=min(3.0, budget), budget_epsilon=budget, target_delta=1e-5,
                           accountant=ACCOUNTANT)
    return InstitutionPrivacy(config=config, ledger=ledger, num_examples=N, dataset=dataset, study_budgets=budgets)


def _round(p: InstitutionPrivacy, study: str, r: int, *, rounds: int = 5) -> float:
    rp = p.plan(study=study, total_rounds=rounds, round_number=r, nonce=f"{study}-{r}", epochs=1, batch_size=BATCH)
    return p.record(rp, update_sha256="ab" * 32).site_epsilon


def _spend_until_refused(p: InstitutionPrivacy, study: str) -> int:
    for r in range(1, 50):
        try:
            _round(p, study, r)
        except BudgetExhausted:
            return r - 1
    raise AssertionError("never refused")


def test_copies_of_a_study_under_new_names_share_one_budget(tmp_path: Path) -> None:
    """The attack of issue 16: the same study offered as three names. Together they
    spend at most the site's budget, not three of them."""
    with PrivacyLedger(ledger_path(tmp_path)) as ledger:
        p = _privacy(ledger)
        done = {name: _spend_until_refused(p, name) for name in ("study", "study-copy-1", "study-copy-2")}
        rows = ledger.entries()
        assert done["study"] == 5 and done["study-copy-1"] + done["study-copy-2"] <= 1, done
        history: list[tuple[float, float, int]] = []
        for e in rows:
            history = compose(history, noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps)
        site = composed_epsilon(history=history, delta=1e-5, accountant=ACCOUNTANT)
        assert site <= 3.0 * (1 + 1e-9)
        assert rows[-1].site_epsilon == pytest.approx(site)
        assert all(e.site_epsilon >= e.epsilon for e in rows)
        assert {e.dataset for e in rows} == {"builtin:digits"}


def test_a_study_sub_limit_holds_inside_the_site_budget(tmp_path: Path) -> None:
    with PrivacyLedger(ledger_path(tmp_path)) as ledger:
        p = _privacy(ledger, budgets={"small": 1.0})
        assert p.study_limit("small") == 1.0 and p.study_limit("other") == 3.0
        _spend_until_refused(p, "small")
        small = ledger.latest(study="small")
        assert small is not None and small.epsilon <= 1.0 and small.budget_epsilon == 1.0
        with pytest.raises(BudgetExhausted, match="past this study's limit of 1 \\(policy.budgets"):
            _round(p, "small", 99)
        # Another study still has the rest of the site's budget, and no more.
        _spend_until_refused(p, "other")
        assert ledger.latest(study=None, dataset="builtin:digits").site_epsilon <= 3.0  # type: ignore[union-attr]
        assert ledger.spent(study="other") < 3.0  # what "small" spent counts against it


def test_another_dataset_has_a_budget_of_its_own(tmp_path: Path) -> None:
    with PrivacyLedger(ledger_path(tmp_path)) as ledger:
        _spend_until_refused(_privacy(ledger, dataset="id:ward-7"), "s")
        fresh = _privacy(ledger, dataset="id:ward-8")
        assert fresh.site_spent() == 0.0
        assert _round(fresh, "s", 1) > 0


def test_a_round_recorded_meanwhile_by_another_study_is_counted_before_this_one_is(tmp_path: Path) -> None:
    """Two studies' daemons plan at the same time from the same spend: the second to
    record computes again and is refused when the first took the rest of the budget."""
    with PrivacyLedger(ledger_path(tmp_path)) as ledger:
        p = _privacy(ledger)
        for r in range(1, 5):
            _round(p, "a", r)
        plans = [p.plan(study=s, total_rounds=5, round_number=5, nonce=f"{s}-5", epochs=1, batch_size=BATCH)
                 for s in ("a", "b")]
        p.record(plans[0], update_sha256="ab" * 32)
        with pytest.raises(LedgerConflict):  # the ledger itself refuses figures from a stale snapshot
            ledger.append(study="b", dataset="builtin:digits", round=5, nonce="b-5", epsilon=0.1, site_epsilon=3.0,
                          delta=1e-5, noise_multiplier=1.0, sample_rate=0.2, steps=5, accountant=ACCOUNTANT,
                          history=[], budget_epsilon=3.0, site_budget_epsilon=3.0, based_on=plans[1].based_on)
        with pytest.raises(BudgetExhausted, match="past this institution's budget"):
            p.record(plans[1], update_sha256="cd" * 32)
        assert [e.study for e in ledger.entries()] == ["a"] * 5


def test_the_ledger_never_records_a_spend_past_a_limit(tmp_path: Path) -> None:
    with PrivacyLedger(ledger_path(tmp_path)) as ledger:
        args = {"study": "s", "dataset": "d", "round": 1, "nonce": "n", "delta": 1e-5, "noise_multiplier": 1.0,
                "sample_rate": 0.2, "steps": 5, "accountant": "rdp", "history": [], "budget_epsilon": 1.0,
                "site_budget_epsilon": 3.0}
        with pytest.raises(OverLimit, match="past the site's budget"):
            ledger.append(**args, epsilon=0.5, site_epsilon=3.5)
        with pytest.raises(OverLimit, match="past the limit of study 's'"):
            ledger.append(**args, epsilon=1.5, site_epsilon=2.0)
        ledger.append(**args, epsilon=0.5, site_epsilon=2.0)
        with pytest.raises(LedgerError, match="the site's spend never decreases"):
            ledger.append(**{**args, "study": "t"}, epsilon=0.5, site_epsilon=1.0)


def test_the_dataset_key_comes_from_the_site_config_only(tmp_path: Path) -> None:
    assert dataset_key(DataConfig(dataset="digits")) == "builtin:digits"
    # Seeds, fractions and partitions pick overlapping records: no fresh budget for an edit.
    assert dataset_key(DataConfig(dataset="digits", seed=7, val_fraction=0.3,
                                  partition={"num_partitions": 3, "index": 1})) == "builtin:digits"
    npz = DataConfig(dataset="npz", path=tmp_path / "sub" / ".." / "x.npz")
    assert dataset_key(npz) == f"npz:{(tmp_path / 'x.npz').resolve()}"
    assert dataset_key(DataConfig(dataset="npz", path=tmp_path / "x.npz", id="ward-7")) == "id:ward-7"


# ----------------------------------------------------------------- migration
_V1_COLUMNS = ("seq", "created_at", "study", "round", "nonce", "epsilon", "delta", "noise_multiplier",
               "sample_rate", "steps", "accountant", "accountant_state", "budget_epsilon", "update_sha256",
               "prev_hash", "hash")


def _v1_ledger(path: Path, study: str, rounds: int, *, start: str) -> list[str]:
    """A ledger as fedcollab wrote it before the site ledger (format /1), with its head."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")  # as the old daemon left it: rows may sit in the WAL
    db.execute("CREATE TABLE ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute(f"CREATE TABLE ledger ({', '.join(_V1_COLUMNS)})")
    db.execute("INSERT INTO ledger_meta VALUES ('format', ?)", (FORMAT_V1,))
    prev, hashes = GENESIS_HASH, []
    for r in range(1, rounds + 1):
        history = [[1.0, 0.2, 5 * r]]
        fields = {"seq": r, "created_at": f"{start}:{r:02d}", "study": study, "round": r, "nonce": f"{study}-{r}",
                  "epsilon": epsilon_of(history=history, delta=1e-5, accountant=ACCOUNTANT), "delta": 1e-5,
                  "noise_multiplier": 1.0, "sample_rate": 0.2, "steps": 5, "accountant": ACCOUNTANT,
                  "accountant_state": canonical_json(history), "budget_epsilon": 8.0, "update_sha256": "",
                  "prev_hash": prev}
        fields["hash"] = prev = row_hash(prev, fields)
        hashes.append(prev)
        db.execute(f"INSERT INTO ledger VALUES ({', '.join('?' * len(_V1_COLUMNS))})",
                   tuple(fields[c] for c in _V1_COLUMNS))
    db.close()
    path.with_suffix(".head").write_text(json.dumps({"seq": rounds, "hash": prev}))
    return hashes


def test_old_per_study_ledgers_are_migrated_into_the_site_ledger_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _v1_ledger(ledger_path(state), "default-study", 2, start="2026-01-01T00:00")
    _v1_ledger(ledger_path(state / "studies" / "copy"), "copy", 3, start="2026-01-02T00:00")
    with pytest.raises(LedgerError, match="older fedcollab .* --migrate"):
        PrivacyLedger(ledger_path(state))  # opened as it is: refused, saying how to fix it
    with open_site_ledger(state, dataset="builtin:digits", site_budget=8.0) as ledger:
        rows = ledger.entries()
        assert [(e.study, e.round) for e in rows] == [("default-study", 1), ("default-study", 2), ("copy", 1),
                                                       ("copy", 2), ("copy", 3)]
        assert ledger.verify().ok
        site = epsilon_of(history=[(1.0, 0.2, 25)], delta=1e-5, accountant=ACCOUNTANT)
        assert rows[-1].site_epsilon == pytest.approx(site)  # both studies composed: the old spend still counts
        copy_alone = epsilon_of(history=[(1.0, 0.2, 15)], delta=1e-5, accountant=ACCOUNTANT)
        assert rows[-1].epsilon == pytest.approx(copy_alone)
    assert (state / V1_FILENAME).is_file() and (state / "studies" / "copy" / V1_FILENAME).is_file()
    assert not ledger_path(state / "studies" / "copy").exists()
    with open_site_ledger(state, dataset="builtin:digits", site_budget=8.0) as again:  # a restart: nothing twice
        assert len(again.entries()) == 5


def test_a_crash_before_the_old_file_was_set_aside_imports_nothing_twice(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _v1_ledger(ledger_path(state / "studies" / "copy"), "copy", 2, start="2026-01-02T00:00")
    with open_site_ledger(state, dataset="d", site_budget=8.0):
        pass
    # As if the daemon died after the import committed, before the rename: put it back.
    kept = state / "studies" / "copy" / V1_FILENAME
    kept.replace(ledger_path(state / "studies" / "copy"))
    kept.with_suffix(".head").replace(ledger_path(state / "studies" / "copy").with_suffix(".head"))
    with open_site_ledger(state, dataset="d", site_budget=8.0) as ledger:
        assert len(ledger.entries()) == 2
    assert kept.is_file()


def test_an_old_ledger_that_does_not_verify_is_refused_not_imported(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old = ledger_path(state / "studies" / "copy")
    _v1_ledger(old, "copy", 3, start="2026-01-02T00:00")
    db = sqlite3.connect(str(old), isolation_level=None)
    db.execute("UPDATE ledger SET epsilon = 0.01 WHERE seq = 2")
    db.close()
    with pytest.raises(LedgerError, match=r"does not verify \(row 2 does not chain\).* Restore it"):
        open_site_ledger(state, dataset="d", site_budget=8.0)
    assert old.is_file()  # left where it was, for the site to restore
    with PrivacyLedger(ledger_path(state)) as ledger:
        assert ledger.entries() == []


def test_a_mixed_history_is_never_counted_as_its_last_mechanism_alone() -> None:
    """Opacus' GDP accountant reads only the last entry of a history; two studies with
    different noise on one dataset must count both."""
    mixed = [(0.8, 0.2, 50), (3.0, 0.2, 5)]
    assert composed_epsilon(history=mixed, delta=1e-5, accountant="gdp") >= epsilon_of(
        history=mixed[:1], delta=1e-5, accountant="rdp")
