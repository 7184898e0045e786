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
from fedcollab.aggregation._fedopt import OPTIMIZERS, ServerOptimizer, ServerOptimizerSettings
from fedcollab.aggregation._robust import RULES, RobustResult, RobustSettings, robust_aggregate

__all__ = [
    "OPTIMIZERS",
    "RULES",
    "RobustResult",
    "RobustSettings",
    "ServerOptimizer",
    "ServerOptimizerSettings",
    "StreamingFedAvg",
    "add_gaussian_noise_",
    "clip_scale",
    "next_clip_norm",
    "noise_generator",
    "noise_std",
    "robust_aggregate",
    "update_noise_multiplier",
]
