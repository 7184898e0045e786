"""Robust rules against Flower 1.41's own strategies and functions; block sizes; passes
over the spilled updates; validation; robustness to outliers."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from collections.abc import Callable, Iterator  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum  # noqa: E402
from flwr.serverapp.strategy.multikrum import compute_distances, select_multikrum  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

import fedcollab.aggregation._robust as robust_impl  # noqa: E402
from fedcollab.aggregation import RULES, RobustSettings, robust_aggregate  # noqa: E402

SHAPES = [(7, 5), (11,), (2, 3, 4)]  # 70 elements in all
NUMEL = sum(int(np.prod(s)) for s in SHAPES)


@pytest.fixture
def flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's Message reads the run id of the process's task, set by its runtime."""
    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    # Bulyan's to_numpy_ndarrays(keep_input=False) runs a full gc.collect() per array: seconds
    # in a test process with torch and all of Flower loaded, and nothing to do with the math.
    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)


def _updates(rng: np.random.Generator, n: int, f: int) -> tuple[np.ndarray, list[int]]:
    """n flat float32 updates: n - f honest ones around a common direction, then f
    attackers (sign-flipped x100, scaled x100, or large noise); and example counts."""
    center = rng.normal(size=NUMEL)
    honest = center + 0.3 * rng.normal(size=(n - f, NUMEL))
    attacks = []
    for j in range(f):
        kind = j % 3
        if kind == 0:
            attacks.append(-100 * honest[j % (n - f)])
        elif kind == 1:
            attacks.append(100 * honest[j % (n - f)])
        else:
            attacks.append(center + 20 * rng.normal(size=NUMEL))
    x = np.concatenate([honest, np.array(attacks).reshape(f, NUMEL)]).astype(np.float32)
    order = rng.permutation(n)  # attackers anywhere
    return x[order], [int(w) for w in rng.integers(1, 500, size=n)]


def _split(flat: np.ndarray) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for i, s in enumerate(SHAPES):
        size = int(np.prod(s))
        out[f"t{i}"] = flat[at:at + size].reshape(s)
        at += size
    return out


def _replies(x: np.ndarray, weights: list[int]) -> list[Message]:
    """Train replies as clients send them: one ArrayRecord, one MetricRecord with num-examples."""
    out = []
    for node_id, (flat, w) in enumerate(zip(x, weights, strict=True), start=1):
        instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
        arrays = ArrayRecord({k: Array(v.copy()) for k, v in _split(flat).items()})
        out.append(Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": w})}),
                           reply_to=instruction))
    return out


def _flower(rule: str, x: np.ndarray, weights: list[int], *, f: int, trim_fraction: float | None,
            to_keep: int | None) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """Flower's aggregate (flat) and, for the Krum family, the indices it selected."""
    strategy = {
        "median": lambda: FedMedian(),
        "trimmed_mean": lambda: FedTrimmedAvg(beta=trim_fraction),
        "krum": lambda: Krum(num_malicious_nodes=f),
        "multi_krum": lambda: MultiKrum(num_malicious_nodes=f, num_nodes_to_select=to_keep),
        "bulyan": lambda: Bulyan(num_malicious_nodes=f),
    }[rule]()
    arrays, _ = strategy.aggregate_train(1, _replies(x, weights))
    assert arrays is not None
    flat = np.concatenate([arrays[f"t{i}"].numpy().ravel() for i in range(len(SHAPES))])
    selected = None
    if rule in ("krum", "multi_krum", "bulyan"):
        keep = {"krum": 1, "multi_krum": to_keep, "bulyan": len(x) - 2 * f}[rule]
        contents = [m.content for m in _replies(x, weights)]
        chosen = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=keep)
        selected = tuple(next(i for i, c in enumerate(contents) if c is ch) for ch in chosen)
    return flat, selected


def _openers(x: np.ndarray, block: int, calls: list[int] | None = None) -> list[Callable[[], Iterator[torch.Tensor]]]:
    def opener(i: int) -> Callable[[], Iterator[torch.Tensor]]:
        def blocks() -> Iterator[torch.Tensor]:
            if calls is not None:
                calls[i] += 1
            flat = torch.from_numpy(x[i].copy())
            for lo in range(0, len(flat), block):
                yield flat[lo:lo + block].clone()
        return blocks
    return [opener(i) for i in range(len(x))]


def _ours(x: np.ndarray, weights: list[int], settings: RobustSettings, *, block: int
          ) -> tuple[np.ndarray, tuple[int, ...] | None, tuple[float, ...] | None]:
    result = robust_aggregate(updates=_openers(x, block), weights=[float(w) for w in weights], settings=settings)
    blocks = list(result.blocks)
    assert all(b.dtype == torch.float32 for b in blocks)
    assert [len(b) for b in blocks] == [min(block, NUMEL - lo) for lo in range(0, NUMEL, block)]
    return torch.cat(blocks).numpy(), result.selected, result.scores


# (rule, n, f, trim_fraction, to_keep)
CASES = [
    ("median", 1, 0, None, None), ("median", 4, 0, None, None), ("median", 7, 3, None, None),
    ("trimmed_mean", 4, 0, 0.0, None), ("trimmed_mean", 5, 1, 0.2, None), ("trimmed_mean", 10, 3, 0.3, None),
    ("trimmed_mean", 9, 4, 0.45, None), ("trimmed_mean", 6, 1, 0.25, None),  # int(1.5) = 1 cut, not 2
    ("krum", 3, 0, None, None), ("krum", 5, 1, None, None), ("krum", 9, 3, None, None),
    ("multi_krum", 5, 0, None, 5), ("multi_krum", 7, 2, None, 3), ("multi_krum", 10, 1, None, 8),
    ("bulyan", 3, 0, None, None), ("bulyan", 7, 1, None, None), ("bulyan", 12, 2, None, None),
]


@pytest.mark.parametrize(("rule", "n", "f", "trim_fraction", "to_keep"), CASES,
                         ids=[f"{c[0]}-n{c[1]}-f{c[2]}" for c in CASES])
def test_matches_flower(flower_task: None, rule: str, n: int, f: int, trim_fraction: float | None,
                        to_keep: int | None) -> None:
    rng = np.random.default_rng(1000 * n + 10 * f + RULES.index(rule))
    x, weights = _updates(rng, n, f)
    settings = RobustSettings(rule=rule, num_malicious=f, trim_fraction=trim_fraction, to_keep=to_keep)
    expected, flower_selected = _flower(rule, x, weights, f=f, trim_fraction=trim_fraction, to_keep=to_keep)
    got, selected, scores = _ours(x, weights, settings, block=16)
    assert selected == flower_selected
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)  # bitwise equal with numpy 2.4
    if rule in ("median", "trimmed_mean"):
        assert scores is None
    else:
        # Flower's score formula on exact (float64) distances.
        dist = compute_distances([ArrayRecord({"x": Array(v.astype(np.float64))}) for v in x])
        closest = max(1, n - f - 2)
        flower_scores = [np.sort(row)[1:closest + 1].sum() for row in dist]
        np.testing.assert_allclose(scores, flower_scores, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rule", RULES)
def test_block_and_column_sizes_change_nothing(rule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    x, weights = _updates(rng, 11, 2)
    settings = RobustSettings(rule=rule, num_malicious=2, trim_fraction=0.2 if rule == "trimmed_mean" else None,
                              to_keep=4 if rule == "multi_krum" else None)
    reference, ref_selected, ref_scores = _ours(x, weights, settings, block=NUMEL)
    for block, columns in [(1, 1 << 16), (3, 1 << 16), (13, 5), (64, 1 << 16), (NUMEL + 5, 7), (NUMEL, 1)]:
        monkeypatch.setattr(robust_impl, "_COLUMNS", columns)  # per-coordinate math splits blocks further
        got, selected, scores = _ours(x, weights, settings, block=block)
        assert np.array_equal(got, reference), (block, columns)
        assert selected == ref_selected
        if ref_scores is not None:
            np.testing.assert_allclose(scores, ref_scores, rtol=1e-12)  # float64 sums in another order


@pytest.mark.parametrize("rule", RULES)
def test_passes_over_the_updates(rule: str) -> None:
    """Median and trimmed mean read each update once; the Krum family reads each once
    for the distances, then only the selected ones again. Every pass is in lockstep: one
    block of each update at a time."""
    rng = np.random.default_rng(3)
    n, f, block = 11, 2, 8
    x, weights = _updates(rng, n, f)
    calls = [0] * n
    fetched = [0] * n

    def counting(i: int, open_: Callable[[], Iterator[torch.Tensor]]) -> Callable[[], Iterator[torch.Tensor]]:
        def blocks() -> Iterator[torch.Tensor]:
            fetched[i] = 0
            for b in open_():
                fetched[i] += 1
                yield b
        return blocks

    openers = [counting(i, o) for i, o in enumerate(_openers(x, block, calls))]
    settings = RobustSettings(rule=rule, num_malicious=f, to_keep=3 if rule == "multi_krum" else None)
    result = robust_aggregate(updates=openers, weights=[float(w) for w in weights], settings=settings)
    krum_family = rule in ("krum", "multi_krum", "bulyan")
    assert calls == [1 if krum_family else 0] * n  # the aggregation pass waits for the caller
    fetched[:] = [0] * n
    for j, _ in enumerate(result.blocks):
        assert max(fetched) <= j + 1  # never more than one block of any update ahead
    if krum_family:
        assert result.selected is not None
        assert calls == [2 if i in result.selected else 1 for i in range(n)]
    else:
        assert calls == [1] * n


def test_krum_and_bulyan_select_what_they_say() -> None:
    rng = np.random.default_rng(11)
    x, weights = _updates(rng, 11, 2)
    krum = robust_aggregate(updates=_openers(x, 10), weights=[float(w) for w in weights],
                            settings=RobustSettings(rule="krum", num_malicious=2))
    assert krum.selected is not None and krum.scores is not None
    assert krum.selected == (int(np.argmin(krum.scores)),)
    assert np.array_equal(torch.cat(list(krum.blocks)).numpy(), x[krum.selected[0]])  # Krum returns one update
    bulyan = robust_aggregate(updates=_openers(x, 10), weights=[1.0] * 11,
                              settings=RobustSettings(rule="bulyan", num_malicious=2))
    assert bulyan.selected is not None and len(bulyan.selected) == 11 - 2 * 2
    assert bulyan.scores == krum.scores


@pytest.mark.parametrize("attack", [-100.0, 100.0], ids=["sign_flip_x100", "scale_x100"])
@pytest.mark.parametrize("rule", RULES)
def test_outliers_do_not_move_robust_rules(rule: str, attack: float) -> None:
    """f of n updates sign-flipped or scaled x100 drag the mean far away; the robust
    rules stay within the honest updates' spread of their mean."""
    rng = np.random.default_rng(5)
    n, f = 11, 2
    honest = (1.0 + 0.1 * rng.normal(size=(n - f, NUMEL))).astype(np.float32)
    x = np.concatenate([honest, attack * honest[:f]])  # the attackers are the last f
    honest_mean = honest.mean(axis=0)
    settings = RobustSettings(rule=rule, num_malicious=f, trim_fraction=0.2 if rule == "trimmed_mean" else None,
                              to_keep=n - f if rule == "multi_krum" else None)
    got, selected, _ = _ours(x, [100] * n, settings, block=32)
    per_coordinate = np.sqrt(NUMEL)
    assert np.linalg.norm(x.mean(axis=0) - honest_mean) > 15 * per_coordinate  # ~|attack| * f / n each
    assert np.linalg.norm(got - honest_mean) < 0.3 * per_coordinate, rule  # 3 honest standard deviations
    if selected is not None:
        assert not set(selected) & set(range(n - f, n))  # no attacker selected


@pytest.mark.parametrize(("kwargs", "n", "match"), [
    ({"rule": "krum", "num_malicious": 2}, 6, r"Krum needs n >= 2f \+ 3 = 7 updates for f = 2, got n = 6"),
    ({"rule": "multi_krum", "num_malicious": 1}, 4, r"n >= 2f \+ 3 = 5"),
    ({"rule": "multi_krum", "to_keep": 6}, 5, "to_keep = 6 exceeds the 5 updates"),
    ({"rule": "bulyan", "num_malicious": 1}, 6, r"Bulyan needs n >= 4f \+ 3 = 7 updates for f = 1, got n = 6"),
    ({"rule": "median", "num_malicious": 2}, 4, r"n >= 2f \+ 1 = 5"),
    ({"rule": "trimmed_mean", "num_malicious": 2, "trim_fraction": 0.1}, 10,
     "cuts 1 value.s. at each end, fewer than num_malicious = 2: raise trim_fraction to at least 0.2"),
    ({"rule": "median"}, 0, "no update"),
])
def test_rules_need_enough_updates(kwargs: dict, n: int, match: str) -> None:
    settings = RobustSettings(**kwargs)
    with pytest.raises(ValueError, match=match):
        settings.check(num_updates=n)
    with pytest.raises(ValueError, match=match):
        robust_aggregate(updates=[lambda: iter([torch.zeros(4)])] * n, weights=[1.0] * n, settings=settings)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rule": "mean"}, "unknown rule: choose one of median, trimmed_mean, krum, multi_krum, bulyan"),
    ({"rule": "krum", "num_malicious": -1}, "num_malicious must be an int >= 0"),
    ({"rule": "trimmed_mean", "trim_fraction": 0.5}, r"trim_fraction must be in \[0, 0.5\)"),
    ({"rule": "median", "trim_fraction": 0.1}, "trim_fraction applies to rule 'trimmed_mean' only"),
    ({"rule": "krum", "to_keep": 2}, "to_keep applies to rule 'multi_krum' only"),
    ({"rule": "multi_krum", "to_keep": 0}, "to_keep must be an int >= 1"),
])
def test_bad_settings_say_why(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RobustSettings(**kwargs)


def test_flower_defaults() -> None:
    assert RobustSettings(rule="trimmed_mean").trim_fraction == FedTrimmedAvg().beta == 0.2
    assert RobustSettings(rule="multi_krum").to_keep == MultiKrum().num_nodes_to_select == 1
    assert RobustSettings(rule="krum").num_malicious == Krum().num_malicious_nodes == 0
    assert RobustSettings(rule="median").trim_fraction is None and RobustSettings(rule="bulyan").to_keep is None


def test_bad_inputs_say_why() -> None:
    ok = RobustSettings(rule="median")

    def run(blocks: list[list[torch.Tensor]], weights: list[float] | None = None) -> None:
        result = robust_aggregate(updates=[lambda b=b: iter(b) for b in blocks],
                                  weights=weights or [1.0] * len(blocks), settings=ok)
        list(result.blocks)

    with pytest.raises(ValueError, match="2 weights for 3 updates"):
        run([[torch.zeros(2)]] * 3, [1.0, 1.0])
    with pytest.raises(ValueError, match="finite and positive"):
        run([[torch.zeros(2)]] * 2, [1.0, 0.0])
    with pytest.raises(ValueError, match=r"update\(s\) \[1\] ended after 1 blocks"):
        run([[torch.zeros(2), torch.zeros(2)], [torch.zeros(2)]])
    with pytest.raises(ValueError, match="update 1 block 0 has 3 elements"):
        run([[torch.zeros(2)], [torch.zeros(3)]])
    with pytest.raises(ValueError, match="blocks must be 1-D float32"):
        run([[torch.zeros(2)], [torch.zeros(2, dtype=torch.float64)]])
    with pytest.raises(ValueError, match="update 0 has non-finite values in block 0"):
        run([[torch.tensor([0.0, float("nan")])], [torch.zeros(2)]])
