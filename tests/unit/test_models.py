"""Models and the registry in fedcollab.models."""

from __future__ import annotations

import pytest
import torch

from fedcollab.models import (
    MLP,
    MODEL_KINDS,
    Blob,
    BlobConfig,
    CNNConfig,
    MLPConfig,
    SmallCNN,
    build_model,
    build_model_to_load,
)

SMALL_BLOB = {"num_parameters": 1000, "max_tensor_elements": 300}
ALL_KINDS = [("mlp", None), ("cnn", None), ("blob", SMALL_BLOB), ("transformer", None)]


def test_mlp_output_shape_and_flattening() -> None:
    model = build_model(kind="mlp", params={"in_features": 64, "hidden": [32, 16], "num_classes": 10})
    assert isinstance(model, MLP)
    assert model(torch.randn(5, 64)).shape == (5, 10)
    assert model(torch.randn(5, 8, 8)).shape == (5, 10)  # flattened
    widths = [(layer.in_features, layer.out_features) for layer in model.hidden]
    assert widths == [(64, 32), (32, 16)]
    with pytest.raises(ValueError, match="expects 64 features"):
        model(torch.randn(5, 30))


def test_mlp_without_hidden_layers_is_linear() -> None:
    model = MLP(MLPConfig(in_features=30, hidden=(), num_classes=2))
    assert sum(p.numel() for p in model.parameters()) == 30 * 2 + 2


def test_cnn_output_shape_and_size() -> None:
    model = build_model(kind="cnn")
    assert isinstance(model, SmallCNN)
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    # conv1 1->16, conv2 16->32 (3x3), fc 32*7*7->128, head 128->10.
    expected = (16 * 9 + 16) + (32 * 16 * 9 + 32) + (32 * 49 * 128 + 128) + (128 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        model(torch.randn(4, 784))


@pytest.mark.parametrize(("kind", "params"), ALL_KINDS)
def test_only_float_parameters_and_no_buffers(kind: str, params: dict | None) -> None:
    model = build_model(kind=kind, params=params)
    assert list(model.parameters()), "a model with no parameters cannot be trained or sent"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert list(model.buffers()) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize(("kind", "params"), ALL_KINDS)
def test_same_seed_same_weights_different_seed_different(kind: str, params: dict | None) -> None:
    a = build_model(kind=kind, params=params, seed=3).state_dict()
    b = build_model(kind=kind, params=params, seed=3).state_dict()
    c = build_model(kind=kind, params=params, seed=4).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(kind="mlp", seed=9)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("num_parameters", "max_tensor_elements", "sizes"),
    [
        pytest.param(1000, 300, [300, 300, 300, 100], id="remainder"),
        pytest.param(900, 300, [300, 300, 300], id="exact-multiple"),
        pytest.param(7, 16_777_216, [7], id="single-tensor"),
    ],
)
def test_blob_holds_exactly_num_parameters(num_parameters: int, max_tensor_elements: int, sizes: list[int]) -> None:
    blob = Blob(BlobConfig(num_parameters=num_parameters, max_tensor_elements=max_tensor_elements))
    named = list(blob.named_parameters())
    assert [name for name, _ in named] == [f"w{i}" for i in range(len(sizes))]
    assert [p.numel() for _, p in named] == sizes
    assert sum(sizes) == num_parameters


def test_blob_forward_raises() -> None:
    blob = build_model(kind="blob", params={"num_parameters": 10})
    with pytest.raises(RuntimeError, match="Blob has no forward pass"):
        blob(torch.zeros(1))


def test_params_accept_lists_and_ints_for_floats() -> None:
    model = build_model(kind="mlp", params={"hidden": [8], "dropout": 0})
    assert model.config == MLPConfig(hidden=(8,), dropout=0.0)
    cnn = build_model(kind="cnn", params={"channels": [4, 8], "hidden": 16})
    assert cnn.config == CNNConfig(channels=(4, 8), hidden=16)


def test_model_kinds_match_registry() -> None:
    assert MODEL_KINDS == ("mlp", "cnn", "blob", "transformer", "lora_transformer")  # built in test_lora.py
    for kind, params in ALL_KINDS:
        build_model(kind=kind, params=params)


BAD_BUILDS = [
    pytest.param(dict(kind="resnet"), "known kinds: mlp, cnn, blob", id="unknown-kind"),
    pytest.param(dict(kind="mlp", params={"width": 3}), r"unknown param 'width'.*hidden: list\[int\]",
                 id="unknown-param"),
    pytest.param(dict(kind="mlp", params={"hidden": 128}), r"'hidden'.*must be list\[int\]",
                 id="tuple-param-given-int"),
    pytest.param(dict(kind="mlp", params={"hidden": [64, "x"]}), r"'hidden'.*must be list\[int\]",
                 id="tuple-param-bad-item"),
    pytest.param(dict(kind="mlp", params={"in_features": 6.5}), r"'in_features'.*must be int", id="float-for-int"),
    pytest.param(dict(kind="mlp", params={"num_classes": True}), r"'num_classes'.*must be int", id="bool-for-int"),
    pytest.param(dict(kind="mlp", params={"dropout": "0.1"}), r"'dropout'.*must be float", id="str-for-float"),
    pytest.param(dict(kind="mlp", params={"dropout": 1.0}), r"dropout must be in \[0, 1\)", id="dropout-out-of-range"),
    pytest.param(dict(kind="cnn", params={"channels": []}), "channels must be non-empty", id="cnn-no-blocks"),
    pytest.param(dict(kind="cnn", params={"channels": [2] * 5}), "too many", id="cnn-too-many-blocks"),
    pytest.param(dict(kind="blob"), r"missing param\(s\) \['num_parameters'\]", id="blob-missing-size"),
    pytest.param(dict(kind="blob", params={"num_parameters": 0}), "num_parameters must be >= 1", id="blob-empty"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_BUILDS)
def test_bad_builds_raise_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)


@pytest.mark.parametrize(("kind", "params"), ALL_KINDS)
def test_a_model_whose_whole_state_arrives_is_not_initialised_first(kind: str, params: dict | None) -> None:
    state = {n: torch.randn_like(t) for n, t in build_model(kind=kind, params=params, seed=3).state_dict().items()}
    model = build_model_to_load(kind=kind, params=params, state_names=state)
    assert all(not p.is_meta for p in model.parameters())
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in state.items())
    # A state that leaves a weight out gets a model with its seeded weights, not garbage.
    partial = dict(state)
    dropped = next(iter(partial))
    del partial[dropped]
    built = build_model_to_load(kind=kind, params=params, state_names=partial)
    assert torch.equal(built.state_dict()[dropped], build_model(kind=kind, params=params).state_dict()[dropped])
