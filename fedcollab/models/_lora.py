"""LoRA fine-tuning of a frozen TinyTransformer through peft: only the adapters travel.

The base transformer is built from its config and `base_seed` alone (no download), and
named by the SHA-256 of its weights (`base_sha256`, see `lora_base_sha256`). Building
the model rebuilds the base, recomputes that hash and refuses a base that is not the
one the study names, so an institution whose torch draws other weights stops before it
trains rather than fine-tuning adapters for another model.

peft wraps the base (`LoraConfig`, `get_peft_model`): rank-r adapters A, B next to each
Linear named in `target_modules`, and a trainable copy of each module named in
`modules_to_save` (the classifier head by default: a frozen random head could not be
fitted by adapters alone). Everything else is frozen.

What fedcollab sees of the model, `state_dict()` and `load_state_dict()`, is only the
trainable tensors, under names of our own that do not depend on peft's internals:
`blocks.0.qkv.lora_A.weight`, `blocks.0.qkv.lora_B.weight`, ... and `head.weight`,
`head.bias`. So the coordinator's initial model, the task manifests, the uploaded
deltas and every committed version hold exactly those; the frozen base never leaves
the machine that built it. FedAvg then averages A and B separately (not their product
B @ A), the usual way federated LoRA is run.

DP-SGD with Opacus works unchanged: the adapters are plain nn.Linear layers (A: d -> r,
B: r -> out), whose per-sample gradients Opacus computes in every grad_sample_mode, and
frozen parameters (requires_grad False) are neither hooked nor noised.

peft (and the transformers library it imports) is imported only when such a model is
built, with the Hugging Face hub set offline and its telemetry off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from fedcollab.models._transformer import TinyTransformer, TransformerConfig

# Linear layers of TinyTransformer an adapter can sit on ("embed" only for float inputs,
# where it is a Linear), and its modules that can be trained whole and exchanged.
_LINEARS = ("embed", "qkv", "proj", "fc1", "fc2", "head")
_WHOLE = ("embed", "pos", "norm", "head")
_ADAPTER = "default"  # peft's adapter name; left out of the exchanged names
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LoraTransformerConfig(TransformerConfig):
    """TransformerConfig's fields describe the frozen base; these add how it is tuned."""

    base_sha256: str = ""  # SHA-256 of the base's weights (lora_base_sha256); required, checked at build
    base_seed: int = 0  # seed of the base's weights; the build seed only draws the adapters
    rank: int = 8  # r: adapter width
    alpha: float = 16.0  # adapter output scaled by alpha / rank
    lora_dropout: float = 0.0  # on each adapter's input; 0 disables it
    target_modules: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")  # Linear names that get adapters
    modules_to_save: tuple[str, ...] = ("head",)  # trained whole and exchanged too; () freezes them

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_sha256 and not _SHA256.fullmatch(self.base_sha256):
            raise ValueError(f"LoraTransformerConfig.base_sha256 must be 64 lowercase hex digits, "
                             f"got {self.base_sha256!r}")
        if self.rank < 1:
            raise ValueError(f"LoraTransformerConfig.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoraTransformerConfig.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraTransformerConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        linears = _LINEARS if self.vocab_size == 0 else tuple(n for n in _LINEARS if n != "embed")
        if not self.target_modules or any(n not in linears for n in self.target_modules):
            raise ValueError(f"LoraTransformerConfig.target_modules must be a non-empty list of {list(linears)}, "
                             f"got {list(self.target_modules)}")
        if any(n not in _WHOLE for n in self.modules_to_save):
            raise ValueError(f"LoraTransformerConfig.modules_to_save must name modules among {list(_WHOLE)}, "
                             f"got {list(self.modules_to_save)}")
        both = sorted(set(self.target_modules) & set(self.modules_to_save))
        if both:
            raise ValueError(f"LoraTransformerConfig: {both} are in both target_modules and modules_to_save; "
                             "a module gets adapters or is trained whole, not both")

    def base_config(self) -> TransformerConfig:
        return TransformerConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TransformerConfig)})


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over a canonical serialization of every tensor in module.state_dict():
    for each name in sorted order, a JSON header {name, dtype, shape} and the raw
    little-endian bytes, each length-prefixed, so no two different models collide by
    concatenation."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        header = json.dumps({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)},
                            sort_keys=True, separators=(",", ":")).encode()
        arr = t.numpy()  # float tensors only: the base holds no bfloat16
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        for part in (header, raw):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def _build_base(config: TransformerConfig, base_seed: int) -> TinyTransformer:
    """The base's weights drawn from a generator of its own, never from torch's global
    RNG: daemons build their models in threads of one process (fedcollab simulate), and
    a global seed set in one thread is consumed by the others. Same distributions as
    TinyTransformer's own init: Linear U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as in
    nn.Linear, Embedding N(0, 0.02), LayerNorm weight 1 and bias 0."""
    with torch.random.fork_rng(devices=[]):  # the constructor's own draws leave the caller's RNG alone
        base = TinyTransformer(config)
    if any(p.is_meta for p in base.parameters()):
        return base  # shapes only: nothing to draw
    gen = torch.Generator().manual_seed(base_seed)
    drawn: set[int] = set()
    with torch.no_grad():
        for module in base.modules():  # registration order: fixed by the architecture
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                module.weight.uniform_(-bound, bound, generator=gen)
                module.bias.uniform_(-bound, bound, generator=gen)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 0.02, generator=gen)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            else:
                continue
            drawn.update(id(p) for p in module.parameters(recurse=False))
    left = [name for name, p in base.named_parameters() if id(p) not in drawn]
    assert not left, f"base parameters {left} have no seeded init in _build_base: add their layer kind"
    return base


def lora_base_sha256(*, params: Mapping[str, object]) -> str:
    """The base_sha256 to put in a `lora_transformer` study's params: the hash of the
    base built here from `params` (the study's, as in its TOML; only the transformer
    fields and base_seed are read). Same torch version, same hash."""
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    base_seed = params.get("base_seed", 0)
    if not isinstance(base_seed, int) or isinstance(base_seed, bool):
        raise ValueError(f"base_seed must be int, got {base_seed!r}")
    given: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in fields}
    config = TransformerConfig(**given)
    return weights_sha256(_build_base(config, base_seed))


def _import_peft() -> ModuleType:
    # Before peft imports transformers and huggingface_hub: no network, no telemetry.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"model kind 'lora_transformer' needs peft (pip install peft): {e}") from None
    return peft


class LoraTransformer(nn.Module):
    """A frozen TinyTransformer with peft LoRA adapters; state_dict() is the adapters only."""

    def __init__(self, config: LoraTransformerConfig) -> None:
        super().__init__()
        self.config = config
        base = _build_base(config.base_config(), config.base_seed)
        # On the meta device (shapes only, e.g. the coordinator's memory estimate) there are no weights to hash.
        if not any(p.is_meta for p in base.parameters()):
            built = weights_sha256(base)
            if not config.base_sha256:
                raise ValueError(
                    f"lora_transformer needs base_sha256, the hash naming its frozen base; the base built here "
                    f"from these params and base_seed={config.base_seed} has base_sha256 = \"{built}\" "
                    f"(torch {torch.__version__}): check that it is the base you mean and put it in the params"
                )
            if built != config.base_sha256:
                raise ValueError(
                    f"the base model built here is not the one the study names: base_sha256 is "
                    f"{config.base_sha256[:16]}.. in the study, {built[:16]}.. here (torch {torch.__version__}, "
                    f"base_seed={config.base_seed}); check torch version / base_seed and the transformer params"
                )
        peft = _import_peft()
        lora = peft.LoraConfig(
            r=config.rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout, bias="none",
            target_modules=list(config.target_modules), modules_to_save=list(config.modules_to_save) or None,
        )
        self.net = peft.get_peft_model(base, lora, adapter_name=_ADAPTER)
        # Our name of each trainable tensor -> its name in self.net, in a fixed order.
        self._exchanged: dict[str, str] = OrderedDict()
        for internal, p in self.net.named_parameters():
            if p.requires_grad:
                self._exchanged[_exchanged_name(internal)] = internal
        if len(set(self._exchanged.values())) != sum(p.requires_grad for p in self.net.parameters()):
            raise RuntimeError(f"two trainable tensors map to one exchanged name: {list(self._exchanged)}; "
                               f"peft {peft.__version__} names them in a way this module does not know")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, num_classes)

    def exchanged_names(self) -> list[str]:
        return list(self._exchanged)

    def state_dict(self, *, destination: dict | None = None, prefix: str = "",  # type: ignore[override]
                   keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """Only the trainable tensors (adapters and modules_to_save), under exchanged names."""
        out: dict[str, torch.Tensor] = OrderedDict() if destination is None else destination
        params = dict(self.net.named_parameters())
        for name, internal in self._exchanged.items():
            p = params[internal]
            out[prefix + name] = p if keep_vars else p.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True,  # type: ignore[override]
                        assign: bool = False) -> nn.modules.module._IncompatibleKeys:
        """Loads the trainable tensors; the frozen base is never loaded, only rebuilt and checked."""
        if assign:
            raise ValueError("LoraTransformer.load_state_dict copies into its parameters; assign=True is not supported")
        missing = [n for n in self._exchanged if n not in state_dict]
        unexpected = [n for n in state_dict if n not in self._exchanged]
        params = dict(self.net.named_parameters())
        wrong = [f"{n}: {tuple(state_dict[n].shape)} given, {tuple(params[i].shape)} here"
                 for n, i in self._exchanged.items() if n in state_dict and state_dict[n].shape != params[i].shape]
        if wrong or (strict and (missing or unexpected)):
            raise RuntimeError(
                f"Error(s) in loading state_dict for LoraTransformer: missing {missing}, unexpected {unexpected}, "
                f"shape mismatch {wrong}. Only the adapters and {list(self.config.modules_to_save)} travel; "
                "the frozen base is rebuilt from its config and checked against base_sha256"
            )
        with torch.no_grad():
            for name, internal in self._exchanged.items():
                if name in state_dict:
                    params[internal].copy_(state_dict[name])
        return nn.modules.module._IncompatibleKeys(missing, unexpected)


def _exchanged_name(internal: str) -> str:
    """peft's name -> ours: `base_model.model.blocks.0.qkv.lora_A.default.weight` ->
    `blocks.0.qkv.lora_A.weight`; `base_model.model.head.modules_to_save.default.weight` -> `head.weight`."""
    parts = internal.split(".")
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    return ".".join(p for p in parts if p not in (_ADAPTER, "modules_to_save"))

