"""The federation-level epsilon of a committed round, whichever mechanism produced it:
DP-FedAvg at the coordinator, or distributed DP under secure aggregation."""

from __future__ import annotations

import math
from collections.abc import Mapping


def federation_dp(metrics: Mapping[str, float]) -> tuple[float, float, str] | None:
    """(epsilon, delta, mechanism) from a round's metrics; None without federation-level DP."""
    if "central_dp_epsilon" in metrics:
        return metrics["central_dp_epsilon"], metrics.get("central_dp_delta", math.nan), "DP-FedAvg"
    if "federation_dp_epsilon" in metrics:
        return (metrics["federation_dp_epsilon"], metrics.get("federation_dp_delta", math.nan),
                "distributed DP under secure aggregation")
    return None
