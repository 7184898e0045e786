"""A real coordinator on port 0 and real daemons over gRPC, plaintext and mutual TLS."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from fedcollab.coordinator import Coordinator
from fedcollab.coordinator._bounds import water_fill
from tests.conftest import (
    institution_config,
    recording_daemon,
    running,
    tiny_federation,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["plaintext", "mutual-tls"])
def test_rounds_commit_the_example_weighted_average(tmp_path: Path, test_ca, mode: str) -> None:
    names = ["hospital-a", "hospital-b", "lab-c"]
    server_creds, client_creds = (test_ca.mutual_tls(names) if mode == "mutual-tls"
                                  else (None, {n: None for n in names}))
    config = tiny_federation(tmp_path / "coordinator")
    with Coordinator(config=config, credentials=server_creds) as coordinator:
        pairs = [recording_daemon(institution_config(n, address=f"127.0.0.1:{coordinator.port}", index=i,
                                                     parts=3, state_root=tmp_path),
                                  credentials=client_creds[n])
                 for i, n in enumerate(names)]
        with running([d for d, _ in pairs]) as outcome:
            assert coordinator.wait(timeout=90), "study did not finish"
            wait_until(lambda: len(outcome) == len(names), timeout=20, what="daemons to see the study finish")
        models = {m.version: m for m in coordinator.store.models()}
        rounds = [r for r in coordinator.store.rounds() if r["status"] == "committed"]
        evaluations = coordinator.store.evaluations()
        parents = coordinator.store.model_parents()

    assert outcome == {n: True for n in names}, "every daemon should see the study finish"
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert parents == {0: None, 1: 0, 2: 1, 3: 2}
    trainers = [t for _, t in pairs]
    for r in (1, 2, 3):
        # Example-weighted, with no institution above the default max_weight_share (0.5).
        claimed = [t.sent[r] for t in trainers]
        counted = water_fill({str(i): n for i, (n, _) in enumerate(claimed)}, max_share=0.5)
        sent = [(counted[str(i)], state) for i, (_, state) in enumerate(claimed)]
        total = sum(n for n, _ in sent)
        committed = load_file(str(models[r].path))
        for name, value in committed.items():
            expected = sum(n * state[name].double() for n, state in sent) / total
            torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
        m = rounds[r - 1]["metrics"]
        assert m["num_updates"] == 3 and m["num_examples"] == total
        assert 0.0 < m["central_accuracy"] <= 1.0 and m["central_examples"] == 360
        assert m["eval_institutions"] == 3 and 0.0 < m["eval_accuracy"] <= 1.0
        # bytes moved: each institution downloaded this round's base and uploaded one update
        assert m["bytes_in"] == 3 * 1210 * 4
    assert {(e["round"], e["institution"]) for e in evaluations} == {(r, n) for r in (1, 2, 3) for n in names}
    assert rounds[-1]["metrics"]["central_accuracy"] > rounds[0]["metrics"]["central_accuracy"]


def test_institution_without_client_certificate_is_refused(tmp_path: Path, test_ca) -> None:
    from fedcollab.errors import RemoteError
    from fedcollab.institution import CoordinatorClient

    server = test_ca.issue("coordinator", server=True)
    creds = grpc.ssl_server_credentials([(server.key, server.cert)], root_certificates=test_ca.pem,
                                        require_client_auth=True)
    with Coordinator(config=tiny_federation(tmp_path / "c"), credentials=creds) as coordinator:
        client = CoordinatorClient(address=f"127.0.0.1:{coordinator.port}",
                                   credentials=grpc.ssl_channel_credentials(root_certificates=test_ca.pem),
                                   rpc_timeout_s=5)
        with pytest.raises(RemoteError) as err:
            client.join(institution="outsider", num_train_examples=1)
        client.close()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
