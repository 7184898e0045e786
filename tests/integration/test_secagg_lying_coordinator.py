"""A coordinator that lies, against real institution daemons over real gRPC with mutual
TLS: the real coordinator, whose secure-aggregation bookkeeping (SecAggRound, what
each institution is handed when it polls) is replaced by a hostile subclass. Each
attack is one that recovered, or could recover, an institution's update before the
institutions checked what they were told; here every one ends with the institutions
refusing before they reveal anything that would unmask one update, and a hostile
institution's wrong share is caught and named while the round still commits the
right mean."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from safetensors.torch import load_file

import fedcollab.coordinator._engine as engine_module
from fedcollab.config import SecureAggregationConfig
from fedcollab.coordinator import Coordinator
from fedcollab.coordinator._secagg import CONSISTENCY, SHARE, UNMASK, SecAggRound
from fedcollab.institution import InstitutionDaemon, TorchTrainer, load_local_data
from fedcollab.institution._daemon import DaemonEvent
from fedcollab.lineage import read_record_file, record_path
from fedcollab.secagg import InstitutionSecAgg, PeerVerifier, RoundSetup, Share, SigningIdentity
from fedcollab.secagg._pb import advert_to_pb
from fedcollab.v1 import coordinator_service_pb2 as pb
from tests.conftest import RecordingTrainer, institution_config, tiny_federation, wait_until
from tests.integration._tls_files import coordinator_tls, institution_tls

pytestmark = pytest.mark.integration

HONEST = ["hospital-a", "hospital-b", "lab-c", "lab-d"]
VICTIM = "hospital-a"


class _Hostile(SecAggRound):
    """The real bookkeeping, with a registry so a test can look at what it collected."""

    made: list[_Hostile] = []

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        type(self).made.append(self)


@contextmanager
def _federation(tmp_path: Path, test_ca, hostile: type[SecAggRound] | None, *, names: list[str],
                min_institutions: int, rounds: int = 1) -> Iterator[tuple[Coordinator, dict[str, list[str]],
                                                                          dict[str, RecordingTrainer]]]:
    """The real coordinator (with `hostile` as its SecAggRound) and real daemons for
    `names`, all over mutual TLS from [tls] files; yields (coordinator, refusals by
    institution, trainers)."""
    config = coordinator_tls(test_ca, tmp_path / "tls", tiny_federation(
        tmp_path / "coordinator", rounds=rounds, min_institutions=min_institutions,
        min_available_institutions=len(names), round_timeout_s=30, central_evaluation=None,
        secure_aggregation=SecureAggregationConfig(stage_timeout_s=4, clipping_range=8.0)))
    refusals: dict[str, list[str]] = {n: [] for n in names}
    trainers: dict[str, RecordingTrainer] = {}
    saved = engine_module.SecAggRound
    if hostile is not None:
        engine_module.SecAggRound = hostile  # type: ignore[misc]
    stop = threading.Event()
    threads = []
    try:
        with Coordinator(config=config) as coordinator:
            for i, name in enumerate(names):
                c = institution_tls(test_ca, tmp_path / "tls", institution_config(
                    name, address=f"127.0.0.1:{coordinator.port}", index=i, parts=len(names), state_root=tmp_path))
                assert c.data is not None
                train, val = load_local_data(c.data)
                trainers[name] = RecordingTrainer(TorchTrainer(train=train, val=val, device=torch.device("cpu")))

                def note(e: DaemonEvent, name: str = name) -> None:
                    if e.kind == "refused":
                        refusals[name].append(e.detail)

                daemon = InstitutionDaemon(config=c, trainer=trainers[name], num_train_examples=len(train),
                                           poll_wait_s=1.0, on_event=note)
                threads.append(threading.Thread(target=daemon.run, kwargs={"stop": stop}, daemon=True))
            for t in threads:
                t.start()
            yield coordinator, refusals, trainers
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        engine_module.SecAggRound = saved  # type: ignore[misc]


def _mallory(test_ca) -> SigningIdentity:  # type: ignore[no-untyped-def]
    """An enrolled institution that colludes with the coordinator: a real certificate
    of the federation CA, in its own name."""
    pem = test_ca.issue("mallory", server=False)
    return SigningIdentity(certificate_pem=pem.cert,
                           key=serialization.load_pem_private_key(pem.key, password=None))  # type: ignore[arg-type]


# ---------------------------------------------------------------- 1. substituted keys
@pytest.mark.parametrize("forgery", ["unsigned", "colluder_signed"])
def test_substituted_keys_are_refused_before_any_share_is_sent(tmp_path: Path, test_ca, forgery: str) -> None:
    """The coordinator shows the victim keys of its own making for every neighbour, so
    that the victim's shares (of both its secrets) would be encrypted to it. Unsigned,
    or signed with a colluding institution's real certificate: the victim refuses
    before sharing anything, and the round goes on without it."""
    mallory = _mallory(test_ca)

    class SubstitutesKeys(_Hostile):
        def poll(self, name: str, stage: int) -> pb.SecAggPollResponse:
            response = super().poll(name, stage)
            if name != VICTIM or stage != SHARE or not response.ready:
                return response
            forged = pb.SecAggPollResponse(ready=True)
            for keys in response.peers:
                if keys.institution == VICTIM:
                    forged.peers.append(keys)
                    continue
                fake = InstitutionSecAgg(RoundSetup(
                    name=keys.institution, round_id=self.round_id, participants=tuple(self.participants),
                    neighbours=tuple(self.graph[keys.institution]), threshold=self.threshold, bits=32,
                    round_number=self.round_number), **({} if forgery == "unsigned" else {
                        "identity": mallory, "verifier": PeerVerifier(ca_pem=test_ca.pem)}))
                forged.peers.append(advert_to_pb(fake.advertisement))
            return forged

    SubstitutesKeys.made = []
    with _federation(tmp_path, test_ca, SubstitutesKeys, names=HONEST, min_institutions=3) as (coord, refusals, _):
        assert coord.wait(timeout=90), "the round should commit without the victim"
        wait_until(lambda: bool(refusals[VICTIM]), timeout=10, what="the victim's refusal")
        committed = [r for r in coord.store.rounds() if r["status"] == "committed"]
    expected = "SECAGG_UNSIGNED" if forgery == "unsigned" else "SECAGG_BAD_CERTIFICATE"
    assert refusals[VICTIM][0].startswith(expected), refusals[VICTIM]
    first = SubstitutesKeys.made[0]
    assert VICTIM not in first.shares  # nothing of the victim's secrets was ever encrypted to a forged key
    assert all(not r for n, r in refusals.items() if n != VICTIM)
    assert committed and committed[0]["metrics"]["num_updates"] == 3


# ---------------------------------------------------------------- 2. threshold and degree
@pytest.mark.parametrize("lie", ["threshold_2_of_20", "sparse_graph"])
def test_a_weak_threshold_or_graph_is_refused_before_keys_are_advertised(tmp_path: Path, test_ca, lie: str) -> None:
    """The coordinator pads the round with names that will never take part and asks
    for a threshold of 2 with 20 neighbours (any 2 holders, e.g. itself and one
    colluder, would unmask), or a graph of 2 neighbours in a round of 34 (which it
    picks). Every institution refuses at once: no keys are advertised."""

    class WeakRound(_Hostile):
        def params_for(self, name: str) -> pb.SecAggParams:
            p = super().params_for(name)
            ghosts = [f"zz-ghost-{i:02d}" for i in range(17 if lie == "threshold_2_of_20" else 30)]
            everyone = sorted([*self.participants, *ghosts])
            p.participants[:] = everyone
            if lie == "threshold_2_of_20":
                p.neighbours[:] = [n for n in everyone if n != name]
                p.threshold = 2
            else:
                p.neighbours[:] = [n for n in self.participants if n != name][:2]
                p.threshold = 2
            return p

    WeakRound.made = []
    with _federation(tmp_path, test_ca, WeakRound, names=HONEST, min_institutions=3) as (_, refusals, _):
        wait_until(lambda: all(refusals.values()), timeout=60, what="every institution to refuse")
        keys_seen = [set(r.keys) for r in WeakRound.made]
    expected = "SECAGG_WEAK_THRESHOLD" if lie == "threshold_2_of_20" else "SECAGG_WEAK_GRAPH"
    assert all(r[0].startswith(expected) for r in refusals.values()), refusals
    assert keys_seen and all(not k for k in keys_seen)


# ---------------------------------------------------------------- 3. equivocating survivor lists
def test_equivocating_survivor_lists_get_no_share_revealed(tmp_path: Path, test_ca) -> None:
    """After the masked input the coordinator shows the victim and one holder a list in
    which the victim survived (to collect shares of its self-mask seed) and the other
    two a list in which it dropped (to collect shares of its mask key): both secrets,
    hence its update. Each side gets only its own signatures on its list, fewer than
    t = 3, so nobody reveals anything."""
    group_b = {"lab-c", "lab-d"}

    class Equivocates(_Hostile):
        def _shown(self, name: str) -> list[str]:
            return sorted(self.u3 - {VICTIM}) if name in group_b else sorted(self.u3)

        def submit_consistency(self, name: str, payload: pb.ConsistencyPayload) -> None:
            self.signatures[name] = pb.SurvivorSignature(institution=name, certificate=payload.certificate,
                                                         signature=payload.signature)  # whatever list it signed

        def poll(self, name: str, stage: int) -> pb.SecAggPollResponse:
            response = super().poll(name, stage)
            if response.ready and stage in (CONSISTENCY, UNMASK):
                del response.survivors[:]
                response.survivors.extend(self._shown(name))
                if stage == UNMASK:
                    hood = self.hood(name)
                    del response.dropped[:]
                    response.dropped.extend(sorted((hood & self.u2) - set(self._shown(name))))
                    del response.signatures[:]
                    response.signatures.extend(self.signatures.values())  # every signature it has, to everyone
            return response

    Equivocates.made = []
    with _federation(tmp_path, test_ca, Equivocates, names=HONEST, min_institutions=3) as (_, refusals, _):
        wait_until(lambda: all(refusals.values()), timeout=60, what="every institution to refuse the unmasking")
        first = Equivocates.made[0]
        revealed = {k: list(v) for k, v in first.revealed.items()}
    assert all(r[0].startswith("SECAGG_TOO_FEW_SIGNATURES") for r in refusals.values()), refusals
    assert first.revealers == set() and revealed == {}  # neither of the victim's secrets, nor anyone else's


# ---------------------------------------------------------------- 4. a crafted share
def test_a_crafted_share_is_detected_attributed_and_left_out(tmp_path: Path, test_ca) -> None:
    """A hostile institution (mallory, enrolled) reveals its share of one survivor's
    self-mask seed with y + 1, which Shamir's combine() accepts and which would shift
    that seed (a silently wrong sum). The coordinator checks every share against the
    commitment its dealer signed: mallory is named in the lineage record, its share
    left out, the seed rebuilt from the 4 good ones (t = 4 of 5), and the committed
    model is the (weighted) mean of the five updates."""
    names = [*HONEST, "mallory"]
    original = InstitutionSecAgg.reveal

    def crafted(self: InstitutionSecAgg, **kw: Any) -> list[tuple[str, str, bytes]]:
        out = original(self, **kw)
        if self.setup.name != "mallory":
            return out
        owner, kind, share = out[0]
        s = Share.from_bytes(share)
        return [(owner, kind, Share(s.x, s.y + 1).to_bytes()), *out[1:]]

    InstitutionSecAgg.reveal = crafted  # type: ignore[method-assign]
    try:
        with _federation(tmp_path, test_ca, None, names=names, min_institutions=5) as (coord, refusals, trainers):
            assert coord.wait(timeout=90), "the round should commit"
            committed = load_file(str({m.version: m for m in coord.store.models()}[1].path))
    finally:
        InstitutionSecAgg.reveal = original  # type: ignore[method-assign]
    assert all(not r for r in refusals.values()), refusals
    state_dir = Path(coord.config.server.state_dir)
    record = json.loads(read_record_file(record_path(state_dir, 1))[0])
    assert record["aggregator"]["wrong_shares_from"] == ["mallory"]
    sent = [t.sent[1] for t in trainers.values()]  # (num_examples, model): weighted by min(n, 1000)
    for k, value in committed.items():
        expected = sum(min(n, 1000) * s[k].double() for n, s in sent) / sum(min(n, 1000) for n, _ in sent)
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
