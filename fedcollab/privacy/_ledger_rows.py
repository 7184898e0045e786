"""The rows of the site's privacy ledger: columns, the typed entry, its hash, and the
checks every value passes before it is written (fedcollab.privacy._ledger)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fedcollab.config import ACCOUNTANTS
from fedcollab.errors import FedcollabError

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

# Columns in table order; the hash covers all of them but prev_hash and hash.
_COLUMNS = ("seq", "created_at", "study", "dataset", "round", "nonce", "epsilon", "site_epsilon", "delta",
            "noise_multiplier", "sample_rate", "steps", "accountant", "accountant_state", "budget_epsilon",
            "site_budget_epsilon", "update_sha256", "base_sha256", "prev_hash", "hash")
_TEXT = {"created_at", "study", "dataset", "nonce", "accountant", "accountant_state", "update_sha256", "base_sha256",
         "prev_hash", "hash"}
_INT = {"seq", "round", "steps"}
_REAL = {"epsilon", "site_epsilon", "delta", "noise_multiplier", "sample_rate", "budget_epsilon",
         "site_budget_epsilon"}


class LedgerError(FedcollabError):
    """The ledger refuses an append, or its file cannot be used; the message says why."""


class LedgerConflict(LedgerError):
    """A row was added since the snapshot the figures of an append were computed from:
    compute them again (`PrivacyLedger.snapshot`) and retry."""


class OverLimit(LedgerError):
    """The row would record a spend past the study's sub-limit or the site's budget."""


@dataclass(frozen=True)
class LedgerEntry:
    """One row: the privacy spent in one round of one study, and where the chain stood."""

    seq: int
    created_at: str
    study: str
    dataset: str
    """The site's key for the data this round trained on (fedcollab.privacy._dataset)."""
    round: int
    nonce: str
    epsilon: float
    """Cumulative epsilon of this study on this dataset after this round (not this round's share)."""
    site_epsilon: float
    """Cumulative epsilon of the site on this dataset after this round: every study's rows
    composed by one accountant. This is what the site's budget bounds."""
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    """Optimizer steps taken in this round."""
    accountant: str
    history: tuple[tuple[float, float, int], ...]
    """The accountant's history for the whole study so far: (noise_multiplier, sample_rate, steps)."""
    budget_epsilon: float
    """The study's limit: its sub-limit (policy.budgets) or, without one, the site's budget."""
    site_budget_epsilon: float
    update_sha256: str
    base_sha256: str
    """The SHA-256 of the model version the round trained from: a retried attempt of the
    same round on the same base is this row's assignment again (a new nonce does not make
    it new). Empty in rows written before fedcollab recorded it."""
    prev_hash: str
    hash: str

    @property
    def remaining_epsilon(self) -> float:
        """Budget left to this study after this row: the smaller of what its sub-limit
        and the site's budget leave (negative when over)."""
        return min(self.budget_epsilon - self.epsilon, self.site_remaining_epsilon)

    @property
    def site_remaining_epsilon(self) -> float:
        """The site's budget left on this dataset after this row (negative when over)."""
        return self.site_budget_epsilon - self.site_epsilon

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (history as lists)."""
        d = dataclasses.asdict(self)
        d["history"] = [list(h) for h in self.history]
        return d


def canonical_json(obj: Any) -> str:
    """One spelling per value, so hashes are reproducible; floats as repr (exact round-trip)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def row_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    """sha256(prev_hash + "\\n" + canonical JSON of the row without prev_hash and hash).
    An empty base_sha256 is left out, so rows written before that column existed keep
    the hashes they were chained with."""
    body = {k: v for k, v in fields.items()
            if k not in ("prev_hash", "hash") and not (k == "base_sha256" and v == "")}
    return hashlib.sha256((prev_hash + "\n" + canonical_json(body)).encode()).hexdigest()


def _typed(row: Sequence[Any]) -> dict[str, Any]:
    """A row as a dict, refusing values whose type is not the column's (a sign of editing)."""
    fields = dict(zip(_COLUMNS, row, strict=True))
    for k, v in fields.items():
        if k in _TEXT and not isinstance(v, str):
            raise TypeError(f"{k} is {type(v).__name__}, not text")
        if k in _INT and (not isinstance(v, int) or isinstance(v, bool)):
            raise TypeError(f"{k} is {type(v).__name__}, not an integer")
        if k in _REAL:
            if not isinstance(v, float):
                raise TypeError(f"{k} is {type(v).__name__}, not a real number")
            if not math.isfinite(v):
                raise ValueError(f"{k} is not finite")
    return fields


def _read_entry(row: Sequence[Any]) -> LedgerEntry:
    try:
        return _entry(_typed(row))
    except (TypeError, ValueError) as e:
        raise LedgerError(f"row {row[0]}: malformed ({e}); the ledger was edited: run verify()") from None


def _entry(fields: dict[str, Any]) -> LedgerEntry:
    state = json.loads(fields["accountant_state"])
    if not isinstance(state, list):
        raise TypeError("accountant_state is not a list")
    history = tuple((float(nm), float(sr), int(st)) for nm, sr, st in state)
    values = {k: v for k, v in fields.items() if k != "accountant_state"}
    return LedgerEntry(**values, history=history)


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LedgerError(f"{name} must be a number, got {value!r}")
    f = float(value)
    if not math.isfinite(f):
        raise LedgerError(f"{name} must be finite, got {f!r}")
    return f


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LedgerError(f"{name} must be an integer, got {value!r}")
    i = int(value)
    if i < 0:
        raise LedgerError(f"{name} must be >= 0, got {i}")
    return i


_ARGS = ("study", "dataset", "round", "nonce", "epsilon", "site_epsilon", "delta", "noise_multiplier", "sample_rate",
         "steps", "accountant", "history", "budget_epsilon", "site_budget_epsilon", "update_sha256", "base_sha256")


def _validate(*, study: Any, dataset: Any, round: Any, nonce: Any, epsilon: Any, site_epsilon: Any, delta: Any,
              noise_multiplier: Any, sample_rate: Any, steps: Any, accountant: Any, history: Any,
              budget_epsilon: Any, site_budget_epsilon: Any, update_sha256: Any,
              base_sha256: Any = "") -> dict[str, Any]:
    """Typed, checked column values; LedgerError names the first wrong argument and why."""
    if not isinstance(study, str) or not study:
        raise LedgerError(f"study must be a non-empty string, got {study!r}")
    if not isinstance(dataset, str) or not dataset:
        raise LedgerError(f"dataset must be the site's non-empty dataset key, got {dataset!r}")
    if not isinstance(nonce, str) or not nonce:
        raise LedgerError(f"nonce must be the task's non-empty nonce string, got {nonce!r}")
    eps = _real("epsilon", epsilon)
    if eps < 0:
        raise LedgerError(f"epsilon must be >= 0, got {eps!r}")
    site_eps = _real("site_epsilon", site_epsilon)
    if site_eps < 0:
        raise LedgerError(f"site_epsilon must be >= 0, got {site_eps!r}")
    d = _real("delta", delta)
    if not 0 < d < 1:
        raise LedgerError(f"delta must be in (0, 1), got {d!r}")
    sigma = _real("noise_multiplier", noise_multiplier)
    if sigma < 0:
        raise LedgerError(f"noise_multiplier must be >= 0, got {sigma!r}")
    q = _real("sample_rate", sample_rate)
    if not 0 < q <= 1:
        raise LedgerError(f"sample_rate must be in (0, 1], got {q!r}")
    if accountant not in ACCOUNTANTS:
        raise LedgerError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    budget = _real("budget_epsilon", budget_epsilon)
    if budget <= 0:
        raise LedgerError(f"budget_epsilon must be > 0, got {budget!r}")
    site_budget = _real("site_budget_epsilon", site_budget_epsilon)
    if site_budget <= 0:
        raise LedgerError(f"site_budget_epsilon must be > 0, got {site_budget!r}")
    if not isinstance(update_sha256, str) or not (update_sha256 == "" or _SHA256_HEX.fullmatch(update_sha256)):
        raise LedgerError(f"update_sha256 must be 64 lowercase hex digits or empty, got {update_sha256!r}")
    if not isinstance(base_sha256, str) or not (base_sha256 == "" or _SHA256_HEX.fullmatch(base_sha256)):
        raise LedgerError(f"base_sha256 must be the base model's 64 lowercase hex digits or empty, got {base_sha256!r}")
    if isinstance(history, (str, bytes)) or not isinstance(history, Iterable):
        raise LedgerError(f"history must be a list of (noise_multiplier, sample_rate, steps), got {history!r}")
    state: list[list[float | int]] = []
    for i, raw in enumerate(history):
        item = tuple(raw) if isinstance(raw, Iterable) and not isinstance(raw, (str, bytes)) else ()
        if len(item) != 3:
            raise LedgerError(f"history[{i}] must be (noise_multiplier, sample_rate, steps), got {raw!r}")
        h_sigma = _real(f"history[{i}] noise_multiplier", item[0])
        h_q = _real(f"history[{i}] sample_rate", item[1])
        h_steps = _integer(f"history[{i}] steps", item[2])
        if h_sigma < 0 or not 0 < h_q <= 1:
            raise LedgerError(f"history[{i}] must have noise_multiplier >= 0 and sample_rate in (0, 1], "
                              f"got {item!r}")
        state.append([h_sigma, h_q, h_steps])
    return {
        "study": study, "dataset": dataset, "round": _integer("round", round), "nonce": nonce, "epsilon": eps,
        "site_epsilon": site_eps, "delta": d, "noise_multiplier": sigma, "sample_rate": q,
        "steps": _integer("steps", steps), "accountant": accountant, "accountant_state": canonical_json(state),
        "budget_epsilon": budget, "site_budget_epsilon": site_budget, "update_sha256": update_sha256,
        "base_sha256": base_sha256,
    }
