"""A coordinator that lies to institutions, over real mutual TLS on loopback (issue 16).

* The operator of a real coordinator submits copies of one study under new names to
  an institution whose policy accepts every study: the site's spend over all copies,
  read from its one ledger, stays within its budget.
* A hostile CoordinatorService offers studies whose names are paths: the real agent
  declines each (STUDY_NAME_INVALID, told to the coordinator) and creates nothing,
  inside state_dir or out.
* The same hostile service answers `model pull` with another version, another study
  or bytes that are not the announced SHA-256: refused, no file written."""

from __future__ import annotations

import argparse
import hashlib
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedcollab._operator_cli import cmd_model_pull
from fedcollab.config import InstitutionConfig, InstitutionInfo, PolicyConfig, PrivacyConfig, TlsConfig
from fedcollab.coordinator import Coordinator
from fedcollab.errors import FedcollabError
from fedcollab.institution._agent import InstitutionAgent
from fedcollab.lineage import build_record, canonical_bytes, raw_public_key, sign_record
from fedcollab.pki import issue_ephemeral
from fedcollab.privacy import compose
from fedcollab.privacy._budget import composed_epsilon
from fedcollab.privacy._ledger import PrivacyLedger, ledger_path
from fedcollab.transport import server_credentials_from
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc
from fedcollab.v1 import operator_service_pb2 as opb
from fedcollab.v1 import operator_service_pb2_grpc as opb_grpc
from fedcollab.v1 import tensor_pb2
from tests.conftest import institution_config, tiny_federation, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:GDP accounting is experimental")]
BUDGET = 1.0

COPY = """
[study]
name = "NAME"
rounds = 2
min_institutions = 1
min_available_institutions = 2
round_timeout_s = 30
evaluation_timeout_s = 5
[study.model]
kind = "mlp"
params = { in_features = 64, hidden = [16], num_classes = 10 }
[study.train]
local_epochs = 1
batch_size = 32
learning_rate = 0.01
optimizer = "adam"
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return issue_ephemeral(directory=tmp_path_factory.mktemp("pki"), federation="lying",
                           institutions=["hospital-a", "hospital-b"], operators=["op"])


def _tls(pki: Any, name: str) -> TlsConfig:
    cert, key = pki.institutions[name]
    return TlsConfig(ca_cert=pki.ca_cert, cert=cert, key=key)


def _channel(pki: Any, port: int, group: str, name: str) -> grpc.Channel:
    cert, key = getattr(pki, group)[name]
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes(),
                                         private_key=Path(key).read_bytes(), certificate_chain=Path(cert).read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


# ------------------------------------------------------------ (a) fresh budget per name
def test_copies_of_a_study_under_new_names_spend_one_site_budget(pki: Any, tmp_path: Path) -> None:
    cert, key = pki.coordinator
    base = tiny_federation(tmp_path / "coordinator", rounds=2, min_institutions=1, min_available_institutions=2,
                           central_evaluation=None)
    config = base.model_copy(update={"server": base.server.model_copy(update={
        "tls": TlsConfig(ca_cert=pki.ca_cert, cert=cert, key=key, crl=pki.crl)})})
    with Coordinator(config=config) as coordinator:
        op = opb_grpc.OperatorServiceStub(_channel(pki, coordinator.port, "operators", "op"))
        copies = ["copy-1", "copy-2", "copy-3"]
        for name in copies:  # the same study, three times, under new names
            op.SubmitStudy(opb.SubmitStudyRequest(study_toml=COPY.replace("NAME", name)), timeout=10)
        address = f"127.0.0.1:{coordinator.port}"
        # hospital-a: DP-SGD, and the policy of the example that was shipped: every study.
        victim = institution_config("hospital-a", address=address, index=0, parts=2, state_root=tmp_path)
        victim = victim.model_copy(update={
            "tls": _tls(pki, "hospital-a"), "policy": PolicyConfig(studies=["*"]),
            "privacy": PrivacyConfig(target_epsilon=BUDGET, budget_epsilon=BUDGET, accountant="gdp",
                                     grad_sample_mode="hooks")})
        # hospital-b carries every study's quorum, so each goes on once hospital-a declines.
        other = InstitutionConfig(
            institution=InstitutionInfo(name="hospital-b", coordinator=address, state_dir=tmp_path / "hospital-b",
                                        trainer="synthetic", device="cpu"),
            tls=_tls(pki, "hospital-b"), policy=PolicyConfig(studies=["*"]), reconnect=victim.reconnect)
        agents = [InstitutionAgent(config=c, list_every_s=0.2) for c in (victim, other)]
        results: list[bool] = []
        threads = [threading.Thread(target=lambda a=a: results.append(a.run()), daemon=True) for a in agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert results == [True, True]
        wait_until(coordinator.studies.all_ended, timeout=10, what="every study recorded as ended")
        declined = [p for r in coordinator.studies.runs() for p in r.store.participations()
                    if p["institution"] == "hospital-a" and p["status"] == "declined"]
        agents[0].close()
    state = tmp_path / "hospital-a"
    with PrivacyLedger(ledger_path(state), readonly=True) as ledger:
        assert ledger.verify().ok
        rows = ledger.entries()
    history: list[tuple[float, float, int]] = []
    for e in rows:
        history = compose(history, noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps)
    total = composed_epsilon(history=history, delta=1e-5, accountant="gdp")  # the site's delta (the default)
    studies = {e.study for e in rows}
    # Each name alone would have spent the whole budget (2 rounds calibrated to 1.0):
    # together they spent it once, and the copies that came too late were declined.
    assert total <= BUDGET * (1 + 1e-9), (total, studies)
    assert max(e.site_epsilon for e in rows) <= BUDGET * (1 + 1e-9)
    assert rows[-1].site_epsilon == pytest.approx(total, rel=1e-6)
    assert len(rows) < 2 * 4, "four studies of two rounds each cannot all have been paid for"
    assert declined and all(p["reason"].startswith("BUDGET_EXHAUSTED") for p in declined), declined
    # One ledger for the site: the studies' folders keep models and pending updates only.
    assert not list((state / "studies").glob("*/privacy-ledger.sqlite"))
    assert {e.dataset for e in rows} == {"builtin:digits"}


# ------------------------------------------------------------ a hostile coordinator service
EVIL_NAMES = ["../../escaped-T", "/abs/path", "a/../../b", "x\x00y", "x\ny", "..", "ok\n"]


class HostileCoordinator(pb_grpc.CoordinatorServiceServicer):
    """Offers studies named like paths, and answers PullModel as `lie` says."""

    def __init__(self, *, names: list[str], key: Any) -> None:
        self.names = names
        self.declined: list[tuple[str, str]] = []
        self.joins: list[str] = []
        self.offers: list[pb.StudyOffer] | None = None
        self.lie = ""
        self._key = key
        self.data = b"safetensors bytes of a published model" * 50
        self.sha = hashlib.sha256(self.data).hexdigest()

    def ListStudies(self, request: Any, context: Any) -> pb.ListOpenStudiesResponse:
        if self.offers is not None:
            return pb.ListOpenStudiesResponse(studies=self.offers)
        offers = [pb.StudyOffer(study=pb.StudyInfo(name=n, model=pb.ModelSpec(kind="mlp"), total_rounds=1),
                                status="running", local_epochs=1, is_default=d)
                  for n in self.names for d in (False, True)]
        return pb.ListOpenStudiesResponse(studies=offers)

    def Join(self, request: Any, context: Any) -> pb.JoinResponse:
        """Answers for another study than the one asked for (or, for the default, a path)."""
        name = "other-study" if request.study else "../../escaped-T"
        self.joins.append(request.study)
        return pb.JoinResponse(session_id="s", study=pb.StudyInfo(name=name), heartbeat_interval_seconds=1,
                               lineage_public_key=raw_public_key(self._key))

    def DeclineStudy(self, request: Any, context: Any) -> pb.DeclineStudyResponse:
        self.declined.append((request.study, request.reason))
        return pb.DeclineStudyResponse()

    def PullModel(self, request: Any, context: Any) -> Iterator[pb.PullModelResponse]:
        study, version, sha, data = request.study, request.version, self.sha, self.data
        record_version = version
        if self.lie == "version":
            version -= 1  # an older version, say one before a fix
        elif self.lie == "study":
            study = "other-study"
        elif self.lie == "sha":
            data = data[:-1] + b"!"  # the bytes are not the ones announced
        elif self.lie == "record":
            record_version = version + 1  # a real signature, over another version's record
        record = canonical_bytes(build_record(
            version=record_version, round=record_version, study=study, federation="lying", parent_sha256="0" * 64,
            model_sha256=sha, contributions=[], aggregator={"name": "fedavg"}, central_dp=None, code_version="x"))
        yield pb.PullModelResponse(model=pb.PublishedModel(
            study=study, version=version, sha256=sha, size_bytes=len(data), model=pb.ModelSpec(kind="mlp"),
            round=version, lineage_record=record, lineage_signature=sign_record(record, self._key),
            lineage_public_key=raw_public_key(self._key), federation="lying"))
        for offset in range(0, len(data), 512):
            piece = data[offset:offset + 512]
            yield pb.PullModelResponse(chunk=tensor_pb2.Chunk(offset=offset, data=piece,
                                                              sha256=hashlib.sha256(piece).digest()))


@pytest.fixture
def hostile(pki: Any) -> Iterator[tuple[HostileCoordinator, int]]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    cert, key = pki.coordinator
    servicer = HostileCoordinator(names=EVIL_NAMES, key=Ed25519PrivateKey.generate())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials_from(
        TlsConfig(ca_cert=pki.ca_cert, cert=cert, key=key)))
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(grace=None)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# ------------------------------------------------------------ (b) path traversal
def test_study_names_that_are_paths_are_declined_and_create_nothing(pki: Any, hostile: Any, tmp_path: Path) -> None:
    servicer, port = hostile
    root = tmp_path / "root"
    state = root / "deep" / "er" / "state"  # ../../escaped-T from studies/ would land in root/deep/er
    outside = tmp_path / "abs" / "path"
    servicer.names = [*EVIL_NAMES, str(outside)]
    config = institution_config("hospital-a", address=f"127.0.0.1:{port}", index=0, parts=2, state_root=root)
    config = config.model_copy(update={
        "institution": config.institution.model_copy(update={"state_dir": state}),
        "tls": _tls(pki, "hospital-a"), "policy": PolicyConfig(studies=["*"]),
        "privacy": PrivacyConfig(target_epsilon=1.0, accountant="gdp")})
    before = _files(tmp_path)
    agent = InstitutionAgent(config=config, list_every_s=0.05)
    assert agent.run() is True  # nothing it could accept: it ends
    agent.close()
    created = _files(tmp_path) - before
    assert created == set(), sorted(map(str, created))  # not even state_dir: nothing was accepted
    assert not Path("/abs/path").exists() and not outside.exists()
    assert not (root / "deep" / "er" / "escaped-T").exists() and not (root / "escaped-T").exists()
    told = {name for name, reason in servicer.declined if reason == "STUDY_NAME_INVALID"}
    # Each name is told once (a NUL cannot travel in a proto string, so that one the
    # coordinator may never hear of; it is declined all the same).
    assert told >= {n for n in servicer.names if "\x00" not in n}, servicer.declined
    assert all(reason == "STUDY_NAME_INVALID" for _, reason in servicer.declined)
    assert len(servicer.declined) <= 2 * len(servicer.names)


def test_the_default_policy_takes_one_default_study_and_no_submitted_one(pki: Any, hostile: Any,
                                                                        tmp_path: Path) -> None:
    """A coordinator cannot enrol a site with no policy.studies in a study by calling
    it the default, nor in a submitted one."""
    servicer, port = hostile

    def offer(name: str, default: bool) -> pb.StudyOffer:
        return pb.StudyOffer(study=pb.StudyInfo(name=name, model=pb.ModelSpec(kind="mlp")), status="running",
                             local_epochs=1, is_default=default)

    servicer.offers = [offer("tiny", True), offer("tiny-again", True), offer("copy", False)]
    config = InstitutionConfig(
        institution=InstitutionInfo(name="hospital-a", coordinator=f"127.0.0.1:{port}", state_dir=tmp_path / "s",
                                    trainer="synthetic"), tls=_tls(pki, "hospital-a"))
    started: list[tuple[str, str]] = []

    class Ended:
        def __init__(self, study: str) -> None:
            self.study = study

        def expect_study(self, name: str) -> None:
            started.append((self.study, name))

        def run(self, *, stop: threading.Event) -> bool:
            return True

    agent = InstitutionAgent(config=config, list_every_s=0.05, make_daemon=lambda cfg, study: Ended(study))  # type: ignore[arg-type,return-value]
    assert agent.run() is True
    assert started == [("", "tiny")]
    assert {n: d.reason for n, d in agent.decisions.items()} == {
        "tiny": "", "tiny-again": "DEFAULT_STUDY_CHANGED", "copy": "STUDY_NOT_ACCEPTED"}
    again = InstitutionAgent(config=config, list_every_s=0.05)  # a restart remembers which default it took
    servicer.offers = [offer("tiny-2", True)]
    assert again.run() is True and again.decisions["tiny-2"].reason == "DEFAULT_STUDY_CHANGED"
    assert sorted(servicer.declined) == [("copy", "STUDY_NOT_ACCEPTED"), ("tiny-2", "DEFAULT_STUDY_CHANGED"),
                                         ("tiny-again", "DEFAULT_STUDY_CHANGED")]


@pytest.mark.parametrize(("study", "expect", "reason"), [
    ("cardio", "", "STUDY_MISMATCH"),  # asked to join cardio, answered for other-study
    ("", "tiny", "STUDY_MISMATCH"),  # the default study, accepted as "tiny"
    ("", "", "STUDY_NAME_INVALID"),  # the default study, answered with a path for a name
])
def test_a_join_answered_for_another_study_is_refused(pki: Any, hostile: Any, tmp_path: Path, study: str,
                                                     expect: str, reason: str) -> None:
    """The study's name keys its spend in the site's ledger: the daemon takes part only
    in the study it was started for."""
    from fedcollab.institution import DaemonEvent, daemon_from_config

    servicer, port = hostile
    config = InstitutionConfig(
        institution=InstitutionInfo(name="hospital-a", coordinator=f"127.0.0.1:{port}", state_dir=tmp_path / "s",
                                    trainer="synthetic"), tls=_tls(pki, "hospital-a"))
    stop = threading.Event()
    events: list[DaemonEvent] = []

    def seen(event: DaemonEvent) -> None:
        events.append(event)
        if event.kind in ("refused", "joined"):
            stop.set()

    daemon = daemon_from_config(config, on_event=seen, study=study)
    if expect:
        daemon.expect_study(expect)
    assert daemon.run(stop=stop) is False
    assert [e.kind for e in events] == ["refused"] and events[0].detail.startswith(reason), events
    assert servicer.joins == [study]
    assert not (tmp_path / "s").exists() and not (tmp_path / "escaped-T").exists()


# ------------------------------------------------------------ (c) model pull
def _partner(pki: Any, port: int, tmp_path: Path) -> Path:
    cert, key = pki.institutions["hospital-a"]
    path = tmp_path / "partner.toml"
    path.write_text(f'[institution]\nname = "hospital-a"\ncoordinator = "127.0.0.1:{port}"\n'
                    f'state_dir = "{tmp_path / "state"}"\ntrainer = "synthetic"\n'
                    f'[tls]\nca_cert = "{pki.ca_cert}"\ncert = "{cert}"\nkey = "{key}"\n', encoding="utf-8")
    return path


@pytest.mark.parametrize(("lie", "message"), [
    ("version", "sent v2 of study 'study-b' instead"),
    ("study", "sent v3 of study 'other-study' instead"),
    ("sha", "the file's SHA-256 is"),
    ("record", "lineage record is v4's, the model is handed out as v3"),
])
def test_a_pull_answered_with_another_version_study_or_bytes_is_refused(
        pki: Any, hostile: Any, tmp_path: Path, lie: str, message: str) -> None:
    servicer, port = hostile
    out = tmp_path / "pulled"
    args = argparse.Namespace(study="study-b", version=3, config=str(_partner(pki, port, tmp_path)), out=str(out),
                              insecure=False, force_insecure=False)
    servicer.lie = lie
    with pytest.raises(FedcollabError, match=message) as refused:
        cmd_model_pull(args)
    assert "nothing saved" in str(refused.value)
    assert list(out.iterdir()) == []  # not the model, not its card, not a partial file
    servicer.lie = ""  # the same server telling the truth: saved (so the refusals above were for the lies)
    assert cmd_model_pull(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["study-b-v3.card.json", "study-b-v3.safetensors"]
