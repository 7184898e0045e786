"""The coordinator: gRPC server, round engine, durable state, committed models."""

from fedcollab.coordinator._checkpoints import ModelVersion
from fedcollab.coordinator._engine import RoundEngine, RoundResult
from fedcollab.coordinator._server import Coordinator
from fedcollab.coordinator._store import Store

__all__ = ["Coordinator", "ModelVersion", "RoundEngine", "RoundResult", "Store"]
