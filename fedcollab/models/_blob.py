"""A parameter container of a chosen size, for benchmarks that only move bytes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BlobConfig:
    num_parameters: int  # total float32 elements across all tensors
    max_tensor_elements: int = 16_777_216  # cap per tensor (2**24 = 64 MiB of float32)

    def __post_init__(self) -> None:
        if self.num_parameters < 1:
            raise ValueError(f"BlobConfig.num_parameters must be >= 1, got {self.num_parameters}")
        if self.max_tensor_elements < 1:
            raise ValueError(
                f"BlobConfig.max_tensor_elements must be >= 1, got {self.max_tensor_elements}"
            )


class Blob(nn.Module):
    """Parameters w0, w1, ... holding exactly num_parameters float32 elements; not trainable."""

    def __init__(self, config: BlobConfig) -> None:
        super().__init__()
        self.config = config
        full, rest = divmod(config.num_parameters, config.max_tensor_elements)
        sizes = [config.max_tensor_elements] * full + ([rest] if rest else [])
        for i, size in enumerate(sizes):
            # Random rather than zeros so that compression cannot make transfers look free;
            # normal_ draws from the global RNG, which build_model seeds.
            weight = torch.empty(size, dtype=torch.float32).normal_(0.0, 0.02)
            self.register_parameter(f"w{i}", nn.Parameter(weight))

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError(
            "Blob has no forward pass: it only exists to move num_parameters floats in benchmarks; "
            "use kind='mlp' or kind='cnn' for a trainable model"
        )
