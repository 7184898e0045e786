"""Small pre-LayerNorm transformer encoder for short sequences, Opacus-compatible.

Two kinds of input:
- continuous (vocab_size == 0): each example is (seq_len, token_features) floats,
  embedded with a Linear; flat inputs of seq_len * token_features features are reshaped
  into seq_len tokens (digits' 64 features = 8 tokens of 8, one per image row);
- token ids (vocab_size > 0): each example is (seq_len,) int64 ids, embedded with
  nn.Embedding.

Everything is built from layers Opacus computes per-sample gradients for (Linear,
LayerNorm, Embedding): attention is written from nn.Linear (`qkv`, `proj`) and plain
tensor ops rather than nn.MultiheadAttention, and the learned positions are an
nn.Embedding indexed by arange (a bare nn.Parameter has no per-sample gradient in
Opacus). The Linear layers are named `qkv`, `proj`, `fc1` and `fc2` in every block so
LoRA adapters (peft's target_modules) can find them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 0  # 0: continuous tokens of token_features floats; > 0: int64 token ids
    token_features: int = 8  # floats per token when vocab_size == 0 (ignored otherwise)
    seq_len: int = 8  # tokens per example (the number of learned positions)
    d_model: int = 64  # width of the residual stream
    heads: int = 4  # attention heads; must divide d_model
    layers: int = 2  # transformer blocks
    mlp_ratio: int = 2  # hidden width of each block's MLP = mlp_ratio * d_model
    num_classes: int = 10  # output logits
    dropout: float = 0.0  # on attention weights and each residual branch; 0 disables it

    def __post_init__(self) -> None:
        if self.vocab_size < 0:
            raise ValueError(
                f"TransformerConfig.vocab_size must be >= 0, got {self.vocab_size}; "
                "use 0 for continuous inputs or the number of distinct token ids"
            )
        if self.token_features < 1:
            raise ValueError(f"TransformerConfig.token_features must be >= 1, got {self.token_features}")
        if self.seq_len < 1:
            raise ValueError(f"TransformerConfig.seq_len must be >= 1, got {self.seq_len}")
        if self.d_model < 1:
            raise ValueError(f"TransformerConfig.d_model must be >= 1, got {self.d_model}")
        if self.heads < 1:
            raise ValueError(f"TransformerConfig.heads must be >= 1, got {self.heads}")
        if self.d_model % self.heads != 0:
            raise ValueError(
                f"TransformerConfig.d_model ({self.d_model}) must be a multiple of heads ({self.heads}); "
                f"e.g. d_model={self.heads * max(1, round(self.d_model / self.heads))} "
                f"or heads that divide {self.d_model}"
            )
        if self.layers < 1:
            raise ValueError(f"TransformerConfig.layers must be >= 1, got {self.layers}")
        if self.mlp_ratio < 1:
            raise ValueError(f"TransformerConfig.mlp_ratio must be >= 1, got {self.mlp_ratio}")
        if self.num_classes < 1:
            raise ValueError(f"TransformerConfig.num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout}")


class _Block(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.mlp_ratio * d)
        self.fc2 = nn.Linear(config.mlp_ratio * d, d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        head_dim = d // self.heads
        # (B, T, 3D) -> (3, B, heads, T, head_dim)
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)  # (B, heads, T, T)
        attn = self.dropout(torch.softmax(scores, dim=-1))
        mixed = (attn @ v).transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        x = x + self.dropout(self.proj(mixed))
        x = x + self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(x)))))
        return x


class TinyTransformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        if config.vocab_size > 0:
            self.embed: nn.Module = nn.Embedding(config.vocab_size, config.d_model)
        else:
            self.embed = nn.Linear(config.token_features, config.d_model)
        self.pos = nn.Embedding(config.seq_len, config.d_model)
        # Small embeddings (as in GPT-2/ViT) so the residual stream starts near unit scale.
        nn.init.normal_(self.pos.weight, std=0.02)
        if isinstance(self.embed, nn.Embedding):
            nn.init.normal_(self.embed.weight, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.num_classes)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Checks the input and embeds it: (B, T, D)."""
        c = self.config
        if c.vocab_size > 0:
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32) or not 1 <= x.shape[1] <= c.seq_len:
                raise ValueError(
                    f"TinyTransformer with vocab_size={c.vocab_size} expects int64 token ids of shape "
                    f"(B, T) with 1 <= T <= {c.seq_len}, got {tuple(x.shape)} {x.dtype}; "
                    "set TransformerConfig.seq_len to match, or vocab_size=0 for float inputs"
                )
            return self.embed(x)
        if x.dim() == 2 and x.shape[1] == c.seq_len * c.token_features:
            x = x.reshape(x.shape[0], c.seq_len, c.token_features)  # flat features -> tokens
        if (x.dim() != 3 or x.shape[2] != c.token_features or not 1 <= x.shape[1] <= c.seq_len
                or not x.is_floating_point()):
            raise ValueError(
                f"TinyTransformer expects float inputs of shape (B, T, {c.token_features}) with "
                f"1 <= T <= {c.seq_len}, or (B, {c.seq_len * c.token_features}) flat, got "
                f"{tuple(x.shape)} {x.dtype}; set TransformerConfig.seq_len and token_features to match the data"
            )
        return self.embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._tokens(x)  # (B, T, D)
        b, t, _ = h.shape
        # Positions indexed per example (B, T), not (T,): Opacus treats an Embedding's
        # first input dimension as the batch when it computes per-sample gradients. Made
        # contiguous: Opacus' ghost-clipping norm for Embedding calls .view() on the ids.
        positions = torch.arange(t, device=h.device).expand(b, t).contiguous()
        h = self.dropout(h + self.pos(positions))
        for block in self.blocks:
            h = block(h)
        h = self.norm(h.mean(dim=1))  # mean pooling over tokens, then the final LayerNorm: (B, D)
        return self.head(h)  # (B, num_classes)
