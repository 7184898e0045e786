"""Small convolutional network for 28x28 single-channel images (fashion_mnist)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

_IMAGE_SIZE = 28  # input height and width


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 1  # grayscale input
    num_classes: int = 10  # output logits
    channels: tuple[int, ...] = (16, 32)  # one conv-relu-maxpool block per entry; each halves H and W
    hidden: int = 128  # width of the fully connected layer before the head

    def __post_init__(self) -> None:
        if self.in_channels < 1:
            raise ValueError(f"CNNConfig.in_channels must be >= 1, got {self.in_channels}")
        if self.num_classes < 1:
            raise ValueError(f"CNNConfig.num_classes must be >= 1, got {self.num_classes}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"CNNConfig.channels must be non-empty and all >= 1, got {self.channels}")
        if _IMAGE_SIZE >> len(self.channels) < 1:
            raise ValueError(
                f"CNNConfig.channels has {len(self.channels)} blocks, too many for "
                f"{_IMAGE_SIZE}x{_IMAGE_SIZE} inputs (each block halves the size); use at most 4"
            )
        if self.hidden < 1:
            raise ValueError(f"CNNConfig.hidden must be >= 1, got {self.hidden}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One example: (channels, height, width)."""
        return (self.in_channels, _IMAGE_SIZE, _IMAGE_SIZE)


class SmallCNN(nn.Module):
    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        widths = (config.in_channels, *config.channels)
        # padding=1 keeps H and W through each 3x3 conv; the pool halves them.
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in itertools.pairwise(widths)
        )
        side = _IMAGE_SIZE >> len(config.channels)  # 28 -> 14 -> 7 for two blocks
        self.fc = nn.Linear(config.channels[-1] * side * side, config.hidden)
        self.head = nn.Linear(config.hidden, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.config.input_shape
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"SmallCNN expects input of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        for conv in self.convs:
            x = torch.max_pool2d(torch.relu(conv(x)), kernel_size=2)  # (B, C, H, W) -> (B, C', H/2, W/2)
        x = x.flatten(1)  # (B, C' * side * side)
        x = torch.relu(self.fc(x))  # (B, hidden)
        return self.head(x)  # (B, num_classes)
