"""Aggregation rules."""

from fedcollab.aggregation._fedavg import StreamingFedAvg

__all__ = ["StreamingFedAvg"]
