"""What protects an institution's update when the site trains without DP-SGD (no
[privacy] table), said once per study before its first update leaves.

The daemon cannot say it at start: whether a study adds distributed DP under secure
aggregation is in its tasks, not in the institution's config. Without sample-level DP
and without distributed DP the warning stays a warning; with distributed DP the
update leaves clipped and noised (its share of the Skellam noise) and masked, and
"training WITHOUT differential privacy" would be wrong.
"""

from __future__ import annotations

import logging

from fedcollab.v1 import coordinator_service_pb2 as pb


def protection_note(task: pb.Task) -> tuple[int, str]:
    """(log level, message) for a site with no [privacy] table about to send `task`'s update."""
    if task.HasField("secure_aggregation") and task.secure_aggregation.HasField("distributed_dp"):
        ddp = task.secure_aggregation.distributed_dp
        return logging.INFO, (
            "no local DP-SGD (no [privacy] table): each update is protected by distributed DP under secure "
            f"aggregation instead: clipped to L2 norm {ddp.clip_norm:g}, this institution's share of the Skellam noise "
            f"added (variance {ddp.institution_variance:g} in integer units), then masked, so the coordinator sees "
            "only the noised sum of a quorum; the federation's epsilon is the study's (coordinator status shows it)")
    if task.HasField("secure_aggregation"):
        return logging.WARNING, ("no [privacy] table: training WITHOUT differential privacy: secure aggregation "
                                 "masks each update, but the sum the coordinator unmasks carries no DP noise")
    return logging.WARNING, "no [privacy] table: training WITHOUT differential privacy"
