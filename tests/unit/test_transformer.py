"""The small transformer model kind: shapes, determinism, validation and DP-SGD with Opacus."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch.func import functional_call, grad, vmap

from fedcollab.models import MODEL_KINDS, TinyTransformer, TransformerConfig, build_model
from fedcollab.privacy._opacus import train_private

# Opacus' chatter: hooks on a model whose inputs need no gradient, and secure_mode off.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]

SMALL = {"d_model": 16, "heads": 2, "layers": 1}
TOKENS = {**SMALL, "vocab_size": 20}


def test_registered_kind() -> None:
    assert "transformer" in MODEL_KINDS
    model = build_model(kind="transformer", params={"d_model": 32, "heads": 4, "dropout": 0})
    assert isinstance(model, TinyTransformer)
    assert model.config == TransformerConfig(d_model=32, heads=4, dropout=0.0)


def test_continuous_inputs_as_tokens_or_flat() -> None:
    model = build_model(kind="transformer", params=SMALL)
    x = torch.randn(5, 8, 8)
    assert model(x).shape == (5, 10)
    # digits' 64 flat features are the same 8 tokens of 8 features (one per image row).
    assert torch.equal(model(x.reshape(5, 64)), model(x))
    assert model(torch.randn(5, 3, 8)).shape == (5, 10)  # shorter sequences use the first positions
    with pytest.raises(ValueError, match=r"\(B, T, 8\) with 1 <= T <= 8, or \(B, 64\) flat"):
        model(torch.randn(5, 30))
    with pytest.raises(ValueError, match="token_features"):
        model(torch.randn(5, 8, 7))
    with pytest.raises(ValueError, match="float inputs"):
        model(torch.zeros(5, 8, 8, dtype=torch.int64))


def test_token_id_inputs() -> None:
    model = build_model(kind="transformer", params={**TOKENS, "seq_len": 6, "num_classes": 3})
    assert isinstance(model.embed, torch.nn.Embedding)
    assert model(torch.randint(0, 20, (4, 6))).shape == (4, 3)
    assert model(torch.randint(0, 20, (4, 2))).shape == (4, 3)
    with pytest.raises(ValueError, match="int64 token ids"):
        model(torch.randn(4, 6))
    with pytest.raises(ValueError, match="1 <= T <= 6"):
        model(torch.randint(0, 20, (4, 7)))


def test_linear_names_for_lora_and_no_buffers() -> None:
    model = build_model(kind="transformer", params={**SMALL, "layers": 2})
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"qkv", "proj", "fc1", "fc2"} <= names
    assert [n for n, _ in model.named_modules() if n.endswith(".qkv")] == ["blocks.0.qkv", "blocks.1.qkv"]
    assert list(model.buffers()) == []
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(model.pos, torch.nn.Embedding)  # not a bare Parameter (no per-sample grads)


@pytest.mark.parametrize("params", [SMALL, TOKENS], ids=["continuous", "token-ids"])
def test_seeded_determinism(params: dict) -> None:
    a = build_model(kind="transformer", params=params, seed=3).state_dict()
    b = build_model(kind="transformer", params=params, seed=3).state_dict()
    c = build_model(kind="transformer", params=params, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


BAD_CONFIGS = [
    pytest.param({"d_model": 30, "heads": 4}, r"d_model \(30\) must be a multiple of heads \(4\)", id="heads-divide"),
    pytest.param({"vocab_size": -1}, "vocab_size must be >= 0.*use 0 for continuous", id="vocab"),
    pytest.param({"token_features": 0}, "token_features must be >= 1", id="token-features"),
    pytest.param({"seq_len": 0}, "seq_len must be >= 1", id="seq-len"),
    pytest.param({"layers": 0}, "layers must be >= 1", id="layers"),
    pytest.param({"heads": 0}, "heads must be >= 1", id="heads"),
    pytest.param({"mlp_ratio": 0}, "mlp_ratio must be >= 1", id="mlp-ratio"),
    pytest.param({"num_classes": 0}, "num_classes must be >= 1", id="classes"),
    pytest.param({"dropout": 1.0}, r"dropout must be in \[0, 1\)", id="dropout"),
    pytest.param({"d_model": 64.0}, r"'d_model'.*must be int", id="float-for-int"),
]


@pytest.mark.parametrize(("params", "message"), BAD_CONFIGS)
def test_config_validation(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(kind="transformer", params=params)


@pytest.mark.parametrize("params", [SMALL, TOKENS], ids=["continuous", "token-ids"])
def test_module_validator_strict(params: dict) -> None:
    model = build_model(kind="transformer", params=params)
    assert ModuleValidator.validate(model, strict=True) == []


@pytest.mark.parametrize("params", [SMALL, TOKENS], ids=["continuous", "token-ids"])
def test_opacus_per_sample_gradients_are_exact(params: dict) -> None:
    """Hooks' per-sample gradients (positions included) equal torch.func's, example by example."""
    model = build_model(kind="transformer", params=params, seed=1)
    x = torch.randint(0, 20, (5, 8)) if params.get("vocab_size") else torch.randn(5, 64)
    y = torch.randint(0, 10, (5,))
    weights = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xb.unsqueeze(0),)), yb.unsqueeze(0))

    expected = vmap(grad(loss), in_dims=(None, 0, 0))(weights, x, y)
    wrapped = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(wrapped(x), y, reduction="sum").backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, expected[name], msg=name)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("params", [SMALL, TOKENS], ids=["continuous", "token-ids"])
def test_one_private_step_changes_weights(mode: str, params: dict) -> None:
    model = build_model(kind="transformer", params=params)
    x = torch.randint(0, 20, (16, 8)) if params.get("vocab_size") else torch.randn(16, 64)
    y = torch.randint(0, 10, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_private(
        model=model, x=x, y=y, epochs=1, batch_size=16, optimizer="sgd", learning_rate=0.1,
        noise_multiplier=1.0, max_grad_norm=1.0, mode=mode, generator=torch.Generator().manual_seed(0),
    )
    assert result.steps == 1
    after = model.state_dict()
    # Every parameter moves (the noise alone moves them), positions and embeddings included.
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
