"""The lora_transformer model kind: only adapters in its state, a hash-named frozen base,
safetensors round trips, determinism and DP-SGD with Opacus."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from safetensors.torch import load_file, save_file
from torch.func import functional_call, grad, vmap

from fedcollab.models import (
    MODEL_KINDS,
    LoraTransformer,
    LoraTransformerConfig,
    build_model,
    build_model_to_load,
    lora_base_sha256,
)
from fedcollab.models._lora import _build_base, weights_sha256
from fedcollab.models._transformer import TransformerConfig
from fedcollab.privacy import validate_model
from fedcollab.privacy._opacus import GRAD_SAMPLE_MODES, train_private

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
BASE = {"d_model": 16, "heads": 2, "layers": 2, "base_seed": 7}
BASE_SHA256 = lora_base_sha256(params=BASE)
SMALL = {**BASE, "base_sha256": BASE_SHA256, "rank": 2, "alpha": 4.0}
# What travels: A (rank x in) and B (out x rank) on each targeted Linear of each block, and the head.
EXCHANGED = [
    f"blocks.{i}.{layer}.lora_{ab}.weight" for i in range(2) for layer in ("qkv", "proj", "fc1", "fc2") for ab in "AB"
] + ["head.weight", "head.bias"]


def lora(seed: int = 0, **params: object) -> LoraTransformer:
    model = build_model(kind="lora_transformer", params={**SMALL, **params}, seed=seed)
    assert isinstance(model, LoraTransformer)
    return model


def test_registered_kind() -> None:
    assert "lora_transformer" in MODEL_KINDS
    model = lora(target_modules=["qkv", "fc2"], modules_to_save=[])
    assert model.config == LoraTransformerConfig(**{**SMALL, "target_modules": ("qkv", "fc2"), "modules_to_save": ()})
    assert model(torch.randn(3, 64)).shape == (3, 10)


def test_state_dict_holds_only_the_adapters_and_the_head() -> None:
    model = lora()
    state = model.state_dict()
    assert list(state) == EXCHANGED == model.exchanged_names()
    d, r = 16, 2
    per_block = (r * d + 3 * d * r) + (r * d + d * r) + (r * d + 2 * d * r) + (r * 2 * d + d * r)
    assert sum(t.numel() for t in state.values()) == 2 * per_block + (10 * d + 10)
    # Exactly the trainable parameters travel; everything else is frozen and stays.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(t.numel() for t in state.values())
    assert sum(p.numel() for p in model.parameters()) > 5 * trainable
    assert all(not t.requires_grad for t in state.values())  # detached, like nn.Module's


def test_without_modules_to_save_only_adapters_travel() -> None:
    state = lora(modules_to_save=[]).state_dict()
    assert list(state) == EXCHANGED[:-2]


def test_load_state_dict_refuses_base_tensors_missing_and_wrong_shapes() -> None:
    model = lora()
    state = model.state_dict()
    with pytest.raises(RuntimeError, match=r"unexpected \['blocks.0.qkv.weight'\].*frozen base is rebuilt"):
        model.load_state_dict({**state, "blocks.0.qkv.weight": torch.zeros(48, 16)})
    with pytest.raises(RuntimeError, match=r"missing \['head.bias'\]"):
        model.load_state_dict({k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(RuntimeError, match=r"head.bias: \(3,\) given, \(10,\) here"):
        model.load_state_dict({**state, "head.bias": torch.zeros(3)}, strict=False)
    keys = model.load_state_dict({"head.bias": torch.ones(10)}, strict=False)
    assert "head.weight" in keys.missing_keys and keys.unexpected_keys == []
    assert torch.equal(model.state_dict()["head.bias"], torch.ones(10))


def test_round_trip_through_safetensors(tmp_path: Path) -> None:
    trained = lora(seed=1)
    with torch.no_grad():  # B starts at zero: give every adapter a value to carry
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path = tmp_path / "adapters.safetensors"
    save_file(trained.state_dict(), str(path))
    assert sorted(load_file(str(path))) == sorted(EXCHANGED)
    fresh = lora(seed=2)
    x = torch.randn(4, 64)
    assert not torch.allclose(fresh(x), trained(x))
    fresh.load_state_dict(load_file(str(path)), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(),
                                                 strict=True))
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


def test_base_hash_is_checked_and_a_mismatch_refused() -> None:
    other = lora_base_sha256(params={**BASE, "base_seed": 8})
    with pytest.raises(ValueError, match=r"not the one the study names.*check torch version / base_seed"):
        lora(base_sha256=other)
    with pytest.raises(ValueError, match=f'needs base_sha256.*base_sha256 = "{BASE_SHA256}"'):
        build_model(kind="lora_transformer", params={k: v for k, v in SMALL.items() if k != "base_sha256"})
    # The hash names the transformer's weights: another width is another base.
    with pytest.raises(ValueError, match="not the one the study names"):
        lora(d_model=32)


def test_base_hash_names_the_weights() -> None:
    base = _build_base(TransformerConfig(d_model=16, heads=2, layers=2), 7)
    assert weights_sha256(base) == BASE_SHA256
    with torch.no_grad():
        base.head.bias[0] += 1e-6
    assert weights_sha256(base) != BASE_SHA256
    assert lora_base_sha256(params={**BASE, "rank": 64, "target_modules": ["qkv"]}) == BASE_SHA256  # LoRA fields
    assert len({lora_base_sha256(params={**BASE, "base_seed": s}) for s in range(3)}) == 3


def test_frozen_base_is_the_hashed_one_and_lora_starts_as_identity() -> None:
    model = lora(seed=5)
    base = _build_base(TransformerConfig(d_model=16, heads=2, layers=2), 7)
    x = torch.randn(6, 64)
    torch.testing.assert_close(model(x), base(x))  # B = 0: the adapters add nothing yet


def test_base_does_not_depend_on_the_global_rng_or_other_threads() -> None:
    """Daemons build their models in threads of one process: a base drawn from the global
    RNG would come out different when another thread draws meanwhile."""
    hashes: list[str] = []
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            torch.manual_seed(0)
            torch.rand(1000)

    noise = threading.Thread(target=churn, daemon=True)
    noise.start()
    try:
        builders = [threading.Thread(target=lambda: hashes.append(lora_base_sha256(params=BASE))) for _ in range(6)]
        for t in builders:
            t.start()
        for t in builders:
            t.join()
    finally:
        stop.set()
        noise.join()
    assert hashes == [BASE_SHA256] * 6


def test_build_is_deterministic() -> None:
    a, b, c = lora(seed=3).state_dict(), lora(seed=3).state_dict(), lora(seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.qkv.lora_A.weight"], c["blocks.0.qkv.lora_A.weight"])  # adapters: build seed
    assert torch.equal(a["head.weight"], c["head.weight"])  # the head starts as the base's
    assert all(not t.any() for k, t in a.items() if ".lora_B." in k)  # B starts at zero


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lora(seed=9)
    assert torch.equal(torch.rand(3), expected)


BAD_CONFIGS = [
    pytest.param({"base_sha256": "abc"}, "base_sha256 must be 64 lowercase hex", id="short-hash"),
    pytest.param({"rank": 0}, "rank must be >= 1", id="rank"),
    pytest.param({"alpha": 0}, "alpha must be > 0", id="alpha"),
    pytest.param({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)", id="dropout"),
    pytest.param({"target_modules": []}, "target_modules must be a non-empty list", id="no-targets"),
    pytest.param({"target_modules": ["attn"]}, r"target_modules must be .*'qkv'.*got \['attn'\]", id="unknown-target"),
    pytest.param({"vocab_size": 20, "target_modules": ["embed"]}, "target_modules", id="embedding-target"),
    pytest.param({"modules_to_save": ["blocks"]}, "modules_to_save must name", id="unknown-save"),
    pytest.param({"modules_to_save": ["qkv"]}, "modules_to_save must name", id="save-a-block-linear"),
    pytest.param({"target_modules": ["qkv", "head"], "modules_to_save": ["head"]}, r"\['head'\] are in both",
                 id="both"),
    pytest.param({"rank": 2.0}, r"'rank'.*must be int", id="float-for-int"),
    pytest.param({"heads": 3}, r"d_model \(16\) must be a multiple of heads \(3\)", id="transformer-field"),
]


@pytest.mark.parametrize(("params", "message"), BAD_CONFIGS)
def test_config_validation(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(kind="lora_transformer", params={**SMALL, **params})


def test_validates_for_dp() -> None:
    validate_model(lora())


def test_opacus_per_sample_gradients_of_the_adapters_are_exact() -> None:
    model = lora(seed=1)
    with torch.no_grad():  # nonzero B, so A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(5, 64), torch.randint(0, 10, (5,))
    trainable = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def loss(p: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, {**frozen, **p}, (xb.unsqueeze(0),)), yb.unsqueeze(0))

    expected = vmap(grad(loss), in_dims=(None, 0, 0))(trainable, x, y)
    wrapped = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(wrapped(x), y, reduction="sum").backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad_sample, expected[name], msg=name)
        else:
            assert getattr(p, "grad_sample", None) is None and p.grad is None, name


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_one_private_step_moves_the_adapters_only(mode: str) -> None:
    model = lora()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train_private(
        model=model, x=torch.randn(16, 64), y=torch.randint(0, 10, (16,)), epochs=1, batch_size=16,
        optimizer="sgd", learning_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0, mode=mode,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.steps == 1
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # the noise alone moves each one
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_hub_is_offline_when_peft_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY", raising=False)
    lora()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"


def test_importing_fedcollab_does_not_import_peft() -> None:
    code = "import sys, fedcollab, fedcollab.models, fedcollab.institution; print('peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("path", sorted((ROOT / "simulations").glob("*lora*.toml")), ids=lambda p: p.name)
def test_scenarios_name_the_base_built_here(path: Path) -> None:
    model = tomllib.loads(path.read_text())["study"]["model"]
    if model["kind"] != "lora_transformer":
        return  # the full-weights twin
    assert model["params"]["base_sha256"] == lora_base_sha256(params=model["params"])
    build_model(kind=model["kind"], params=model["params"])


def test_a_lora_model_to_load_keeps_its_frozen_base() -> None:
    """Only the adapters and the head arrive: the base must be built from its seed, as its hash says."""
    reference = lora(seed=1)
    model = build_model_to_load(kind="lora_transformer", params=SMALL, state_names=reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    everything = torch.nn.Module.state_dict(model)  # base included, under peft's internal names
    assert everything.keys() == torch.nn.Module.state_dict(reference).keys()
    assert all(torch.equal(t, torch.nn.Module.state_dict(reference)[n]) for n, t in everything.items())
