"""What one hostile institution can still do inside secure aggregation, measured with
the real encoding, masks and unmasking (the coordinator's MaskedSum): its masked
vector cannot be checked, so it moves the committed mean, by clip / n per coordinate
within the clipping range and anywhere inside [-clip, clip] beyond it; a forged weight
sum is refused and the mean never leaves [-clip, clip]. Input validation inside the
mask (ACORN, Bell et al. 2023) is what would bound it further."""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedcollab.coordinator._masked_sum import MaskedSum
from fedcollab.secagg import InstitutionSecAgg, Quantizer, RoundSetup, SecAggError, Share, removal_seeds
from fedcollab.secagg._encode import encode_masked, weight_ratio
from fedcollab.v1 import tensor_pb2

CLIP, DIM, NAMES, MAX_WEIGHT = 8.0, 2_000, ["h1", "h2", "h3", "mallory"], 1000.0
COUNTS = {"h1": 300, "h2": 400, "h3": 500, "mallory": 5_000}  # mallory claims more than max_weight


def _round(weighted: bool, hostile: Callable[[np.ndarray, InstitutionSecAgg, Quantizer], np.ndarray] | None
           ) -> tuple[np.ndarray, np.ndarray]:
    """(committed mean, honest mean with mallory honest too): 4 institutions, unsigned
    (signatures do not matter here), mallory's masked upload replaced by `hostile`."""
    rng = np.random.default_rng(0)
    round_id = secrets.token_bytes(16)
    q = Quantizer.for_range(clip=CLIP, bits=32, max_summands=len(NAMES))
    clients = {n: InstitutionSecAgg(RoundSetup(name=n, round_id=round_id, participants=tuple(sorted(NAMES)),
                                               neighbours=tuple(sorted(set(NAMES) - {n})), threshold=3, bits=32))
               for n in NAMES}
    ads = {n: c.advertisement for n, c in clients.items()}
    mail: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for n, c in clients.items():
        for holder, ct in c.make_shares(ads):
            mail[holder].append((n, ct))
    updates = {n: rng.normal(0, 0.01, DIM) for n in NAMES}
    total = np.zeros(DIM + weighted, dtype=np.uint32)
    for n, c in clients.items():
        c.receive_shares(mail[n])
        weight = weight_ratio(num_examples=COUNTS[n], max_weight=MAX_WEIGHT) if weighted else None
        masked = encode_masked([torch.from_numpy(updates[n])], quantizer=q, clipping_range=CLIP, noise=None,
                               secagg=c, rng=rng, weight=weight)
        if n == "mallory" and hostile is not None:
            masked = hostile(masked, c, q)
        total += masked
    signatures = {n: c.sign_survivors(sorted(NAMES)) for n, c in clients.items()}
    revealed: dict[tuple[str, str], list[tuple[str, Share]]] = defaultdict(list)
    for n, c in clients.items():
        for owner, kind, share in c.reveal(survivors=sorted(NAMES), signatures=signatures):
            revealed[(owner, kind)].append((n, Share.from_bytes(share)))
    removal = removal_seeds(round_id=round_id, participants=sorted(NAMES), graph=clients["h1"].graph, adverts=ads,
                            survivors=NAMES, dropped=[], revealed=revealed, threshold=3)
    manifest = tensor_pb2.ModelManifest(tensors=[tensor_pb2.TensorSpec(
        name="w", dtype=tensor_pb2.TENSOR_DTYPE_FLOAT32, shape=[DIM])])
    summed = MaskedSum(model_manifest=manifest, quantizer=q, piece_bytes=4096, weighted=weighted, clip=CLIP,
                       max_weight=MAX_WEIGHT)
    summed._sum, summed._closed = total, True  # the uploads' sum as the coordinator folds it
    mean = summed.unmask_mean(add=removal.add, subtract=removal.subtract, count=len(NAMES))["w"].double().numpy()
    w = {n: min(COUNTS[n], MAX_WEIGHT) if weighted else 1.0 for n in NAMES}
    honest = sum(w[n] * updates[n] for n in NAMES) / sum(w.values())
    return mean, honest


def _plus_clip(masked: np.ndarray, c: InstitutionSecAgg, q: Quantizer) -> np.ndarray:
    """+clip on every coordinate (and, weighted, the largest weight, 1), masked as an
    honest client would: a vector inside the clipping range."""
    values = np.full(len(masked), CLIP)
    if len(masked) == DIM + 1:
        values[-1] = 1.0
    return c.mask(q.encode(values, rng=np.random.default_rng(1)), start=0)


@pytest.mark.parametrize("weighted", [False, True])
def test_an_honest_round_commits_the_mean(weighted: bool) -> None:
    mean, honest = _round(weighted, None)
    np.testing.assert_allclose(mean, honest, atol=1e-6)


def test_plus_clip_on_every_coordinate_moves_the_mean_by_clip_over_n() -> None:
    mean, honest = _round(False, _plus_clip)
    shift = mean - honest
    # one of 4: (8 - its own ~0) / 4 = 2.0 on every coordinate
    assert np.allclose(shift, CLIP / len(NAMES), atol=0.01), (shift.min(), shift.max())


def test_weighted_the_capped_weight_bounds_the_move() -> None:
    """Claiming 5,000 examples counts as max_weight = 1,000: against 300 + 400 + 500,
    +clip moves the mean by 8 * 1000 / 2200 = 3.6 (uncapped it would be 8 * 5000 / 6200 = 6.5)."""
    mean, honest = _round(True, _plus_clip)
    expected = CLIP * 1000 / (300 + 400 + 500 + 1000)
    assert np.allclose(mean - honest, expected, atol=0.02), (mean - honest).mean()


def test_outside_the_range_it_sets_a_coordinate_anywhere_within_clip_but_no_further() -> None:
    """Beyond the clipping range (any uint32: the coordinator cannot tell) it can make
    the sum wrap, so a coordinate of the mean can be put anywhere in [-clip, clip];
    the coordinator's clamp holds it there."""
    def wrap(masked: np.ndarray, c: InstitutionSecAgg, q: Quantizer) -> np.ndarray:
        forged = np.full(len(masked), (1 << 31) - 1, dtype=np.uint64).astype(np.uint32)  # + 2^31 - 1 levels
        return c.mask(forged, start=0)

    mean, honest = _round(False, wrap)
    assert np.all(np.abs(mean) <= CLIP) and np.abs(mean - honest).max() > CLIP / 2


def test_a_forged_weight_sum_is_refused() -> None:
    def negative_weight(masked: np.ndarray, c: InstitutionSecAgg, q: Quantizer) -> np.ndarray:
        values = np.zeros(len(masked))
        values[-1] = -2.0  # the weights then sum to below zero
        return c.mask(q.encode(values, rng=np.random.default_rng(1)), start=0)

    with pytest.raises(SecAggError, match="SECAGG_BAD_WEIGHT"):
        _round(True, negative_weight)
