"""`fedcollab serve` end to end: a real model trained on digits, saved with safetensors,
carded and signed, served over real gRPC and HTTP on loopback (port 0), and asserted
against a direct forward pass; bad inputs, status by status; refusals at load."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from fedcollab.lineage import raw_public_key
from fedcollab.models import build_model, lora_base_sha256
from fedcollab.registry import CardError, ModelCard, card_path_for, write_card
from fedcollab.serving import LoadedModel, ModelServer, ServingError
from fedcollab.v1 import serving_service_pb2 as spb
from fedcollab.v1 import serving_service_pb2_grpc as spb_grpc
from fedcollab.wire import from_rpc_error
from tests._pki import TestCA
from tests.unit.test_model_card import signed_card

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MLP = {"kind": "mlp", "params": {"in_features": 64, "hidden": [32], "num_classes": 10}}
MAX_BATCH = 32


@dataclass
class Served:
    model: torch.nn.Module
    file: Path
    card: ModelCard
    key: Ed25519PrivateKey


def _save(model: torch.nn.Module, path: Path, *, key: Ed25519PrivateKey, spec: dict[str, Any]) -> Served:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    card = signed_card(path, key=key, model=spec)
    write_card(card, card_path_for(path))
    return Served(model=model.eval(), file=path, card=card, key=key)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return (load_digits().data / 16.0).astype(np.float32)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory, digits: np.ndarray) -> Served:
    """An MLP trained 40 full-batch Adam steps on digits: confident, non-uniform outputs."""
    model = build_model(kind=MLP["kind"], params=MLP["params"], seed=0)
    x, y = torch.from_numpy(digits), torch.from_numpy(load_digits().target)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return _save(model, tmp_path_factory.mktemp("mlp") / "digits-v3.safetensors", key=Ed25519PrivateKey.generate(),
                 spec=MLP)


@pytest.fixture(scope="module")
def server(mlp: Served) -> Iterator[ModelServer]:
    with ModelServer(model_file=mlp.file, public_key=raw_public_key(mlp.key), grpc_address="127.0.0.1:0",
                     http_address="127.0.0.1:0", max_batch=MAX_BATCH) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server: ModelServer) -> Iterator[spb_grpc.PredictionServiceStub]:
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield spb_grpc.PredictionServiceStub(channel)


def expected(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1).numpy()
    return probs.argmax(axis=1), probs


def request(port: int, method: str, path: str, body: bytes | None = None, *,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def predict_http(port: int, instances: Any) -> tuple[int, dict[str, Any]]:
    return request(port, "POST", "/v1/predict", json.dumps({"instances": instances}).encode())


# ------------------------------------------------------------------ predictions
def test_grpc_predictions_match_a_direct_forward_pass(mlp: Served, stub: Any, digits: np.ndarray) -> None:
    x = digits[:MAX_BATCH]
    reply = stub.Predict(spb.PredictRequest(shape=list(x.shape), values=x.ravel().tolist()), timeout=10)
    labels, probs = expected(mlp.model, torch.from_numpy(x))
    assert reply.num_classes == 10 and reply.model_version == 3 and reply.model_sha256 == mlp.card.sha256
    assert [p.label for p in reply.predictions] == labels.tolist()
    np.testing.assert_allclose([list(p.probabilities) for p in reply.predictions], probs, rtol=1e-5, atol=1e-6)
    assert (labels == load_digits().target[:MAX_BATCH]).mean() > 0.8, "the trained model is a real one"


def test_http_predictions_match_grpc_and_the_forward_pass(mlp: Served, server: ModelServer, stub: Any,
                                                           digits: np.ndarray) -> None:
    x = digits[100:110]
    status, body = predict_http(server.http_port, x.tolist())
    assert status == 200, body
    labels, probs = expected(mlp.model, torch.from_numpy(x))
    assert [p["label"] for p in body["predictions"]] == labels.tolist()
    np.testing.assert_allclose([p["probabilities"] for p in body["predictions"]], probs, rtol=1e-5, atol=1e-6)
    reply = stub.Predict(spb.PredictRequest(shape=list(x.shape), values=x.ravel().tolist()))
    np.testing.assert_allclose([list(p.probabilities) for p in reply.predictions],
                               [p["probabilities"] for p in body["predictions"]], rtol=1e-6)


def test_model_info_over_both(server: ModelServer, stub: Any, mlp: Served) -> None:
    info = stub.GetModelInfo(spb.GetModelInfoRequest())
    assert (info.study, info.version, info.sha256, info.kind) == ("digits", 3, mlp.card.sha256, "mlp")
    assert info.input.kind == spb.INPUT_KIND_FLOAT and list(info.input.shape) == [64]
    assert info.num_classes == 10 and info.max_batch == MAX_BATCH and info.lineage_key_pinned
    assert list(info.contributors) == ["hospital-a", "lab-b"]
    assert info.metrics["eval_accuracy"] == pytest.approx(0.91)
    assert info.privacy.max_epsilon == pytest.approx(1.5) and info.privacy.institutions[0].institution == "hospital-a"
    status, body = request(server.http_port, "GET", "/v1/model")
    assert status == 200
    assert body["sha256"] == info.sha256 and body["input"]["shape"] == [64] and body["input"]["kind"] == "float"
    assert body["lineage_key_fingerprint"] == info.lineage_key_fingerprint.strip()
    assert request(server.http_port, "GET", "/healthz") == (200, {"status": "ok", "study": "digits", "version": 3})


# ------------------------------------------------------------------ bad requests
def _row(n: int = 64, value: Any = 0.5) -> list[Any]:
    return [value] * n


BAD_HTTP: list[tuple[str, bytes, int, str]] = [
    ("not JSON", b"instances=1", 400, "NOT_JSON"),
    ("not UTF-8", b"\xff\xfe{", 400, "NOT_JSON"),
    ("no instances", b'{"inputs": [[1]]}', 400, "INPUT_FORMAT"),
    ("extra field", json.dumps({"instances": [_row()], "x": 1}).encode(), 400, "INPUT_FORMAT"),
    ("instances not a list", b'{"instances": 3}', 400, "INPUT_FORMAT"),
    ("empty batch", b'{"instances": []}', 400, "EMPTY_BATCH"),
    ("too few features", json.dumps({"instances": [_row(63)]}).encode(), 400, "INPUT_SHAPE"),
    ("an image, not flat", json.dumps({"instances": [[_row(8)] * 8]}).encode(), 400, "INPUT_SHAPE"),
    ("scalar instance", b'{"instances": [1.0]}', 400, "INPUT_SHAPE"),
    ("ragged", json.dumps({"instances": [[_row(8), _row(7)]]}).encode(), 400, "INPUT_SHAPE"),
    ("too deep", json.dumps({"instances": [[[[[[1.0]]]]]]}).encode(), 400, "INPUT_SHAPE"),
    ("NaN", b'{"instances": [[NaN' + b", 0" * 63 + b"]]}", 400, "INPUT_NOT_FINITE"),
    ("beyond float32", json.dumps({"instances": [_row(63) + [1e39]]}).encode(), 400, "INPUT_NOT_FINITE"),
    ("huge integer", json.dumps({"instances": [_row(63) + [10**400]]}).encode(), 400, "INPUT_NOT_FINITE"),
    ("a string", json.dumps({"instances": [_row(63) + ["1.5"]]}).encode(), 400, "INPUT_TYPE"),
    ("a boolean", json.dumps({"instances": [_row(63) + [True]]}).encode(), 400, "INPUT_TYPE"),
    ("null", json.dumps({"instances": [_row(63) + [None]]}).encode(), 400, "INPUT_TYPE"),
    ("batch too large", json.dumps({"instances": [_row()] * (MAX_BATCH + 1)}).encode(), 413, "BATCH_TOO_LARGE"),
]


@pytest.mark.parametrize(("body", "status", "reason"), [b[1:] for b in BAD_HTTP], ids=[b[0] for b in BAD_HTTP])
def test_bad_http_inputs_get_a_reason_and_the_server_keeps_answering(
        server: ModelServer, body: bytes, status: int, reason: str) -> None:
    got_status, got = request(server.http_port, "POST", "/v1/predict", body)
    assert (got_status, got["error"]["reason"]) == (status, reason), got
    assert len(got["error"]["message"]) > 20
    assert predict_http(server.http_port, [_row()])[0] == 200


def test_shape_errors_say_what_was_expected(server: ModelServer) -> None:
    _, body = predict_http(server.http_port, [_row(), _row(10)])
    message = body["error"]["message"]
    assert "instance 1" in message and "[10]" in message and "[64]" in message and "64 float features" in message
    _, body = predict_http(server.http_port, [_row(), _row(63) + [float("1e39")]])
    assert "instance 1, position [63]" in body["error"]["message"]


def test_wrong_paths_methods_and_bodies(server: ModelServer) -> None:
    port = server.http_port
    assert request(port, "GET", "/v2/predict")[0] == 404
    status, body = request(port, "GET", "/v1/predict")
    assert (status, body["error"]["reason"]) == (405, "METHOD_NOT_ALLOWED")
    assert request(port, "POST", "/v1/model", b"{}")[0] == 405
    # A body announced above 16 MiB is refused before it is read.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n\r\n")
        reply = s.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 413") and b"BODY_TOO_LARGE" in reply
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert s.makefile("rb").read().startswith(b"HTTP/1.1 411")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # garbage, then hang up
        s.sendall(b"\x16\x03\x01garbage\r\n\r\n")
    assert predict_http(port, [_row()])[0] == 200


def _grpc_reason(stub: Any, req: spb.PredictRequest) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(req, timeout=10)
    error = from_rpc_error(e.value)
    return error.code, error.reason, error.message


BAD_GRPC: list[tuple[str, spb.PredictRequest, str]] = [
    ("no shape", spb.PredictRequest(values=_row()), "INPUT_SHAPE"),
    ("wrong example shape", spb.PredictRequest(shape=[1, 63], values=_row(63)), "INPUT_SHAPE"),
    ("count does not match", spb.PredictRequest(shape=[2, 64], values=_row()), "INPUT_SHAPE"),
    ("negative dimension", spb.PredictRequest(shape=[-1, 64], values=_row()), "INPUT_SHAPE"),
    ("empty batch", spb.PredictRequest(shape=[0, 64]), "EMPTY_BATCH"),
    ("NaN", spb.PredictRequest(shape=[1, 64], values=_row(63) + [float("nan")]), "INPUT_NOT_FINITE"),
    ("infinity", spb.PredictRequest(shape=[1, 64], values=[float("inf")] + _row(63)), "INPUT_NOT_FINITE"),
    ("tokens for a float model", spb.PredictRequest(shape=[1, 64], tokens=[1] * 64), "INPUT_TYPE"),
    ("batch too large", spb.PredictRequest(shape=[MAX_BATCH + 1, 64], values=_row(64 * (MAX_BATCH + 1))),
     "BATCH_TOO_LARGE"),
]


@pytest.mark.parametrize(("req", "reason"), [b[1:] for b in BAD_GRPC], ids=[b[0] for b in BAD_GRPC])
def test_bad_grpc_inputs_are_invalid_argument_with_a_reason(stub: Any, req: spb.PredictRequest, reason: str) -> None:
    code, got, message = _grpc_reason(stub, req)
    assert (code, got) == (grpc.StatusCode.INVALID_ARGUMENT, reason), message
    assert stub.Predict(spb.PredictRequest(shape=[1, 64], values=_row()), timeout=10).predictions


def test_grpc_message_above_the_limit_is_resource_exhausted(stub: Any) -> None:
    values = _row(64 * 70_000)  # ~18 MB of floats on the wire
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(spb.PredictRequest(shape=[70_000, 64], values=values), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Predict(spb.PredictRequest(shape=[1, 64], values=_row()), timeout=10).predictions


# ------------------------------------------------------------------ refusals at load
def test_a_file_that_does_not_match_its_card_is_not_served(mlp: Served, tmp_path: Path) -> None:
    changed = tmp_path / mlp.file.name
    data = bytearray(mlp.file.read_bytes())
    data[-1] ^= 0xFF
    changed.write_bytes(bytes(data))
    write_card(mlp.card, card_path_for(changed))
    with pytest.raises(CardError) as e:
        ModelServer(model_file=changed, grpc_address="127.0.0.1:0", http_address="127.0.0.1:0")
    assert e.value.reason == "MODEL_MISMATCH"


def test_a_key_other_than_the_pinned_one_is_refused(mlp: Served) -> None:
    other = raw_public_key(Ed25519PrivateKey.generate())
    with pytest.raises(CardError, match="not the pinned"):
        ModelServer(model_file=mlp.file, public_key=other, grpc_address="127.0.0.1:0")


def test_a_missing_card_is_refused(mlp: Served, tmp_path: Path) -> None:
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(mlp.file.read_bytes())
    with pytest.raises(CardError, match="alone.card.json") as e:
        ModelServer(model_file=alone)
    assert e.value.reason == "CARD_MISSING"


def test_card_params_that_do_not_fit_the_file_are_refused(mlp: Served) -> None:
    wrong = ModelCard(**{**mlp.card.to_dict(), "model": {"kind": "mlp", "params": {**MLP["params"], "hidden": [16]}}})
    with pytest.raises(ServingError, match="do not fit the model its card describes"):
        LoadedModel.load(model_file=mlp.file, card=wrong)


def test_a_blob_is_not_servable(tmp_path: Path) -> None:
    spec = {"kind": "blob", "params": {"num_parameters": 100}}
    blob = _save(build_model(kind="blob", params=spec["params"]), tmp_path / "b-v3.safetensors",
                 key=Ed25519PrivateKey.generate(), spec=spec)
    with pytest.raises(ServingError, match="'blob' has no prediction to serve"):
        ModelServer(model_file=blob.file, grpc_address="127.0.0.1:0")


def test_a_port_in_use_is_a_clear_error(mlp: Served, server: ModelServer) -> None:
    clash = ModelServer(model_file=mlp.file, grpc_address="127.0.0.1:0", http_address=f"127.0.0.1:{server.http_port}")
    with pytest.raises(ServingError, match="cannot serve HTTP"):
        clash.start()
    assert clash._grpc is None, "the gRPC half was stopped again"


# ------------------------------------------------------------------ token models, TLS, CLI
@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Served:
    params: dict[str, Any] = {"vocab_size": 50, "seq_len": 8, "d_model": 16, "heads": 2, "layers": 1,
                              "num_classes": 3, "rank": 2}
    params["base_sha256"] = lora_base_sha256(params=params)
    model = build_model(kind="lora_transformer", params=params, seed=1)
    with torch.no_grad():  # adapters start as a no-op (B = 0): make them matter
        for name, p in model.net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return _save(model, tmp_path_factory.mktemp("lora") / "text-v3.safetensors", key=Ed25519PrivateKey.generate(),
                 spec={"kind": "lora_transformer", "params": params})


def test_lora_transformer_serves_token_ids(lora: Served) -> None:
    with ModelServer(model_file=lora.file, grpc_address="127.0.0.1:0", http_address="127.0.0.1:0") as s:
        # Two lengths in one HTTP request: run as two batches, answered in the request's order.
        instances = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [7, 8, 9]]
        status, body = predict_http(s.http_port, instances)
        assert status == 200, body
        for instance, got in zip(instances, body["predictions"], strict=True):
            label, probs = expected(lora.model, torch.tensor([instance]))
            assert got["label"] == label[0]
            np.testing.assert_allclose(got["probabilities"], probs[0], rtol=1e-5, atol=1e-6)
        for bad, reason in [([[1, 2, 50]], "TOKEN_OUT_OF_RANGE"), ([[1, -1]], "TOKEN_OUT_OF_RANGE"),
                            ([[1.0, 2.0]], "INPUT_TYPE"), ([list(range(9))], "INPUT_SHAPE")]:
            status, body = predict_http(s.http_port, bad)
            assert (status, body["error"]["reason"]) == (400, reason), body
        with grpc.insecure_channel(s.grpc_address) as channel:
            stub = spb_grpc.PredictionServiceStub(channel)
            info = stub.GetModelInfo(spb.GetModelInfoRequest())
            assert info.input.kind == spb.INPUT_KIND_TOKENS and info.input.vocab_size == 50
            assert info.input.max_length == 8
            reply = stub.Predict(spb.PredictRequest(shape=[2, 3], tokens=[1, 2, 3, 7, 8, 9]))
            _, probs = expected(lora.model, torch.tensor([[1, 2, 3], [7, 8, 9]]))
            np.testing.assert_allclose([list(p.probabilities) for p in reply.predictions], probs, rtol=1e-5, atol=1e-6)
            code, reason, _ = _grpc_reason(stub, spb.PredictRequest(shape=[1, 2], values=[1.0, 2.0]))
            assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TYPE")


def test_tls_on_both_endpoints(mlp: Served, tmp_path: Path) -> None:
    ca = TestCA()
    ca_file, cert, key = ca.write(tmp_path, "server", ca.issue("model-server", server=True))
    with ModelServer(model_file=mlp.file, grpc_address="127.0.0.1:0", http_address="127.0.0.1:0",
                     tls_cert=cert, tls_key=key) as s:
        assert s.http_url.startswith("https://")
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem)
        with grpc.secure_channel(s.grpc_address, credentials) as channel:
            info = spb_grpc.PredictionServiceStub(channel).GetModelInfo(spb.GetModelInfoRequest(), timeout=10)
            assert info.sha256 == mlp.card.sha256
        context = ssl.create_default_context(cafile=str(ca_file))
        conn = http.client.HTTPSConnection("127.0.0.1", s.http_port, context=context, timeout=10)
        conn.request("POST", "/v1/predict", body=json.dumps({"instances": [_row()]}))
        assert conn.getresponse().status == 200
        conn.close()
        with pytest.raises(ssl.SSLError):  # a client that does not trust the CA
            http.client.HTTPSConnection("127.0.0.1", s.http_port, context=ssl.create_default_context(),
                                        timeout=10).request("GET", "/healthz")
        conn = http.client.HTTPSConnection("127.0.0.1", s.http_port, context=context, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200, "a failed handshake does not stop the server"
        conn.close()


def test_half_tls_is_refused(mlp: Served, tmp_path: Path) -> None:
    from fedcollab.errors import ConfigError

    with pytest.raises(ConfigError, match="both"):
        ModelServer(model_file=mlp.file, tls_cert=tmp_path / "cert.pem")


def test_cli_serves_until_sigterm(mlp: Served, tmp_path: Path) -> None:
    pem = tmp_path / "lineage-public-key.pem"
    from cryptography.hazmat.primitives import serialization

    pem.write_bytes(mlp.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    env = {**os.environ, "COLUMNS": "80", "PYTHONUNBUFFERED": "1"}  # a narrow terminal: hashes still whole
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedcollab", "serve", "--model", str(mlp.file), "--public-key", str(pem),
         "--grpc-address", "127.0.0.1:0", "--http-address", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        output = "".join(lines)
        url = re.search(r"HTTP\s+(http://127\.0\.0\.1:\d+)", output)
        assert url, output
        assert "(pinned)" in output and "curl" in output and "/v1/predict" in output
        sha256 = hashlib.sha256(mlp.file.read_bytes()).hexdigest()
        assert re.search(rf"^sha256\s+{sha256}$", output, flags=re.M), output
        assert re.search(r"^lineage\s+signature verified with ed25519:[0-9a-f]{16} \(pinned\)$", output,
                         flags=re.M), output
        port = int(url.group(1).rsplit(":", 1)[1])
        assert request(port, "GET", "/healthz")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_a_changed_file(mlp: Served, tmp_path: Path) -> None:
    changed = tmp_path / mlp.file.name
    data = bytearray(mlp.file.read_bytes())
    data[-1] ^= 0xFF
    changed.write_bytes(bytes(data))
    write_card(mlp.card, card_path_for(changed))
    result = subprocess.run([sys.executable, "-m", "fedcollab", "serve", "--model", str(changed), "--no-http",
                             "--grpc-address", "127.0.0.1:0"], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "COLUMNS": "250"}, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pull the model again" in " ".join(result.stdout.split())


def test_a_grpc_port_in_use_is_a_clear_error(mlp: Served, server: ModelServer) -> None:
    clash = ModelServer(model_file=mlp.file, grpc_address=server.grpc_address, http_address=None)
    with pytest.raises(ServingError, match="cannot serve gRPC"):
        clash.start()
