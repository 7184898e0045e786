"""Models with float-only parameters and no buffers (Opacus-compatible), plus a registry.

`lora_transformer` exchanges only LoRA adapters over a frozen, hash-named base (peft)."""

from fedcollab.models._blob import Blob, BlobConfig
from fedcollab.models._cnn import CNNConfig, SmallCNN
from fedcollab.models._lora import LoraTransformer, LoraTransformerConfig, lora_base_sha256
from fedcollab.models._mlp import MLP, MLPConfig
from fedcollab.models._registry import MODEL_KINDS, build_model, build_model_to_load, model_config
from fedcollab.models._transformer import TinyTransformer, TransformerConfig

__all__ = [
    "MODEL_KINDS",
    "MLP",
    "Blob",
    "BlobConfig",
    "CNNConfig",
    "LoraTransformer",
    "LoraTransformerConfig",
    "MLPConfig",
    "SmallCNN",
    "TinyTransformer",
    "TransformerConfig",
    "build_model",
    "build_model_to_load",
    "lora_base_sha256",
    "model_config",
]
