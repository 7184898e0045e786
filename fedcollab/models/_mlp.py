"""Multi-layer perceptron for flat features (e.g. digits, breast_cancer)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


@dataclass(frozen=True)
class MLPConfig:
    in_features: int = 64  # flattened input size; 64 = 8x8 digits
    hidden: tuple[int, ...] = (128, 128)  # width of each hidden layer; () gives logistic regression
    num_classes: int = 10  # output logits
    dropout: float = 0.0  # after each hidden activation; 0 disables it
    # "tanh" trains better under DP-SGD: bounded activations keep gradients small, so
    # less of them is lost to clipping (Papernot et al. 2021, "Tempered Sigmoid").
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.in_features < 1:
            raise ValueError(f"MLPConfig.in_features must be >= 1, got {self.in_features}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"MLPConfig.hidden widths must all be >= 1, got {self.hidden}")
        if self.num_classes < 1:
            raise ValueError(f"MLPConfig.num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MLPConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"MLPConfig.activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")


class MLP(nn.Module):
    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        widths = (config.in_features, *config.hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.dropout = nn.Dropout(config.dropout)  # no parameters, no buffers
        self.head = nn.Linear(widths[-1], config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, ...) -> (B, in_features)
        if x.shape[1] != self.config.in_features:
            raise ValueError(
                f"MLP expects {self.config.in_features} features per example, got {x.shape[1]}; "
                "set MLPConfig.in_features to match the data"
            )
        act = _ACTIVATIONS[self.config.activation]
        for layer in self.hidden:
            x = self.dropout(act(layer(x)))  # (B, h)
        return self.head(x)  # (B, num_classes)
