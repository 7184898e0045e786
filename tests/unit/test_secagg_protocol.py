"""The SecAgg+ protocol in one process, without the network: institutions drop out at
every stage, and the unmasked sum is still exactly the sum of the survivors' inputs."""

from __future__ import annotations

import secrets
from collections import defaultdict

import numpy as np
import pytest

from fedcollab.secagg import (
    Advertisement,
    InstitutionSecAgg,
    RoundSetup,
    SecAggError,
    Share,
    apply_masks,
    degree_for,
    neighbour_graph,
    removal_seeds,
    threshold_for,
)
from tests.unit.secagg_helpers import signing_identities

BITS = 32
SIZE = 3_001


def _run(n: int, *, t: int | float, neighbours: str | int = "auto", drop_advertise: int = 0, drop_share: int = 0,
         drop_masked: int = 0, drop_sign: int = 0, drop_unmask: int = 0, seed: int = 0,
         signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One round; returns (unmasked sum, plain sum of the survivors' inputs)."""
    rng = np.random.default_rng(seed)
    names = [f"inst-{i:03d}" for i in range(n)]
    round_id = secrets.token_bytes(16)
    graph = neighbour_graph(names, degree=degree_for(n, neighbours), seed=round_id)
    threshold = threshold_for(len(graph[names[0]]) + 1, t)
    ids = signing_identities(names) if signed else {}
    clients = {a: InstitutionSecAgg(RoundSetup(name=a, round_id=round_id, participants=tuple(names),
                                               neighbours=tuple(graph[a]), threshold=threshold, bits=BITS),
                                    **ids.get(a, {}))
               for a in names}
    inputs = {a: rng.integers(0, 2**20, SIZE, dtype=np.uint64).astype(np.uint32) for a in names}

    order = list(names)
    rng.shuffle(order)
    cut = iter(order)
    gone_advertise = {next(cut) for _ in range(drop_advertise)}
    gone_share = {next(cut) for _ in range(drop_share)}
    gone_masked = {next(cut) for _ in range(drop_masked)}
    gone_sign = {next(cut) for _ in range(drop_sign)}
    gone_unmask = {next(cut) for _ in range(drop_unmask)}

    u1 = [a for a in names if a not in gone_advertise]
    adverts = {a: clients[a].advertisement for a in u1}
    mailbox: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    u2 = []
    for a in u1:
        peers = {b: adverts[b] for b in [a, *graph[a]] if b in adverts}
        shares = clients[a].make_shares(peers)  # computed, then dropped before sending
        if a in gone_share:
            continue
        u2.append(a)
        for holder, ct in shares:
            mailbox[holder].append((a, ct))
    total = np.zeros(SIZE, dtype=np.uint32)
    u3 = []
    for a in u2:
        clients[a].receive_shares([(o, ct) for o, ct in mailbox[a] if o in u2])
        masked = clients[a].mask(inputs[a], start=0)
        if a in gone_masked:
            continue
        u3.append(a)
        total += masked
    signatures = {}
    for a in u3:
        signature = clients[a].sign_survivors(u3)
        if a not in gone_sign:
            signatures[a] = signature
    dropped = set(u2) - set(u3)
    revealed: dict[tuple[str, str], list[tuple[str, Share]]] = defaultdict(list)
    for a in u3:
        if a in gone_unmask or a in gone_sign:
            continue
        for owner, kind, share in clients[a].reveal(survivors=u3, signatures=signatures):
            revealed[(owner, kind)].append((a, Share.from_bytes(share)))
    removal = removal_seeds(round_id=round_id, participants=names, graph=graph, adverts=adverts,
                            survivors=u3, dropped=dropped, revealed=revealed, threshold=threshold)
    assert removal.bad_shares == {}
    unmasked = apply_masks(total, start=0, bits=BITS, add=removal.add, subtract=removal.subtract)
    plain = np.zeros(SIZE, dtype=np.uint32)
    for a in u3:
        plain += inputs[a]
    return unmasked, plain


@pytest.mark.parametrize("signed", [False, True])
def test_without_dropouts_the_unmasked_sum_is_exact(signed: bool) -> None:
    unmasked, plain = _run(5, t=3, signed=signed)
    np.testing.assert_array_equal(unmasked, plain)


@pytest.mark.parametrize("stage", ["drop_advertise", "drop_share", "drop_masked", "drop_sign", "drop_unmask"])
def test_up_to_n_minus_t_dropouts_at_each_stage_are_survived(stage: str) -> None:
    n, t = 7, 4
    unmasked, plain = _run(n, t=t, signed=stage == "drop_sign", **{stage: n - t})
    np.testing.assert_array_equal(unmasked, plain)


def test_dropouts_at_every_stage_of_one_round() -> None:
    unmasked, plain = _run(11, t=6, drop_advertise=1, drop_share=1, drop_masked=1, drop_sign=1, drop_unmask=1)
    np.testing.assert_array_equal(unmasked, plain)


def test_one_dropout_too_many_cannot_be_unmasked() -> None:
    with pytest.raises(SecAggError, match="SECAGG_UNMASK_FAILED|SECAGG_TOO_FEW"):
        _run(6, t=4, drop_masked=1, drop_unmask=2)  # 5 survived, 3 reveal: 4 shares needed


def test_large_rounds_mask_with_log_n_neighbours_and_still_sum_exactly() -> None:
    n = 40
    degree = degree_for(n, "auto")
    assert degree < n - 1 and degree <= 2 * np.ceil(1.5 * np.log2(n))
    graph = neighbour_graph([f"i{k}" for k in range(n)], degree=degree, seed=b"x" * 16)
    assert all(len(v) == degree for v in graph.values())
    assert all(a in graph[b] for a in graph for b in graph[a])  # symmetric
    unmasked, plain = _run(n, t=0.6, drop_share=2, drop_masked=3, drop_sign=1, drop_unmask=1, seed=3, signed=True)
    np.testing.assert_array_equal(unmasked, plain)


def _three(signed: bool = False) -> tuple[dict[str, InstitutionSecAgg], dict[str, Advertisement]]:
    """Institutions a, b, c of one round (complete graph, t = 2) and their advertisements."""
    names = ["a", "b", "c"]
    round_id = secrets.token_bytes(16)
    ids = signing_identities(names) if signed else {}
    clients = {x: InstitutionSecAgg(RoundSetup(name=x, round_id=round_id, participants=tuple(names),
                                               neighbours=tuple(y for y in names if y != x), threshold=2, bits=BITS),
                                    **ids.get(x, {}))
               for x in names}
    return clients, {x: c.advertisement for x, c in clients.items()}


def _three_after_key_exchange(signed: bool = False
                              ) -> tuple[dict[str, InstitutionSecAgg], dict[str, list[tuple[str, bytes]]]]:
    """The three after each made its shares; mail[holder] holds the (owner, ciphertext)
    pairs addressed to it."""
    clients, keys = _three(signed)
    mail: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for x, c in clients.items():
        for holder, ct in c.make_shares(keys):
            mail[holder].append((x, ct))
    return clients, mail


def test_a_holder_never_reveals_both_secrets_or_reveals_twice() -> None:
    clients, mail = _three_after_key_exchange()
    a = clients["a"]
    a.receive_shares(mail["a"])
    with pytest.raises(SecAggError, match="SECAGG_OUT_OF_ORDER"):
        a.reveal(survivors=["a", "b"], signatures={})  # nothing before the survivor list is signed
    with pytest.raises(SecAggError, match="SECAGG_INCONSISTENT"):
        a.sign_survivors(["b", "c"])  # a list without a
    with pytest.raises(SecAggError, match="SECAGG_TOO_FEW_SURVIVORS"):
        signer = _fresh_a()
        signer.sign_survivors(["a"])
        signer.reveal(survivors=["a"], signatures={})
    a.sign_survivors(["a", "b"])
    with pytest.raises(SecAggError, match="SECAGG_ALREADY_SIGNED"):
        a.sign_survivors(["a", "b", "c"])
    with pytest.raises(SecAggError, match="SECAGG_INCONSISTENT"):
        a.reveal(survivors=["a", "b", "c"], signatures={})  # not the list it signed
    out = a.reveal(survivors=["a", "b"], signatures={})
    assert sorted((o, k) for o, k, _ in out) == [("a", "self_mask_seed"), ("b", "self_mask_seed"),
                                                  ("c", "mask_private_key")]
    with pytest.raises(SecAggError, match="SECAGG_ALREADY_REVEALED"):
        a.reveal(survivors=["a", "b"], signatures={})


def _fresh_a() -> InstitutionSecAgg:
    clients, mail = _three_after_key_exchange()
    clients["a"].receive_shares(mail["a"])
    return clients["a"]


def test_relayed_keys_and_shares_are_checked() -> None:
    from dataclasses import replace

    clients, keys = _three()
    with pytest.raises(SecAggError, match="SECAGG_KEY_MISMATCH"):
        clients["a"].make_shares({**keys, "a": keys["b"]})
    with pytest.raises(SecAggError, match="SECAGG_NOT_A_NEIGHBOUR"):
        clients["a"].make_shares({**keys, "z": keys["b"]})
    shares_b = dict(clients["b"].make_shares(keys))
    clients["a"].make_shares(keys)
    tampered = bytearray(shares_b["a"])
    tampered[-1] ^= 1
    with pytest.raises(SecAggError, match="SECAGG_BAD_SHARE"):
        clients["a"].receive_shares([("b", bytes(tampered))])
    with pytest.raises(SecAggError, match="SECAGG_BAD_SHARE"):  # a share for c is not a's to read
        clients["a"].receive_shares([("b", dict(clients["b"].make_shares(keys))["c"])])
    # A share the dealer did not commit to (here: the commitment relayed for b was altered).
    clients, keys = _three()
    shares_b = dict(clients["b"].make_shares(keys))
    other = dict(keys["b"].share_commitments)
    other["a"] = (bytes(32), other["a"][1])
    clients["a"].make_shares({**keys, "b": replace(keys["b"], share_commitments=other)})
    with pytest.raises(SecAggError, match="SECAGG_BAD_SHARE.*did not commit"):
        clients["a"].receive_shares([("b", shares_b["a"])])


def test_a_real_masked_update_looks_uniform() -> None:
    """An actual encoded update (small values near 2^32's zero, so its top bits are
    all 0 or all 1), masked: its top 8 bits are spread evenly over 256 bins."""
    from fedcollab.secagg import Quantizer

    clients, mail = _three_after_key_exchange()
    clients["a"].receive_shares(mail["a"])
    q = Quantizer.for_range(clip=8.0, bits=BITS, max_summands=3)
    rng = np.random.default_rng(0)
    encoded = q.encode(rng.normal(0, 1e-3, 1 << 18), rng=rng)
    assert len(np.unique(encoded >> np.uint32(24))) <= 2  # plain: only 0x00 and 0xFF
    masked = clients["a"].mask(encoded, start=0)
    counts = np.bincount((masked >> np.uint32(24)).astype(np.int64), minlength=256)
    expected = len(masked) / 256
    assert float(((counts - expected) ** 2 / expected).sum()) < 340  # chi-square, 255 dof, p < 3e-4


def test_the_coordinator_refuses_submissions_out_of_place() -> None:
    """One institution sending the wrong thing is refused; the round state is untouched."""
    from dataclasses import replace

    from fedcollab.config import SecureAggregationConfig
    from fedcollab.coordinator._secagg import SecAggRound
    from fedcollab.errors import Rejected
    from fedcollab.secagg._pb import advert_from_pb, advert_to_pb
    from fedcollab.v1 import coordinator_service_pb2 as pb

    sa = SecAggRound(names=["a", "b", "c"], config=SecureAggregationConfig(reconstruction_threshold=2),
                     round_id=secrets.token_bytes(16), params=pb.SecAggParams(bits=32, scale=1.0))
    ids = signing_identities(["a", "b", "c"])
    good = {n: InstitutionSecAgg(RoundSetup(name=n, round_id=sa.round_id, participants=("a", "b", "c"),
                                            neighbours=tuple(sa.graph[n]), threshold=2, bits=32), **ids[n])
            for n in "abc"}

    def refused(reason: str, call) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(Rejected) as err:
            call()
        assert err.value.reason == reason

    refused("SECAGG_BAD_KEY", lambda: sa.submit_keys("a", pb.PeerKeys(cipher_public_key=b"x" * 31,
                                                                       mask_public_key=b"y" * 32)))
    refused("SECAGG_WRONG_STAGE", lambda: sa.submit_shares("a", pb.ShareKeysPayload()))
    a_keys = advert_to_pb(good["a"].advertisement)
    del a_keys.share_commitments[0]
    refused("SECAGG_BAD_COMMITMENT", lambda: sa.submit_keys("a", a_keys))
    # b's keys, signed by b, submitted by a: the signature is not a's.
    refused("SECAGG_BAD_SIGNATURE", lambda: sa.submit_keys("a", advert_to_pb(good["b"].advertisement)))
    # a's keys with a tampered commitment: the signature no longer verifies.
    forged = advert_to_pb(replace(good["a"].advertisement, seed_commitment=bytes(32)))
    refused("SECAGG_BAD_SIGNATURE", lambda: sa.submit_keys("a", forged))
    for n, c in good.items():
        sa.submit_keys(n, advert_to_pb(c.advertisement))
    refused("SECAGG_ALREADY_SUBMITTED", lambda: sa.submit_keys("a", pb.PeerKeys(
        cipher_public_key=secrets.token_bytes(32), mask_public_key=secrets.token_bytes(32))))
    sa.to_share({"a", "b", "c"}, deadline=0)
    peers = {k.institution: advert_from_pb(k) for k in sa.poll("a", SHARE_STAGE).peers}
    shares = good["a"].make_shares(peers)
    refused("SECAGG_BAD_SHARES", lambda: sa.submit_shares("a", pb.ShareKeysPayload(shares=[
        pb.EncryptedShare(owner="a", holder=h, ciphertext=ct) for h, ct in shares[:1]])))  # one holder missing
    refused("SECAGG_BAD_SHARES", lambda: sa.submit_shares("a", pb.ShareKeysPayload(shares=[
        pb.EncryptedShare(owner="b", holder=h, ciphertext=ct) for h, ct in shares])))  # not its own
    sa.submit_shares("a", pb.ShareKeysPayload(shares=[pb.EncryptedShare(owner="a", holder=h, ciphertext=ct)
                                                      for h, ct in shares]))
    assert sa.waiting({"a", "b", "c"}) == {"b", "c"}
    refused("SECAGG_WRONG_STAGE", lambda: sa.poll("a", 7))
    refused("SECAGG_WRONG_STAGE", lambda: sa.submit_consistency("a", pb.ConsistencyPayload()))


SHARE_STAGE = 2  # pb.SEC_AGG_STAGE_SHARE_KEYS
