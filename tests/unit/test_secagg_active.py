"""The checks that hold SecAgg+ against a coordinator that lies, one by one, without the
network (tests/integration/test_secagg_lying_coordinator.py runs them over gRPC)."""

from __future__ import annotations

import secrets
from collections import defaultdict
from dataclasses import replace

import pytest

from fedcollab.secagg import (
    InstitutionSecAgg,
    RoundSetup,
    SecAggError,
    Share,
    degree_for,
    neighbour_graph,
    removal_seeds,
    threshold_for,
)
from fedcollab.secagg._shamir import PRIME
from tests._pki import TestCA
from tests.unit.secagg_helpers import signing_identities

NAMES = ["a", "b", "c", "d", "e"]


def _setup(name: str, *, round_id: bytes, names: list[str] = NAMES, threshold: int = 4) -> RoundSetup:
    graph = neighbour_graph(names, degree=degree_for(len(names), "auto"), seed=round_id)
    return RoundSetup(name=name, round_id=round_id, participants=tuple(names), neighbours=tuple(graph[name]),
                      threshold=threshold, bits=32)


def _signed_round(names: list[str] = NAMES, threshold: int = 4) -> dict[str, InstitutionSecAgg]:
    round_id = secrets.token_bytes(16)
    ids = signing_identities(names)
    return {n: InstitutionSecAgg(_setup(n, round_id=round_id, names=names, threshold=threshold), **ids[n])
            for n in names}


@pytest.mark.parametrize(("hood", "t", "ok"), [(3, 2, True), (4, 2, False), (4, 3, True), (5, 3, True),
                                               (21, 2, False), (21, 10, False), (21, 11, True)])
def test_the_threshold_must_be_above_half_of_the_neighbourhood(hood: int, t: int, ok: bool) -> None:
    names = [f"n{i:02d}" for i in range(hood)]
    make = lambda: RoundSetup(name=names[0], round_id=bytes(16), participants=tuple(names),  # noqa: E731
                              neighbours=tuple(names[1:]), threshold=t, bits=32)
    if ok:
        make()
    else:
        with pytest.raises(SecAggError, match="SECAGG_WEAK_THRESHOLD"):
            make()
    # The coordinator never asks for less: a count below a majority is raised to one.
    assert threshold_for(hood, t) == max(t, hood // 2 + 1) and 2 * threshold_for(hood, t) > hood


def test_the_graph_must_be_the_one_the_round_implies() -> None:
    names = [f"n{i:02d}" for i in range(40)]
    round_id = secrets.token_bytes(16)
    k = degree_for(40, "auto")
    graph = neighbour_graph(names, degree=k, seed=round_id)
    InstitutionSecAgg(RoundSetup(name="n00", round_id=round_id, participants=tuple(names),
                                 neighbours=tuple(graph["n00"]), threshold=k // 2 + 1, bits=32))
    with pytest.raises(SecAggError, match="SECAGG_WEAK_GRAPH"):  # sparser than a round of 40 calls for
        RoundSetup(name="n00", round_id=round_id, participants=tuple(names), neighbours=tuple(graph["n00"][:4]),
                   threshold=3, bits=32)
    chosen = sorted(set(names[1:k + 1]))  # as many neighbours, but picked by the coordinator
    assert chosen != graph["n00"]
    with pytest.raises(SecAggError, match="SECAGG_WEAK_GRAPH"):
        InstitutionSecAgg(RoundSetup(name="n00", round_id=round_id, participants=tuple(names),
                                     neighbours=tuple(chosen), threshold=k // 2 + 1, bits=32))


def test_substituted_or_forged_keys_are_refused_before_sharing() -> None:
    clients = _signed_round()
    ads = {n: c.advertisement for n, c in clients.items()}
    fake = InstitutionSecAgg(clients["b"].setup)  # the coordinator's own keys for b, unsigned
    with pytest.raises(SecAggError, match="SECAGG_UNSIGNED"):
        clients["a"].make_shares({**ads, "b": fake.advertisement})
    swapped = replace(ads["b"], mask_public_key=fake.mask_public_key)  # b's signature, another key
    with pytest.raises(SecAggError, match="SECAGG_BAD_SIGNATURE"):
        clients["a"].make_shares({**ads, "b": swapped})
    relabelled = replace(ads["c"], name="b")  # c's genuine signed keys, shown as b's
    with pytest.raises(SecAggError, match="SECAGG_BAD_CERTIFICATE"):
        clients["a"].make_shares({**ads, "b": relabelled})
    rogue = signing_identities(["b"], ca=TestCA("a rogue CA"))["b"]  # names b, but not the federation's CA
    forged = InstitutionSecAgg(clients["b"].setup, **rogue).advertisement
    with pytest.raises(SecAggError, match="SECAGG_BAD_CERTIFICATE.*not issued"):
        clients["a"].make_shares({**ads, "b": forged})
    other_round = _signed_round()["b"].advertisement  # b's real signature, from another round
    with pytest.raises(SecAggError, match="SECAGG_BAD_SIGNATURE"):
        clients["a"].make_shares({**ads, "b": other_round})
    assert clients["a"].make_shares(ads)  # the genuine ones pass


def _through_unmasking(clients: dict[str, InstitutionSecAgg]):  # type: ignore[no-untyped-def]
    ads = {n: c.advertisement for n, c in clients.items()}
    mail: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for n, c in clients.items():
        for holder, ct in c.make_shares(ads):
            mail[holder].append((n, ct))
    names = sorted(clients)
    for n, c in clients.items():
        c.receive_shares(mail[n])
    signatures = {n: c.sign_survivors(names) for n, c in clients.items()}
    revealed: dict[tuple[str, str], list[tuple[str, Share]]] = defaultdict(list)
    for n, c in clients.items():
        for owner, kind, share in c.reveal(survivors=names, signatures=signatures):
            revealed[(owner, kind)].append((n, Share.from_bytes(share)))
    return ads, revealed


def _removal(clients, ads, revealed):  # type: ignore[no-untyped-def]
    any_setup = next(iter(clients.values())).setup
    return removal_seeds(round_id=any_setup.round_id, participants=any_setup.participants,
                         graph=next(iter(clients.values())).graph, adverts=ads, survivors=sorted(clients),
                         dropped=[], revealed=revealed, threshold=any_setup.threshold)


def test_a_crafted_share_is_named_and_left_out_while_t_good_ones_remain() -> None:
    clients = _signed_round()
    ads, revealed = _through_unmasking(clients)
    honest = _removal(clients, ads, revealed)
    holder, share = revealed[("c", "self_mask_seed")][1]
    revealed[("c", "self_mask_seed")][1] = (holder, Share(share.x, (share.y + 1) % PRIME))  # passes combine()
    out = _removal(clients, ads, revealed)
    assert list(out.bad_shares) == [holder] and "c's self mask seed" in out.bad_shares[holder]
    assert out.subtract == honest.subtract and out.add == honest.add  # rebuilt from the 4 good shares
    # A second wrong share leaves 3 of the 4 needed: the round fails, naming both.
    holder2, share2 = revealed[("c", "self_mask_seed")][2]
    revealed[("c", "self_mask_seed")][2] = (holder2, Share(share2.x, (share2.y + 7) % PRIME))
    with pytest.raises(SecAggError, match="SECAGG_UNMASK_FAILED") as err:
        _removal(clients, ads, revealed)
    assert holder in err.value.message and holder2 in err.value.message


def test_a_dealer_whose_committed_shares_are_inconsistent_is_named() -> None:
    """Shares that match their commitments but do not lie on one polynomial: the seed
    commitment catches the rebuilt seed, and the dealer is the one at fault."""
    clients = _signed_round()
    d = clients["d"]
    # d deals (and commits to) shares of another seed than the one it committed to.
    d._dealt = {h: (Share(a.x, (a.y + 1) % PRIME), b) for h, (a, b) in d._dealt.items()}
    from fedcollab.secagg._advert import MASK_PRIVATE_KEY, SELF_MASK_SEED, share_commitment

    commitments = {h: (share_commitment(round_id=d.setup.round_id, owner="d", kind=SELF_MASK_SEED, share=a),
                       share_commitment(round_id=d.setup.round_id, owner="d", kind=MASK_PRIVATE_KEY, share=b))
                   for h, (a, b) in d._dealt.items()}
    unsigned = replace(d.advertisement, share_commitments=commitments, signature=b"")
    assert d._identity is not None
    d.advertisement = replace(unsigned, signature=d._identity.sign(unsigned.signed_bytes(d.setup.shape)))
    ads, revealed = _through_unmasking(clients)
    with pytest.raises(SecAggError, match="d dealt inconsistent shares"):
        _removal(clients, ads, revealed)


def test_equivocation_leaves_each_list_short_of_t_signatures() -> None:
    """Holders shown different survivor lists each hold only their side's signatures."""
    clients = _signed_round()
    ads = {n: c.advertisement for n, c in clients.items()}
    mail: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for n, c in clients.items():
        for holder, ct in c.make_shares(ads):
            mail[holder].append((n, ct))
    for n, c in clients.items():
        c.receive_shares(mail[n])
    alive, dropped = ["a", "b", "c", "d", "e"], ["b", "c", "d", "e"]  # a alive for a, b; dropped for c, d, e
    sigs = {n: clients[n].sign_survivors(alive if n in "ab" else dropped) for n in NAMES}
    for n in NAMES:
        with pytest.raises(SecAggError, match="SECAGG_TOO_FEW_SIGNATURES"):
            clients[n].reveal(survivors=alive if n in "ab" else dropped, signatures=sigs)


def test_without_a_certificate_an_institution_takes_part_unsigned_and_says_so(caplog, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Plaintext (no [tls]): the institution warns at every round that a lying
    coordinator could then see its update; with [tls] files it cannot read, it refuses."""
    import logging

    from fedcollab.config import TlsConfig
    from fedcollab.institution._secure import send_secure, signing_from
    from fedcollab.v1 import coordinator_service_pb2 as pb

    class Stop(Exception):
        pass

    class Client:
        def secagg_submit(self, **kw):  # type: ignore[no-untyped-def]
            assert not kw["keys"].signature and not kw["keys"].certificate  # unsigned, as warned
            raise Stop

    task = pb.Task(round=3, secure_aggregation=pb.SecAggParams(
        round_id=bytes(16), participants=["a", "b", "c"], neighbours=["b", "c"], threshold=2, bits=32, scale=1e6,
        clipping_range=8.0))
    with caplog.at_level(logging.WARNING, logger="fedcollab.institution"), pytest.raises(Stop):
        send_secure(client=Client(), session_id="s", name="a", task=task, deltas=[], num_examples=1, metrics={},
                    privacy=None, wait_s=0.1, tls=None)  # type: ignore[arg-type]
    assert any("UNSIGNED" in r.getMessage() and "coordinator that lies" in r.getMessage() for r in caplog.records)
    missing = TlsConfig(ca_cert=tmp_path / "ca.pem", cert=tmp_path / "a.pem", key=tmp_path / "a.key")
    with pytest.raises(SecAggError, match="SECAGG_NO_IDENTITY"):
        signing_from(missing)
