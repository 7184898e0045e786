"""Aggregation rules."""

from fedcollab.aggregation._central_dp import (
    add_gaussian_noise_,
    clip_scale,
    next_clip_norm,
    noise_generator,
    noise_std,
    update_noise_multiplier,
)
from fedcollab.aggregation._fedavg import StreamingFedAvg

__all__ = [
    "StreamingFedAvg",
    "add_gaussian_noise_",
    "clip_scale",
    "next_clip_norm",
    "noise_generator",
    "noise_std",
    "update_noise_multiplier",
]
