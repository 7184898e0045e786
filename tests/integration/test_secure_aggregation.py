"""Secure aggregation over real gRPC with mutual TLS: the committed model is the mean
of the institutions' updates within the quantization error, the coordinator only
receives masked updates, and a round survives an institution that drops out after
the key exchange."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedcollab.institution._secure as secure
from fedcollab.config import SecureAggregationConfig
from fedcollab.coordinator import Coordinator
from fedcollab.lineage import read_record_file, record_path
from tests.conftest import institution_config, recording_daemon, running, tiny_federation, wait_until
from tests.integration._tls_files import coordinator_tls, institution_tls

pytestmark = pytest.mark.integration

NAMES = ["hospital-a", "hospital-b", "lab-c", "lab-d"]


def _run(tmp_path: Path, test_ca, *, rounds: int, min_institutions: int, fail: dict[tuple[str, int], str],
         secure_aggregation: SecureAggregationConfig | None = None):
    """Runs the study; `fail[(name, round)]` makes that institution vanish at that step
    ("after_shares": it shared keys, then sends no masked update)."""
    config = tiny_federation(
        tmp_path / "coordinator", rounds=rounds, min_institutions=min_institutions,
        min_available_institutions=len(NAMES),
        secure_aggregation=secure_aggregation or SecureAggregationConfig(stage_timeout_s=5, clipping_range=8.0))
    original = secure.encode_masked
    uploads: dict[tuple[str, int], str] = {}

    def encode(tensors, *, secagg, **kw):  # type: ignore[no-untyped-def]
        key = (secagg.setup.name, len([k for k in uploads if k[0] == secagg.setup.name]) + 1)
        if fail.get(key) == "after_shares":
            uploads[key] = "dropped"
            raise ConnectionError("simulated crash after the key exchange")
        masked = original(tensors, secagg=secagg, **kw)
        uploads[key] = hashlib.sha256(masked.tobytes()).hexdigest()
        return masked

    secure.encode_masked = encode
    try:
        # [tls] files on both sides: the institutions sign their keys with theirs.
        config = coordinator_tls(test_ca, tmp_path / "tls", config)
        with Coordinator(config=config) as coordinator:
            pairs = [recording_daemon(institution_tls(test_ca, tmp_path / "tls", institution_config(
                n, address=f"127.0.0.1:{coordinator.port}", index=i, parts=len(NAMES), state_root=tmp_path)))
                for i, n in enumerate(NAMES)]
            with running([d for d, _ in pairs]) as outcome:
                assert coordinator.wait(timeout=120), "study did not finish"
                wait_until(lambda: len(outcome) == len(NAMES), timeout=30, what="daemons to finish")
            store = coordinator.store
            return ({m.version: m for m in store.models()}, [r for r in store.rounds() if r["status"] == "committed"],
                    {r: store.participations(round_number=r) for r in range(1, rounds + 1)}, pairs, uploads,
                    Path(config.server.state_dir))
    finally:
        secure.encode_masked = original


def _expected_mean(pairs, round_number: int, names: list[str], *, max_weight: float | None = 1000.0
                   ) -> dict[str, torch.Tensor]:
    """The mean of the models sent, weighted by min(num_examples, max_weight) (the
    default weighting), or uniform with max_weight None."""
    sent = {d.name: t.sent[round_number] for d, t in pairs if round_number in t.sent and d.name in names}
    assert sorted(sent) == sorted(names)
    w = {n: 1.0 if max_weight is None else min(count, max_weight) for n, (count, _) in sent.items()}
    assert max_weight is None or len(set(w.values())) > 1  # the Dirichlet split: weighting makes a difference
    return {k: sum(w[n] * s[k].double() for n, (_, s) in sent.items()) / sum(w.values())
            for k in next(iter(sent.values()))[1]}


@pytest.mark.parametrize("weighting", ["auto", "uniform"])
def test_the_committed_model_is_the_mean_of_masked_updates(tmp_path: Path, test_ca, weighting: str) -> None:
    """Weighted by default (each update counts min(n, max_weight) times, the weight
    masked with it), or uniform."""
    models, rounds, store, pairs, uploads, _ = _run(
        tmp_path, test_ca, rounds=2, min_institutions=4, fail={}, secure_aggregation=SecureAggregationConfig(
            stage_timeout_s=5, clipping_range=8.0, weighting=weighting))
    assert [r["round"] for r in rounds] == [1, 2]
    for r in (1, 2):
        committed = load_file(str(models[r].path))
        expected = _expected_mean(pairs, r, NAMES, max_weight=1000.0 if weighting == "auto" else None)
        for name, value in committed.items():
            # 4 summands, each off by at most one quantization level (8 * 4 / 2^31), over the weights' sum
            torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6)
    # What reached the coordinator were the masked uploads, not the updates.
    done = [p for p in store[1] if p["status"] == "done"]
    assert sorted(p["update_sha256"] for p in done) == sorted(v for (n, r), v in uploads.items() if r == 1)


def _protection_lines(caplog: pytest.LogCaptureFixture) -> dict[str, list[tuple[int, str]]]:
    """What each institution (no [privacy] table) said protects its updates."""
    said: dict[str, list[tuple[int, str]]] = {}
    for r in caplog.records:
        text = r.getMessage()
        if r.name == "fedcollab.institution" and ": study " in text and (
                "DP-SGD" in text or "WITHOUT differential privacy" in text):
            said.setdefault(text.split(":", 1)[0], []).append((r.levelno, text))
    return said


def test_a_round_survives_an_institution_that_drops_after_sharing_keys(tmp_path: Path, test_ca,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedcollab.institution")
    models, rounds, store, pairs, uploads, state_dir = _run(
        tmp_path, test_ca, rounds=2, min_institutions=3, fail={("lab-c", 1): "after_shares"})
    # Masked but not noised: the warning stays, once per institution and study.
    said = _protection_lines(caplog)
    assert sorted(said) == NAMES and all(len(lines) == 1 for lines in said.values()), said
    assert all(level == logging.WARNING and "WITHOUT differential privacy" in text
               for lines in said.values() for level, text in lines)
    assert [r["round"] for r in rounds] == [1, 2]
    first = {p["institution"]: p for p in store[1]}
    assert first["lab-c"]["status"] == "failed" and "SECAGG_STAGE_TIMEOUT" in first["lab-c"]["reason"]
    survivors = [n for n in NAMES if n != "lab-c"]
    committed = load_file(str(models[1].path))
    # lab-c trained (its pairwise masks are in the others' uploads) but sent nothing:
    # its masks were removed with its mask key rebuilt from the survivors' shares.
    expected = _expected_mean(pairs, 1, survivors)
    for name, value in committed.items():
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6)
    assert rounds[1]["metrics"]["num_updates"] == 4  # lab-c is back in round 2
    record = json.loads(read_record_file(record_path(state_dir, 1))[0])
    assert record["aggregator"]["name"] == "secagg+fedavg"
    assert record["aggregator"]["weighting"] == "num_examples" and record["aggregator"]["max_weight"] == 1000.0
    assert record["aggregator"]["masked_updates"] == 3 and record["aggregator"]["dropped_after_sharing"] == 1


def test_distributed_dp_noises_the_sum_and_accounts_it(tmp_path: Path, test_ca,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """With distributed DP every institution clips and adds its share of Skellam noise:
    the committed model is the mean of the clipped updates plus noise of the planned
    std, and each round records the federation's epsilon, growing round by round."""
    from fedcollab.config import DistributedDPConfig

    caplog.set_level(logging.INFO, logger="fedcollab.institution")
    clip, z = 0.5, 0.5
    models, rounds, _, pairs, _, _ = _run(
        tmp_path, test_ca, rounds=2, min_institutions=4, fail={},
        secure_aggregation=SecureAggregationConfig(
            stage_timeout_s=10, distributed_dp=DistributedDPConfig(clip_norm=clip, noise_multiplier=z)))
    # No institution claims to train without DP: each says once what protects its updates.
    said = _protection_lines(caplog)
    assert sorted(said) == NAMES and all(len(lines) == 1 for lines in said.values()), said
    for [(level, text)] in said.values():
        assert level == logging.INFO and "WITHOUT" not in text
        assert "distributed DP under secure aggregation" in text and f"L2 norm {clip:g}" in text
    assert [r["round"] for r in rounds] == [1, 2]
    eps = [r["metrics"]["federation_dp_epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1] < float("inf")
    base = load_file(str(models[0].path))
    committed = load_file(str(models[1].path))
    names = list(base)
    clipped = []
    for _, t in pairs:
        delta = torch.cat([(t.sent[1][1][k].double() - base[k].double()).reshape(-1) for k in names])
        clipped.append(delta * min(1.0, clip / float(delta.norm())))
    mean = torch.stack(clipped).mean(0)
    got = torch.cat([(committed[k].double() - base[k].double()).reshape(-1) for k in names])
    noise = got - mean
    expected_std = rounds[0]["metrics"]["distributed_dp_noise_std"]
    assert abs(expected_std - z * clip / 4) < 1e-9  # std on the mean: z * clip / survivors
    # 1,210 coordinates: the sample std of the noise is within 10% of the planned one.
    assert abs(float(noise.std()) / expected_std - 1) < 0.1
    assert abs(float(noise.mean())) < 4 * expected_std / len(noise) ** 0.5
