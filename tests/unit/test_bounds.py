"""Bounded influence: water-filled weights, the declared count, the fold's overflow check,
the round's norm bounds and bounded evaluation reports (fedcollab/coordinator/_bounds.py)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedcollab.aggregation import StreamingFedAvg
from fedcollab.aggregation._fedavg import AggregateOverflow
from fedcollab.config import ModelConfig, StrategyConfig, StudyConfig
from fedcollab.coordinator._bounds import (
    bounded_reports,
    evaluation_metrics,
    next_norm_median,
    norm_policy,
    update_weight,
    water_fill,
)
from fedcollab.coordinator._round_sum import RoundSum
from fedcollab.coordinator._upload import UploadReceiver
from fedcollab.errors import Rejected
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.wire import TensorPiece, iter_chunks, manifest_of, stream_sha256

BASE = {"b": torch.zeros(5), "w": torch.zeros(4, 6)}
MANIFEST = manifest_of(BASE)
STUDY = StudyConfig(model=ModelConfig(kind="mlp"))


@pytest.mark.parametrize(("weights", "share", "expected"), [
    ({"a": 10, "b": 30}, 1.0, {"a": 10, "b": 30}),                       # the study allows any share
    ({"a": 10, "b": 10, "c": 10}, 0.5, {"a": 10, "b": 10, "c": 10}),      # nothing binds
    ({"a": 10, "b": 30}, 0.5, {"a": 10, "b": 10}),                        # two: equal at most
    ({"a": 1, "b": 1, "m": 10**12}, 0.5, {"a": 1, "b": 1, "m": 2}),       # the attack: m gets half
    ({"a": 100, "b": 50, "c": 20, "m": 10**9}, 0.3, {"a": 52, "b": 50, "c": 20, "m": 52}),  # two capped
    ({"a": 3, "b": 1}, 0.4, {"a": 1, "b": 1}),                            # 2 < 1 / 0.4: equal shares
    ({"only": 7}, 0.5, {"only": 7}),
])
def test_water_filling(weights: dict[str, int], share: float, expected: dict[str, int]) -> None:
    assert water_fill(weights, max_share=share) == expected


@settings(max_examples=300, deadline=None)
@example(values=[687202, 68_719_512_800], share=0.99999)  # float rounding once put the cap 2 low
@given(st.lists(st.integers(min_value=1, max_value=10**12), min_size=1, max_size=12),
       st.floats(min_value=0.05, max_value=1.0))
def test_water_filling_never_exceeds_the_share_and_keeps_the_small_weights(values: list[int], share: float) -> None:
    weights = {f"i{k}": v for k, v in enumerate(values)}
    out = water_fill(weights, max_share=share)
    total = sum(out.values())
    assert all(1 <= out[k] <= weights[k] for k in weights)
    if len(values) * share >= 1:
        assert max(out.values()) <= share * total * (1 + 1e-12)
        cap = max(out.values())
        # Only weights above the cap were lowered, all to the same cap, and not further than needed:
        # one more example on every capped weight would break the share.
        assert all(out[k] == weights[k] or out[k] == cap for k in weights)
        lowered = [k for k in weights if out[k] < weights[k]]
        if lowered:
            # Exactly, as water_fill computes: in floats the product rounds up by whole examples at 7e10.
            assert cap + 1 > Fraction(share) * (total + len(lowered))
    else:
        assert len(set(out.values())) == 1  # as equal as they can be


def test_an_update_may_not_claim_more_than_its_institution_declared() -> None:
    assert update_weight(claimed=500, declared=800, cap=100) == 100
    assert update_weight(claimed=500, declared=0, cap=10**8) == 500  # not declared: the study's cap only
    with pytest.raises(Rejected) as err:
        update_weight(claimed=10**12, declared=800, cap=10**8)
    assert err.value.reason == "EXAMPLE_COUNT_ABOVE_DECLARED"


def test_a_fold_that_overflows_is_caught_on_the_slice_it_touched() -> None:
    total = StreamingFedAvg(manifest=MANIFEST)
    total.fold(pieces=[TensorPiece(index=1, start=0, values=torch.full((24,), 1.0))], weight=3.0)
    with pytest.raises(AggregateOverflow, match="'w'"):
        total.fold(pieces=[TensorPiece(index=1, start=3, values=torch.full((5,), 3e38))], weight=1e12)


def _upload(tmp: Path, name: str, value: float, weight: int) -> tuple[UploadReceiver, list]:
    deltas = [torch.full(t.shape, value) for t in BASE.values()]
    header = pb.UpdateHeader(manifest=MANIFEST, total_bytes=29 * 4, sha256=stream_sha256(deltas), num_examples=weight)
    receiver = UploadReceiver(header=header, manifest=MANIFEST, max_chunk_bytes=1024, spool=tmp / f"{name}.upload")
    return receiver, list(iter_chunks(deltas, chunk_bytes=20))


def _send(total: RoundSum, name: str, receiver: UploadReceiver, chunks: list) -> None:
    for c in chunks:
        assert total.fold(name, receiver.accept(c), upto=receiver.received)
    receiver.finish()
    assert total.finish(name) and total.complete(name)


def test_the_overflowing_upload_is_refused_and_the_sum_rebuilt_without_it(tmp_path: Path) -> None:
    total = RoundSum(manifest=MANIFEST, piece_bytes=12)
    a, a_chunks = _upload(tmp_path, "a", 1.0, 10)
    m, m_chunks = _upload(tmp_path, "m", 3e38, 10**8)
    b, b_chunks = _upload(tmp_path, "b", -2.0, 30)
    for name, r in (("a", a), ("m", m), ("b", b)):
        total.add(name, receiver=r, weight=float(r.header.num_examples))
    total.fold("a", a.accept(a_chunks[0]), upto=a.received)
    with pytest.raises(AggregateOverflow):
        total.fold("m", m.accept(m_chunks[0]), upto=m.received)
    assert total.refused["m"][0] == "UPDATE_OVERFLOWS_AGGREGATE" and total.rebuilds == 1
    assert not total.fold("m", m.accept(m_chunks[1]), upto=m.received)  # the rest of it is not folded
    total.exclude("m")  # what the engine does next: nothing more to rebuild
    assert total.rebuilds == 1
    for c in a_chunks[1:]:
        assert total.fold("a", a.accept(c), upto=a.received)
    a.finish()
    assert total.finish("a") and total.complete("a")
    _send(total, "b", b, b_chunks)
    assert sorted(total.close()) == ["a", "b"]
    for value in total.apply(BASE).values():
        torch.testing.assert_close(value, torch.full(value.shape, (10 * 1.0 + 30 * -2.0) / 40), rtol=0, atol=1e-6)


def test_a_weight_above_the_share_is_capped_at_the_close_by_one_rebuild(tmp_path: Path) -> None:
    total = RoundSum(manifest=MANIFEST, piece_bytes=12, max_weight_share=0.5)
    sent = {"a": (1.0, 10), "b": (-1.0, 30), "m": (5.0, 10**8)}
    for name, (value, n) in sent.items():
        r, chunks = _upload(tmp_path, name, value, n)
        total.add(name, receiver=r, weight=float(n))
        _send(total, name, r, chunks)
    assert sorted(total.close()) == ["a", "b", "m"] and total.rebuilds == 1
    assert total.weights() == {"a": 10.0, "b": 30.0, "m": 40.0} and total.capped == {"m": 10**8}
    expected = (10 * 1.0 + 30 * -1.0 + 40 * 5.0) / 80  # m holds half the weight, not all of it
    for value in total.apply(BASE).values():
        torch.testing.assert_close(value, torch.full(value.shape, expected), rtol=0, atol=1e-6)


def test_no_rebuild_where_no_cap_binds(tmp_path: Path) -> None:
    total = RoundSum(manifest=MANIFEST, piece_bytes=12, max_weight_share=0.5, screen_factor=10.0)
    for name, (value, n) in {"a": (1.0, 10), "b": (2.0, 10), "c": (-1.5, 12)}.items():
        r, chunks = _upload(tmp_path, name, value, n)
        total.add(name, receiver=r, weight=float(n))
        _send(total, name, r, chunks)
    assert sorted(total.close()) == ["a", "b", "c"] and total.rebuilds == 0 and not total.refused


def test_round_one_refuses_updates_far_above_the_rounds_median_norm(tmp_path: Path) -> None:
    total = RoundSum(manifest=MANIFEST, piece_bytes=12, screen_factor=10.0)
    for name, (value, n) in {"a": (0.1, 10), "b": (-0.2, 10), "c": (0.15, 10), "m": (50.0, 10)}.items():
        r, chunks = _upload(tmp_path, name, value, n)
        total.add(name, receiver=r, weight=float(n))
        _send(total, name, r, chunks)
    assert sorted(total.close()) == ["a", "b", "c"]
    assert total.refused["m"][0] == "UPDATE_NORM_OUT_OF_BOUNDS" and total.rebuilds == 1
    for value in total.apply(BASE).values():
        torch.testing.assert_close(value, torch.full(value.shape, 0.05 / 3), rtol=0, atol=1e-6)


def test_the_norm_bound_comes_from_the_last_committed_round() -> None:
    assert norm_policy(STUDY, last_metrics=None).screen_factor == 10.0
    policy = norm_policy(STUDY, last_metrics={"update_norm_median": 0.3})
    assert policy.max_norm == pytest.approx(3.0) and policy.screen_factor is None
    explicit = STUDY.model_copy(update={"max_update_norm": 1.0})
    assert norm_policy(explicit, last_metrics={"update_norm_median": 0.3}).max_norm == 1.0
    off = STUDY.model_copy(update={"adaptive_norm_factor": None})
    assert norm_policy(off, last_metrics={"update_norm_median": 0.3}).max_norm is None
    robust = STUDY.model_copy(update={"strategy": StrategyConfig(name="fedmedian")})
    assert norm_policy(robust, last_metrics={"update_norm_median": 0.3}).max_norm is None
    assert norm_policy(STUDY, last_metrics={"update_norm_median": 0.0}).max_norm is None  # never a bound of 0


def test_the_next_rounds_median_needs_three_updates() -> None:
    assert next_norm_median([1.0, 2.0, 30.0], previous=None) == 2.0
    assert next_norm_median([1.0, 1e6], previous=None) is None  # two: whoever is larger would set it
    assert next_norm_median([1.0, 1e6], previous=1.5) == 1.5  # handed on
    assert next_norm_median([1.0, float("inf"), 2.0, 3.0], previous=None) == 2.0


def test_evaluation_reports_are_bounded_like_updates() -> None:
    reports = {"a": (100, 0.1, 0.98), "b": (120, 0.2, 0.97), "m": (9 * 10**18, 50.0, 1.6e-17), "z": (0, 0.0, 0.0)}
    bounded = bounded_reports(reports, study=STUDY)
    assert bounded["m"][0] == 220 and bounded["a"] == reports["a"] and bounded["z"][0] == 0
    accuracy = sum(n * acc for n, _, acc in bounded.values()) / sum(n for n, _, _ in bounded.values())
    assert 0.48 < accuracy < 0.5  # half the weight at most: without the bound it would be 1.6e-17
    metrics = evaluation_metrics(bounded)
    assert metrics["eval_accuracy"] == pytest.approx(accuracy) and metrics["eval_examples"] == 440
    assert metrics["eval_accuracy_median"] == 0.97 and metrics["eval_institutions"] == 4
