"""What a site without [privacy] is told protects its updates: distributed DP under
secure aggregation is named as such, anything less stays a warning."""

from __future__ import annotations

import logging

from fedcollab.institution._protection import protection_note
from fedcollab.v1 import coordinator_service_pb2 as pb


def test_distributed_dp_is_named_as_what_protects_the_update() -> None:
    task = pb.Task(kind=pb.TASK_KIND_TRAIN, secure_aggregation=pb.SecAggParams(
        bits=32, distributed_dp=pb.DistributedDPParams(clip_norm=1.0, l2_bound=100.0, institution_variance=12.5)))
    level, message = protection_note(task)
    assert level == logging.INFO
    assert "WITHOUT" not in message and "distributed DP under secure aggregation" in message
    assert "L2 norm 1" in message and "variance 12.5" in message


def test_without_distributed_dp_the_warning_stays() -> None:
    masked_only = pb.Task(kind=pb.TASK_KIND_TRAIN, secure_aggregation=pb.SecAggParams(bits=32, clipping_range=8.0))
    plain = pb.Task(kind=pb.TASK_KIND_TRAIN)
    for task in (masked_only, plain):
        level, message = protection_note(task)
        assert level == logging.WARNING and "training WITHOUT differential privacy" in message
    assert "masks each update" in protection_note(masked_only)[1]
