"""Operators and partners, end to end over mutual TLS: an operator submits studies
through the Operator service (with its certificate), a queued one is cancelled,
institutions accept or decline each by their site policy, two studies run side by
side with their own rounds and models, a version is published, pulled by a partner
(hash and signature checked, model card saved) and served; membership suspends and
re-approves an institution. The CLI is used as operators and partners use it."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedcollab.cli import main
from fedcollab.config import PolicyConfig, PrivacyConfig, TlsConfig
from fedcollab.coordinator import Coordinator
from fedcollab.institution._agent import DECISIONS_FILE, InstitutionAgent
from fedcollab.lineage import verify_chain
from fedcollab.pki import issue_ephemeral
from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc
from fedcollab.v1 import operator_service_pb2 as opb
from fedcollab.v1 import operator_service_pb2_grpc as opb_grpc
from fedcollab.wire import from_rpc_error
from tests.conftest import institution_config, tiny_federation, wait_until

pytestmark = pytest.mark.integration
Code = grpc.StatusCode
NAMES = ["hospital-a", "hospital-b", "lab-c"]

STUDY_B = """
[study]
name = "study-b"
rounds = 2
min_institutions = 2
round_timeout_s = 30
evaluation_timeout_s = 10
[study.model]
kind = "mlp"
params = { in_features = 64, hidden = [16], num_classes = 10 }
[study.train]
local_epochs = 1
batch_size = 32
learning_rate = 0.01
optimizer = "adam"
"""
# start_after is a top-level key: it must come before [study]; TOML puts it in the last table otherwise.
STUDY_C = 'start_after = "study-b"\n' + STUDY_B.replace('name = "study-b"', 'name = "study-c"')


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    out = capsys.readouterr()
    return int(done.value.code or 0), out.out + out.err


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("studies")
    pki = issue_ephemeral(directory=root / "pki", federation="consortium", institutions=NAMES, operators=["op"])
    cert, key = pki.coordinator
    base = tiny_federation(root / "coordinator", rounds=2, min_institutions=3, central_evaluation=None)
    config = base.model_copy(update={"server": base.server.model_copy(update={
        "tls": TlsConfig(ca_cert=pki.ca_cert, cert=cert, key=key, crl=pki.crl)})})
    with Coordinator(config=config) as coordinator:
        yield root, pki, coordinator


def _operator_args(pki: Any, coordinator: Coordinator) -> list[str]:
    cert, key = pki.operators["op"]
    return ["--coordinator", f"127.0.0.1:{coordinator.port}", "--ca", str(pki.ca_cert), "--cert", str(cert),
            "--key", str(key)]


def _institution(root: Path, pki: Any, coordinator: Coordinator, name: str, **policy: Any) -> Any:
    config = institution_config(name, address=f"127.0.0.1:{coordinator.port}", index=NAMES.index(name), parts=3,
                                state_root=root)
    cert, key = pki.institutions[name]
    return config.model_copy(update={"tls": TlsConfig(ca_cert=pki.ca_cert, cert=cert, key=key),
                                     "policy": PolicyConfig(**policy)})


def _channel(pki: Any, coordinator: Coordinator, group: str, name: str) -> grpc.Channel:
    cert, key = getattr(pki, group)[name]
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes(),
                                         private_key=Path(key).read_bytes(), certificate_chain=Path(cert).read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{coordinator.port}", creds)


def _refused(call: Any, code: Code, reason: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert from_rpc_error(err.value).reason == reason, err.value.details()
    return str(err.value.details())


@pytest.fixture(scope="module")
def ran(consortium: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Studies submitted and run to their end by three institutions' agents."""
    root, pki, coordinator = consortium
    op = opb_grpc.OperatorServiceStub(_channel(pki, coordinator, "operators", "op"))
    folder = tmp_path_factory.mktemp("files")
    (folder / "b.toml").write_text(STUDY_B, encoding="utf-8")
    (folder / "c.toml").write_text(STUDY_C, encoding="utf-8")
    b = op.SubmitStudy(opb.SubmitStudyRequest(study_toml=STUDY_B), timeout=10)
    c = op.SubmitStudy(opb.SubmitStudyRequest(study_toml=STUDY_C), timeout=10)
    assert (b.status, c.status, c.start_after) == ("running", "queued", "study-b")
    op.ChangeStudy(opb.ChangeStudyRequest(study="study-c", action="cancel", reason="superseded"), timeout=40)
    # A site names the studies it takes part in (the default policy takes the default study only).
    named = {"studies": ["tiny", "study-b", "study-c"]}
    agents = {
        "hospital-a": InstitutionAgent(config=_institution(root, pki, coordinator, "hospital-a", **named),
                                       list_every_s=0.2),
        # One site budget for both studies on its data, each within a sub-limit of 8.
        "hospital-b": InstitutionAgent(config=_institution(
            root, pki, coordinator, "hospital-b", **named, budgets={"tiny": 8.0, "study-b": 8.0}).model_copy(
            update={"privacy": PrivacyConfig(target_epsilon=8.0, budget_epsilon=16.0, accountant="rdp")}),
            list_every_s=0.2),
        "lab-c": InstitutionAgent(config=_institution(root, pki, coordinator, "lab-c", studies=["tiny"]),
                                  list_every_s=0.2),
    }
    # The default study needs all three; study-b's quorum is two, and lab-c declines it.
    results: dict[str, bool] = {}
    threads = [threading.Thread(target=lambda n=n, a=a: results.__setitem__(n, a.run()), daemon=True)
               for n, a in agents.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert results == {n: True for n in NAMES}, results
    wait_until(coordinator.studies.all_ended, timeout=10, what="every study recorded as ended")
    return root, pki, coordinator, op, agents


def test_studies_run_side_by_side_each_with_its_own_rounds_and_models(ran: Any) -> None:
    root, pki, coordinator, op, agents = ran
    summaries = {s.name: s for s in op.ListStudies(opb.ListStudiesRequest(), timeout=10).studies}
    assert {n: (s.status, s.rounds_committed) for n, s in summaries.items()} == {
        "tiny": ("finished", 2), "study-b": ("finished", 2), "study-c": ("cancelled", 0)}
    assert summaries["study-c"].reason == "cancelled by op: superseded"
    assert summaries["study-b"].submitted_by == "op"
    runs = {r.name: r for r in coordinator.studies.runs()}
    for name, folder in (("tiny", root / "coordinator"), ("study-b", root / "coordinator" / "studies" / "study-b")):
        rounds = [r for r in runs[name].store.rounds() if r["status"] == "committed"]
        assert [r["round"] for r in rounds] == [1, 2]
        assert verify_chain(folder).ok, name  # its own signed chain, under the coordinator's one key
    contributors_b = {p["institution"] for p in runs["study-b"].store.participations() if p["status"] == "done"}
    assert contributors_b == {"hospital-a", "hospital-b"}
    # Each study's models are its own files; the institutions kept each study's state apart.
    assert (root / "hospital-a" / "studies" / "study-b" / "models").is_dir()
    assert not (root / "lab-c" / "studies").exists()


def test_a_declined_study_is_recorded_on_both_sides_with_its_reason(ran: Any) -> None:
    root, pki, coordinator, op, agents = ran
    summaries = {s.name: s for s in op.ListStudies(opb.ListStudiesRequest(), timeout=10).studies}
    why = summaries["study-b"].declined["lab-c"]
    assert why.startswith("STUDY_NOT_ACCEPTED: study 'study-b' matches none of policy.studies (tiny)"), why
    local = [json.loads(line) for line in (root / "lab-c" / DECISIONS_FILE).read_text().splitlines()]
    assert {(d["study"], d["accept"], d["reason"]) for d in local} >= {
        ("tiny", True, ""), ("study-b", False, "STUDY_NOT_ACCEPTED")}
    assert "hospital-a" not in summaries["study-b"].declined


def test_operator_calls_need_an_operator_and_a_bad_study_file_names_its_key(ran: Any,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root, pki, coordinator, op, agents = ran
    institution_op = opb_grpc.OperatorServiceStub(_channel(pki, coordinator, "institutions", "hospital-a"))
    _refused(lambda: institution_op.SubmitStudy(opb.SubmitStudyRequest(study_toml=STUDY_B), timeout=5),
             Code.PERMISSION_DENIED, "OPERATOR_ONLY")
    bad = STUDY_B.replace("rounds = 2", 'rounds = "many"').replace("study-b", "study-x")
    details = _refused(lambda: op.SubmitStudy(opb.SubmitStudyRequest(study_toml=bad), timeout=5),
                       Code.INVALID_ARGUMENT, "STUDY_INVALID")
    assert "study.rounds" in details
    _refused(lambda: op.SubmitStudy(opb.SubmitStudyRequest(study_toml=STUDY_B), timeout=5),
             Code.ALREADY_EXISTS, "STUDY_EXISTS")
    # The same through the command line: it prints the key at fault and exits 1.
    bad_file = root / "bad-study.toml"
    bad_file.write_text(bad, encoding="utf-8")
    code, out = _cli(capsys, "study", "submit", str(bad_file), *_operator_args(pki, coordinator))
    assert code == 1 and "study.rounds" in out, out
    code, out = _cli(capsys, "study", "list", *_operator_args(pki, coordinator))
    assert code == 0 and "study-b" in out and "cancelled" in out, out


def test_a_published_version_is_pulled_verified_and_served(ran: Any, capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    root, pki, coordinator, op, agents = ran
    partner = root / "hospital-a.toml"
    config = _institution(root, pki, coordinator, "hospital-a")
    _write_institution_toml(partner, config)
    # Not published yet: nothing to pull.
    code, out = _cli(capsys, "model", "pull", "2", "--study", "study-b", "--config", str(partner),
                     "--out", str(tmp_path / "pulled"))
    assert code == 1 and "VERSION_NOT_PUBLISHED" in out, out
    code, out = _cli(capsys, "model", "publish", "--study", "study-b", "--version", "2",
                     *_operator_args(pki, coordinator))
    assert code == 0, out
    code, out = _cli(capsys, "model", "list", "--config", str(partner))
    assert code == 0 and "study-b" in out, out
    code, out = _cli(capsys, "model", "versions", "--study", "study-b", *_operator_args(pki, coordinator))
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert code == 0 and len(rows) == 3 and all("ok" in r for r in rows), out  # v0, v1, v2, each signed
    assert "yes" in rows[2] and "yes" not in rows[1], out  # only v2 is published
    code, out = _cli(capsys, "model", "pull", "2", "--study", "study-b", "--config", str(partner),
                     "--out", str(tmp_path / "pulled"))
    assert code == 0, out
    model_file = tmp_path / "pulled" / "study-b-v2.safetensors"
    from fedcollab.registry import ModelCard, card_path_for, verify_model_file

    card = ModelCard.from_json(card_path_for(model_file).read_text(), source="card")
    verify_model_file(model_file=model_file, card=card)
    run = next(r for r in coordinator.studies.runs() if r.name == "study-b")
    assert card.sha256 == next(m.sha256 for m in run.store.models() if m.version == 2)
    assert (card.study, card.version, card.rounds, sorted(card.contributors)) == (
        "study-b", 2, 2, ["hospital-a", "hospital-b"])
    assert card.model == {"kind": "mlp", "params": {"in_features": 64, "hidden": [16], "num_classes": 10}}
    # hospital-b trained with DP-SGD: its spend, as the signed record states it, is on the card.
    assert set(card.privacy) == {"hospital-b"} and 0 < card.privacy["hospital-b"]["epsilon"] <= 8.0
    assert card.privacy["hospital-b"]["budget_epsilon"] == 8.0

    # A partner that pins another key refuses the signature and saves nothing.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = tmp_path / "other-key.pem"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    pinned = config.model_copy(update={"institution": config.institution.model_copy(
        update={"lineage_public_key": other})})
    _write_institution_toml(partner, pinned)
    code, out = _cli(capsys, "model", "pull", "2", "--study", "study-b", "--config", str(partner),
                     "--out", str(tmp_path / "refused"))
    assert code == 1 and "does not verify" in out and "nothing saved" in out, out
    assert list((tmp_path / "refused").iterdir()) == []

    # The pulled model answers predictions (gRPC and HTTP) without code of the partner's.
    import numpy as np
    from sklearn.datasets import load_digits

    from fedcollab.serving import ModelServer

    digits = load_digits()
    x = (digits.data[:64] / 16.0).astype(np.float32)
    with ModelServer(model_file=model_file, grpc_address="127.0.0.1:0", http_address="127.0.0.1:0") as server:
        import urllib.request

        body = json.dumps({"instances": x.tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v1/predict", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = json.loads(response.read())["predictions"]
    labels = np.array([p["label"] for p in predictions])
    import torch
    from safetensors.torch import load_file

    from fedcollab.models import build_model

    model = build_model(kind="mlp", params=card.model["params"])
    model.load_state_dict(load_file(str(model_file)))
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    assert (labels == expected).all()  # the served model is the pulled one
    assert (labels == digits.target[:64]).mean() > 0.2  # two rounds, one institution under DP: above chance


def test_a_suspended_institution_is_refused_until_approved(ran: Any, capsys: pytest.CaptureFixture[str]) -> None:
    root, pki, coordinator, op, agents = ran
    lab = pb_grpc.CoordinatorServiceStub(_channel(pki, coordinator, "institutions", "lab-c"))
    lab.ListStudies(pb.ListOpenStudiesRequest(), timeout=5)
    code, out = _cli(capsys, "institutions", "suspend", "lab-c", "--reason", "audit pending",
                     *_operator_args(pki, coordinator))
    assert code == 0 and "suspended" in out, out
    details = _refused(lambda: lab.ListStudies(pb.ListOpenStudiesRequest(), timeout=5), Code.PERMISSION_DENIED,
                       "INSTITUTION_SUSPENDED")
    assert "audit pending" in details
    _refused(lambda: lab.Join(pb.JoinRequest(), timeout=5), Code.PERMISSION_DENIED, "INSTITUTION_SUSPENDED")
    code, out = _cli(capsys, "institutions", "list", *_operator_args(pki, coordinator))
    assert code == 0 and "lab-c" in out and "suspended" in out, out
    _cli(capsys, "institutions", "approve", "lab-c", *_operator_args(pki, coordinator))
    lab.ListStudies(pb.ListOpenStudiesRequest(), timeout=5)


def test_a_paused_study_opens_no_round_until_resumed(tmp_path: Path) -> None:
    """Plaintext: operator calls carry the state folder's operator token, or are refused."""
    config = tiny_federation(tmp_path / "c", rounds=1, min_institutions=1, central_evaluation=None)
    with Coordinator(config=config) as coordinator:
        channel = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}")
        op = opb_grpc.OperatorServiceStub(channel)
        _refused(lambda: op.ListStudies(opb.ListStudiesRequest(), timeout=5), Code.UNAUTHENTICATED,
                 "OPERATOR_CREDENTIAL_REQUIRED")
        token = [("authorization", f"Bearer {coordinator.operator_token}")]
        assert op.ChangeStudy(opb.ChangeStudyRequest(study="tiny", action="pause"), metadata=token,
                              timeout=5).status == "paused"
        stub = pb_grpc.CoordinatorServiceStub(channel)
        session = stub.Join(pb.JoinRequest(institution="site-a"), timeout=5).session_id
        task = stub.PollTask(pb.PollTaskRequest(session_id=session, wait_seconds=1.5), timeout=5).task
        assert task.kind == pb.TASK_KIND_WAIT and coordinator.store.rounds() == []
        op.ChangeStudy(opb.ChangeStudyRequest(study="tiny", action="resume"), metadata=token, timeout=5)
        task = stub.PollTask(pb.PollTaskRequest(session_id=session, wait_seconds=5), timeout=10).task
        assert task.kind == pb.TASK_KIND_TRAIN


def _write_institution_toml(path: Path, config: Any) -> None:
    i, d, t = config.institution, config.data, config.tls
    lines = [
        "[institution]", f'name = "{i.name}"', f'coordinator = "{i.coordinator}"', f'state_dir = "{i.state_dir}"',
        *([f'lineage_public_key = "{i.lineage_public_key}"'] if i.lineage_public_key else []),
        "[data]", f'dataset = "{d.dataset}"',
        "[tls]", f'ca_cert = "{t.ca_cert}"', f'cert = "{t.cert}"', f'key = "{t.key}"',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_submitted_studies_and_their_states_survive_a_restart(tmp_path: Path) -> None:
    config = tiny_federation(tmp_path / "c", rounds=1, min_institutions=1, central_evaluation=None)
    paused = STUDY_B.replace("study-b", "study-p")
    with Coordinator(config=config) as coordinator:
        op = opb_grpc.OperatorServiceStub(grpc.insecure_channel(f"127.0.0.1:{coordinator.port}"))
        token = [("authorization", f"Bearer {coordinator.operator_token}")]
        for text in (STUDY_B, STUDY_C, paused):
            op.SubmitStudy(opb.SubmitStudyRequest(study_toml=text), metadata=token, timeout=10)
        op.ChangeStudy(opb.ChangeStudyRequest(study="study-p", action="pause", reason="data check"), metadata=token,
                       timeout=10)
        before = {s.name: (s.status, s.reason) for s in op.ListStudies(opb.ListStudiesRequest(), metadata=token,
                                                                         timeout=10).studies}
    assert before == {"tiny": ("running", ""), "study-b": ("running", ""), "study-c": ("queued", ""),
                      "study-p": ("paused", "paused by operator-token: data check")}
    with Coordinator(config=config) as coordinator:
        op = opb_grpc.OperatorServiceStub(grpc.insecure_channel(f"127.0.0.1:{coordinator.port}"))
        token = [("authorization", f"Bearer {coordinator.operator_token}")]
        after = {s.name: (s.status, s.reason) for s in op.ListStudies(opb.ListStudiesRequest(), metadata=token,
                                                                        timeout=10).studies}
        assert after == before
        runs = {r.name: r for r in coordinator.studies.runs()}
        assert runs["study-p"].engine.paused and not runs["study-b"].engine.paused
        # A resumed study goes on from its own state: an institution joins it and gets its first round.
        op.ChangeStudy(opb.ChangeStudyRequest(study="study-p", action="resume"), metadata=token, timeout=10)
        stub = pb_grpc.CoordinatorServiceStub(grpc.insecure_channel(f"127.0.0.1:{coordinator.port}"))
        joined = stub.Join(pb.JoinRequest(institution="site-a", study="study-p"), timeout=5)
        assert joined.study.name == "study-p" and joined.session_id.startswith("study-p.")
        _refused(lambda: stub.Join(pb.JoinRequest(institution="site-a", study="study-c"), timeout=5),
                 Code.FAILED_PRECONDITION, "STUDY_NOT_STARTED")
        _refused(lambda: stub.Join(pb.JoinRequest(institution="site-a", study="nope"), timeout=5),
                 Code.NOT_FOUND, "STUDY_UNKNOWN")


def test_the_site_keeps_one_privacy_ledger_for_every_study(ran: Any, capsys: pytest.CaptureFixture[str]) -> None:
    root, pki, coordinator, op, agents = ran
    config_file = root / "hospital-b.toml"
    _write_institution_toml(config_file, _institution(root, pki, coordinator, "hospital-b"))
    code, out = _cli(capsys, "institution", "ledger", "--config", str(config_file), "--json")
    rows = json.loads(out)
    assert code == 0 and sorted(r["study"] for r in rows) == ["study-b", "study-b", "tiny", "tiny"], out
    # Each study's own spend within its sub-limit, the site's composed over both within its budget.
    assert all(r["epsilon"] <= r["budget_epsilon"] == 8.0 for r in rows), out
    assert all(r["site_epsilon"] <= r["site_budget_epsilon"] == 16.0 for r in rows), out
    last = {r["study"]: r["epsilon"] for r in rows}
    assert rows[-1]["site_epsilon"] > max(last.values())  # both studies count against the site
    for study in ("tiny", "study-b"):
        code, out = _cli(capsys, "institution", "ledger", "--config", str(config_file), "--study", study, "--json")
        assert code == 0 and [r["study"] for r in json.loads(out)] == [study, study], out
    code, out = _cli(capsys, "institution", "ledger", "--config", str(config_file), "--verify")
    assert code == 0 and "ledger intact: 4 rows" in out, out
    assert not list((root / "hospital-b" / "studies").glob("*/privacy-ledger.sqlite"))
