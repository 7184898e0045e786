"""Institution-level DP at the coordinator (DP-FedAvg): whole-update clipping through the
streaming sum, uniform weights, noise scale, adaptive clipping, accounting, restart."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcollab.aggregation import (
    StreamingFedAvg,
    add_gaussian_noise_,
    clip_scale,
    next_clip_norm,
    noise_std,
    update_noise_multiplier,
)
from fedcollab.config import AdaptiveClippingConfig, CentralDPConfig
from fedcollab.coordinator._checkpoints import ModelVersion
from fedcollab.coordinator._round_sum import RoundSum
from fedcollab.coordinator._store import Store
from fedcollab.coordinator._upload import UploadReceiver
from fedcollab.privacy import CentralDP, epsilon_of
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.wire import iter_chunks, manifest_nbytes, manifest_of, stream_sha256

# Two float32 tensors and a float64 one: 5 + 24 + 3 = 32 coordinates.
BASE = {"b": torch.zeros(5), "w": torch.zeros(4, 6), "h": torch.zeros(3, dtype=torch.float64)}
MANIFEST = manifest_of(BASE)
CHUNK = 20  # bytes: one update spans 8 chunks, and chunks cut tensors and elements


def _update(seed: int, *, norm: float, base: dict[str, torch.Tensor] = BASE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    raw = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base.items()}
    scale = norm / math.sqrt(sum(float((t * t).sum()) for t in raw.values()))
    return {k: (t * scale).to(base[k].dtype) for k, t in raw.items()}


def _norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def _receiver(tmp: Path, name: str, update: dict[str, torch.Tensor], *, examples: int = 10,
              manifest=MANIFEST, chunk: int = CHUNK) -> tuple[UploadReceiver, list]:
    tensors = list(update.values())
    header = pb.UpdateHeader(manifest=manifest, total_bytes=manifest_nbytes(manifest), sha256=stream_sha256(tensors),
                             num_examples=examples)
    receiver = UploadReceiver(header=header, manifest=manifest, max_chunk_bytes=max(chunk, 1024),
                              spool=tmp / f"{name}.upload")
    return receiver, list(iter_chunks(tensors, chunk_bytes=chunk))


def _arrive(total: RoundSum, name: str, receiver: UploadReceiver, chunks: list) -> None:
    for c in chunks:
        assert total.fold(name, receiver.accept(c), upto=receiver.received)


def _upload_whole(total: RoundSum, tmp: Path, name: str, update: dict[str, torch.Tensor], **kw: object) -> None:
    receiver, chunks = _receiver(tmp, name, update, **kw)  # type: ignore[arg-type]
    total.add(name, receiver=receiver, weight=float(receiver.header.num_examples))
    _arrive(total, name, receiver, chunks)
    receiver.finish()
    assert total.finish(name) and total.complete(name)


def _mean_of(updates: list[dict[str, torch.Tensor]], scales: list[float]) -> dict[str, torch.Tensor]:
    return {k: sum(s * u[k].double() for u, s in zip(updates, scales, strict=True)) / len(updates) for k in BASE}


# ----------------------------------------------------------------- pure math
@pytest.mark.parametrize(("norm", "clip", "scale"), [
    (10.0, 1.0, 0.1),
    (1.0, 1.0, 1.0),     # at S: untouched
    (0.5, 1.0, 1.0),
    (0.0, 1.0, 1.0),     # a zero update
    (3.0, 0.25, 0.25 / 3.0),
])
def test_clip_scale(norm: float, clip: float, scale: float) -> None:
    assert clip_scale(norm=norm, clip_norm=clip) == pytest.approx(scale, rel=1e-15)


@pytest.mark.parametrize(("z", "sigma_b", "expected"), [
    (1.0, None, 1.0),
    (0.0, 3.0, 0.0),                              # no noise at all: nothing to share
    (1.3, 2.0, (1.3**-2 - 4.0**-2) ** -0.5),      # Andrew et al. Thm 1
    (1.0, 10.0, (1.0 - 1 / 400) ** -0.5),         # a small share for the count
])
def test_update_noise_multiplier(z: float, sigma_b: float | None, expected: float) -> None:
    got = update_noise_multiplier(noise_multiplier=z, count_noise_multiplier=sigma_b)
    assert got == pytest.approx(expected, rel=1e-12)
    if sigma_b is not None and z > 0:  # the pair composes back to z
        assert (got**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)


def test_update_noise_multiplier_refuses_a_count_that_takes_all_the_privacy() -> None:
    with pytest.raises(ValueError, match="half of noise_multiplier"):
        update_noise_multiplier(noise_multiplier=2.0, count_noise_multiplier=1.0)


def test_noise_std_is_z_s_over_n() -> None:
    assert noise_std(update_noise_multiplier=1.2, clip_norm=0.5, num_updates=4) == pytest.approx(0.15)
    with pytest.raises(ValueError):
        noise_std(update_noise_multiplier=1.0, clip_norm=1.0, num_updates=0)


@pytest.mark.parametrize(("unclipped", "n", "expected_exponent"), [
    (5, 5, -0.2 * (1 - 0.5)),    # all within S: S shrinks
    (0, 5, -0.2 * (0 - 0.5)),    # all clipped: S grows
    (2, 4, 0.0),                  # at the target quantile: S stays
])
def test_next_clip_norm_geometric_update(unclipped: int, n: int, expected_exponent: float) -> None:
    g = torch.Generator().manual_seed(0)
    got = next_clip_norm(clip_norm=2.0, num_unclipped=unclipped, num_updates=n, target_quantile=0.5,
                         learning_rate=0.2, count_noise_multiplier=1e-12, generator=g)
    assert got == pytest.approx(2.0 * math.exp(expected_exponent), rel=1e-9)


# ----------------------------------------------------------------- streamed clipping
def test_an_update_over_the_clip_norm_contributes_its_direction_at_norm_s(tmp_path: Path) -> None:
    # Norms 6, 6 and sqrt(28) per tensor, 10 in all: clipping per tensor or per chunk
    # would scale differently from clipping the whole update.
    parts = {k: _update(1, norm=v, base={k: BASE[k]})[k] for k, v in (("b", 6.0), ("w", 6.0), ("h", 28**0.5))}
    update = {k: parts[k] for k in BASE}
    assert _norm(update) == pytest.approx(10.0, rel=1e-6)
    total = RoundSum(manifest=MANIFEST, piece_bytes=12, clip_norm=1.0)
    _upload_whole(total, tmp_path, "a", update)
    assert total.update_norms() == [pytest.approx(10.0, rel=1e-6)]
    total.close()
    new = total.apply(BASE, noise_std=0.0)
    assert _norm(new) == pytest.approx(1.0, rel=1e-6)
    for k, v in new.items():
        assert v.dtype == BASE[k].dtype
        torch.testing.assert_close(v.double(), update[k].double() / 10.0, rtol=1e-6, atol=1e-7)


def test_updates_within_the_clip_norm_are_untouched(tmp_path: Path) -> None:
    updates = [_update(2, norm=0.5), _update(3, norm=0.99), _update(4, norm=1.0)]
    total = RoundSum(manifest=MANIFEST, piece_bytes=12, clip_norm=1.0)
    for i, u in enumerate(updates):
        _upload_whole(total, tmp_path, f"u{i}", u)
    total.close()
    new = total.apply(BASE)
    expected = _mean_of(updates, [1.0, 1.0, 1.0])
    for k, v in new.items():
        torch.testing.assert_close(v.double(), expected[k], rtol=0, atol=1e-7)


def test_example_counts_are_ignored_under_central_dp(tmp_path: Path) -> None:
    small, large = _update(5, norm=0.3), _update(6, norm=0.4)
    total = RoundSum(manifest=MANIFEST, piece_bytes=12, clip_norm=1.0)
    _upload_whole(total, tmp_path, "small", small, examples=10)
    _upload_whole(total, tmp_path, "large", large, examples=10**9)  # a claim that must not buy weight
    total.close()
    new = total.apply(BASE)
    expected = _mean_of([small, large], [1.0, 1.0])
    for k, v in new.items():
        torch.testing.assert_close(v.double(), expected[k], rtol=0, atol=1e-7)


def test_without_a_clip_norm_the_weighted_mean_is_unchanged(tmp_path: Path) -> None:
    a, b = _update(7, norm=50.0), _update(8, norm=0.1)
    total = RoundSum(manifest=MANIFEST, piece_bytes=12)
    _upload_whole(total, tmp_path, "a", a, examples=10)
    _upload_whole(total, tmp_path, "b", b, examples=30)
    total.close()
    new = total.apply(BASE)
    for k, v in new.items():
        torch.testing.assert_close(v.double(), (10 * a[k].double() + 30 * b[k].double()) / 40, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="clip norm"):
        total.update_norms()


def test_a_failed_upload_under_central_dp_leaves_no_trace(tmp_path: Path) -> None:
    a, b, c, d, e = (_update(10 + i, norm=v) for i, v in enumerate((3.0, 1e6, 0.5, 2e5, 0.8)))
    total = RoundSum(manifest=MANIFEST, piece_bytes=12, clip_norm=1.0)
    receivers = {}
    for name, u in (("a", a), ("b", b), ("c", c), ("d", d), ("e", e)):
        receivers[name] = _receiver(tmp_path, name, u)
        total.add(name, receiver=receivers[name][0], weight=100.0)
    for name in ("a", "e"):
        r, chunks = receivers[name]
        _arrive(total, name, r, chunks)
        r.finish()
        assert total.finish(name) and total.complete(name)
    rb, b_chunks = receivers["b"]
    _arrive(total, "b", rb, b_chunks[:5])   # b fails part-way: measured, never folded
    total.exclude("b")
    assert total.rebuilds == 0 and not total.fold("b", [], upto=0) and not total.finish("b")
    rd, d_chunks = receivers["d"]
    _arrive(total, "d", rd, d_chunks)
    rd.finish()
    assert total.finish("d")                # d is folded, clipped, then fails before it counts
    total.exclude("d")
    assert total.rebuilds == 1
    rc, c_chunks = receivers["c"]
    _arrive(total, "c", rc, c_chunks)
    rc.finish()
    assert total.finish("c")                # c is folded when the round closes under it
    assert sorted(total.close()) == ["a", "e"]
    assert total.rebuilds == 2 and not total.complete("c")
    assert sorted(total.update_norms()) == [pytest.approx(0.8, rel=1e-6), pytest.approx(3.0, rel=1e-6)]
    new = total.apply(BASE)
    expected = _mean_of([a, e], [1 / 3.0, 1.0])
    for k, v in new.items():
        torch.testing.assert_close(v.double(), expected[k], rtol=0, atol=1e-7)
    assert list(tmp_path.glob("*.upload")) == [], "spools are removed when the round closes"


def test_complete_before_finish_is_a_bug(tmp_path: Path) -> None:
    total = RoundSum(manifest=MANIFEST, piece_bytes=12, clip_norm=1.0)
    r, chunks = _receiver(tmp_path, "a", _update(1, norm=1.0))
    total.add("a", receiver=r, weight=1.0)
    _arrive(total, "a", r, chunks)
    with pytest.raises(RuntimeError, match="finish"):
        total.complete("a")


# ----------------------------------------------------------------- noise
BIG = {"w": torch.zeros(400, 400), "b": torch.zeros(40_000)}  # 200k coordinates
BIG_MANIFEST = manifest_of(BIG)


def _noised_round(tmp: Path, config: CentralDPConfig, updates: list[dict[str, torch.Tensor]], seed: int
                  ) -> tuple[dict[str, torch.Tensor], float]:
    dp = CentralDP(config=config)
    total = RoundSum(manifest=BIG_MANIFEST, piece_bytes=64 * 1024, clip_norm=dp.clip_norm)
    for i, u in enumerate(updates):
        _upload_whole(total, tmp, f"u{i}", u, manifest=BIG_MANIFEST, chunk=64 * 1024)
    total.close()
    release = dp.release(update_norms=total.update_norms(), generator=torch.Generator().manual_seed(seed))
    new = total.apply(BIG, noise_std=release.noise_std, generator=torch.Generator().manual_seed(seed))
    return new, release.noise_std


def _mean_of_big(updates: list[dict[str, torch.Tensor]], scales: list[float]) -> dict[str, torch.Tensor]:
    return {k: sum(s * u[k].double() for u, s in zip(updates, scales, strict=True)) / len(updates) for k in BIG}


def _residual_stats(new: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, float, int]:
    r = torch.cat([(new[k].double() - expected[k].double()).reshape(-1) for k in BIG])
    return float(r.mean()), float(r.std()), r.numel()


@pytest.mark.parametrize("adaptive", [None, AdaptiveClippingConfig(count_noise_multiplier=2.0)])
def test_noise_on_the_average_has_std_z_s_over_n(tmp_path: Path, adaptive: AdaptiveClippingConfig | None) -> None:
    s, z, n = 2.0, 1.3, 4
    config = CentralDPConfig(clip_norm=s, noise_multiplier=z, adaptive=adaptive)
    updates = [_update(20 + i, norm=v, base=BIG) for i, v in enumerate((0.0, 1.0, 1.5, 5.0))]  # the last is clipped
    new, std = _noised_round(tmp_path, config, updates, seed=7)
    z_delta = z if adaptive is None else (z**-2 - 4.0**-2) ** -0.5
    assert std == pytest.approx(z_delta * s / n, rel=1e-12)
    expected = _mean_of_big(updates, [1.0, 1.0, 1.0, s / 5.0])
    mean, sample_std, count = _residual_stats(new, expected)
    assert count == 200_000
    # The sample std of 200k normals is within 0.2% of sigma (1 s.e. = 1/sqrt(2N) = 0.16%);
    # 1% is ~6 standard errors, and it tells z_delta from z (5.7% apart) with adaptive clipping.
    assert abs(sample_std / std - 1) < 0.01
    assert abs(mean) < 5 * std / math.sqrt(count)


def test_noise_is_fresh_each_time_without_a_generator() -> None:
    draws = []
    for _ in range(2):
        agg = StreamingFedAvg(manifest=manifest_of({"w": torch.zeros(1000)}))
        agg.count(weight=1.0)
        draws.append(agg.apply({"w": torch.zeros(1000)}, noise_std=1.0)["w"])
    assert not torch.equal(draws[0], draws[1])
    assert 0.8 < float(draws[0].std()) < 1.2


def test_noise_is_drawn_in_bounded_pieces_over_the_whole_tensor() -> None:
    flat = torch.zeros(10_007)  # not a multiple of the piece
    add_gaussian_noise_(flat, std=2.0, generator=torch.Generator().manual_seed(1), piece_numel=1000)
    assert bool((flat != 0).all()) and abs(float(flat.std()) / 2.0 - 1) < 0.05
    with pytest.raises(ValueError, match="floating-point"):
        add_gaussian_noise_(torch.zeros(3, dtype=torch.int64), std=1.0, generator=torch.Generator())


def test_half_precision_tensors_get_noise_and_keep_their_dtype() -> None:
    base = {"w": torch.zeros(5000, dtype=torch.bfloat16)}
    agg = StreamingFedAvg(manifest=manifest_of(base))
    agg.count(weight=1.0)
    out = agg.apply(base, noise_std=0.5, generator=torch.Generator().manual_seed(3))["w"]
    assert out.dtype == torch.bfloat16 and abs(float(out.float().std()) / 0.5 - 1) < 0.05


# ----------------------------------------------------------------- adaptive clipping and accounting
# A negligible count noise makes the update exact; it needs z = 0 (with z > 0 the
# config refuses sigma_b <= z / 2, which would leave no privacy for the updates).
ADAPTIVE = CentralDPConfig(clip_norm=1.0, noise_multiplier=0.0,
                           adaptive=AdaptiveClippingConfig(target_quantile=0.5, learning_rate=0.2,
                                                           count_noise_multiplier=1e-9))


def test_clip_norm_shrinks_when_every_update_is_within_it_and_grows_when_all_are_clipped() -> None:
    dp = CentralDP(config=ADAPTIVE)
    r = dp.release(update_norms=[0.1, 0.5, 0.9])
    assert r.clip_norm == 1.0 and r.clip_norm_next == pytest.approx(math.exp(-0.2 * 0.5), rel=1e-9)
    assert r.metrics["clipped_fraction"] == 0.0
    dp.commit(r)
    assert dp.clip_norm == r.clip_norm_next
    r = dp.release(update_norms=[5.0, 7.0])
    assert r.clip_norm_next == pytest.approx(dp.clip_norm * math.exp(0.2 * 0.5), rel=1e-9)
    assert r.metrics["clipped_fraction"] == 1.0


def test_with_count_noise_the_clip_norm_still_moves_the_right_way() -> None:
    config = ADAPTIVE.model_copy(update={"adaptive": AdaptiveClippingConfig(count_noise_multiplier=0.6)})
    dp = CentralDP(config=config)
    norms = [0.1] * 20
    nexts = [dp.release(update_norms=norms).clip_norm_next for _ in range(50)]  # fresh count noise each time
    assert all(v < 1.0 for v in nexts) and len(set(nexts)) == 50
    # b = (20 + N(0, 0.6^2)) / 20: S * exp(-0.2 (b - 0.5)) within a few sigma of exp(-0.1)
    assert all(abs(math.log(v) + 0.1) < 0.2 * 5 * 0.6 / 20 for v in nexts)


def test_without_adaptive_clipping_the_clip_norm_stays() -> None:
    dp = CentralDP(config=CentralDPConfig(clip_norm=0.7, noise_multiplier=1.0))
    r = dp.release(update_norms=[0.1, 3.0])
    assert r.clip_norm == r.clip_norm_next == 0.7 and r.metrics["clipped_fraction"] == 0.5
    assert r.noise_std == pytest.approx(1.0 * 0.7 / 2)


@pytest.mark.filterwarnings("ignore:GDP accounting is experimental")
@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_epsilon_after_k_rounds_is_the_accountants_for_k_steps_at_rate_1(accountant: str) -> None:
    z, delta = 1.5, 1e-5
    dp = CentralDP(config=CentralDPConfig(clip_norm=1.0, noise_multiplier=z, delta=delta, accountant=accountant))
    assert dp.epsilon() == 0.0
    previous = 0.0
    for k in range(1, 5):
        r = dp.release(update_norms=[0.5, 0.5])
        again = dp.release(update_norms=[0.5, 0.5])  # a round that did not commit costs nothing
        assert again.metrics["central_dp_epsilon"] == r.metrics["central_dp_epsilon"]
        dp.commit(r)
        eps = r.metrics["central_dp_epsilon"]
        assert eps == pytest.approx(_epsilon(history=[(z, 1.0, k)], delta=delta, accountant=accountant), rel=1e-12)
        assert eps > previous and r.metrics["central_dp_delta"] == delta
        assert dp.epsilon() == pytest.approx(eps, rel=1e-12)
        previous = eps


def _epsilon(**kw: object) -> float:
    with np.errstate(divide="ignore"):  # PRV's log(1 - q) at q = 1
        return epsilon_of(**kw)  # type: ignore[arg-type]


def test_without_noise_epsilon_is_infinite() -> None:
    dp = CentralDP(config=CentralDPConfig(clip_norm=1.0, noise_multiplier=0.0))
    r = dp.release(update_norms=[2.0])
    assert r.noise_std == 0.0 and r.metrics["central_dp_epsilon"] == math.inf


def _commit(store: Store, tmp: Path, number: int, metrics: dict[str, float]) -> None:
    store.open_round(round_number=number, attempt=1, base_version=number - 1, participants=["a"])
    model = ModelVersion(version=number, sha256=f"{number:064x}", path=tmp / f"v{number}", size_bytes=1)
    store.commit_round(round_number=number, attempt=1, model=model, parent=number - 1, metrics=metrics)


def test_clip_norm_and_history_are_restored_after_a_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "coordinator.sqlite")
    config = CentralDPConfig(clip_norm=1.0, noise_multiplier=1.0, adaptive=AdaptiveClippingConfig(
        count_noise_multiplier=0.6))
    dp = CentralDP(config=config, rounds=store.rounds())
    for number in (1, 2):
        r = dp.release(update_norms=[0.01, 0.02])  # S adapts each round
        _commit(store, tmp_path, number, {"num_updates": 2.0, **r.metrics})
        dp.commit(r)
    # Round 3 fails: it released nothing, and is not counted.
    store.open_round(round_number=3, attempt=1, base_version=2, participants=["a"])
    store.fail_round(round_number=3, attempt=1, reason="quorum not met")
    store.close()

    store = Store(tmp_path / "coordinator.sqlite")
    restarted = CentralDP(config=config, rounds=store.rounds())
    assert restarted.clip_norm == dp.clip_norm != 1.0  # S moved (the count is noised: up or down)
    assert restarted.history == [(1.0, 1.0, 2)]
    assert restarted.epsilon() == dp.epsilon()
    r = restarted.release(update_norms=[0.01])
    assert r.clip_norm == dp.clip_norm
    assert r.metrics["central_dp_epsilon"] == pytest.approx(
        _epsilon(history=[(1.0, 1.0, 3)], delta=config.delta, accountant=config.accountant), rel=1e-12)
    # Fixed clipping ignores a stored adaptive norm: S is the configured one.
    fixed = CentralDP(config=CentralDPConfig(clip_norm=0.3, noise_multiplier=1.0), rounds=store.rounds())
    assert fixed.clip_norm == 0.3 and fixed.history == [(1.0, 1.0, 2)]
    store.close()
