"""The institution daemon and its local trainer."""

from fedcollab.institution._client import CoordinatorClient
from fedcollab.institution._daemon import DaemonEvent, InstitutionDaemon, daemon_from_config
from fedcollab.institution._data import load_local_data
from fedcollab.institution._trainer import (
    EvalResult,
    SyntheticTrainer,
    TorchTrainer,
    Trainer,
    TrainResult,
    pick_device,
)

__all__ = [
    "CoordinatorClient",
    "DaemonEvent",
    "EvalResult",
    "InstitutionDaemon",
    "SyntheticTrainer",
    "TorchTrainer",
    "TrainResult",
    "Trainer",
    "daemon_from_config",
    "load_local_data",
    "pick_device",
]
