"""fedcollab: federated learning for research institutions.

A coordinator aggregates model updates round after round; each institution runs a
daemon next to its data that trains locally and sends only updates.

The front door, for code that drives fedcollab rather than its command line:

- configuration: `load_config(FederationConfig | InstitutionConfig | Scenario, path)`,
  the same files the commands read, checked the same way;
- the coordinator: `Coordinator(config=...)` (a context manager; `.wait()` until its
  studies end);
- an institution: `InstitutionAgent(config=...)` (`institution run`: every study its
  policy accepts), or one study's `daemon_from_config(config)` / `InstitutionDaemon`;
- a rehearsal on one machine: `run_simulation(scenario=...)`;
- errors: `FedcollabError` and its kinds (`ConfigError`, `RemoteError`, `InUseError`,
  `PkiError`); every refusal fedcollab raises is one of them.

Names are imported on first use, so `import fedcollab` stays light (no torch, no grpc)
for tools that only need its errors or its version.
"""

import importlib
import os
from typing import Any

# flwr reports telemetry unless told not to; set before anything can import it.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

__version__ = "0.1.0"

# Public name -> the module that defines it (imported when the name is first used).
_LAZY = {
    **{name: "fedcollab.errors" for name in ("FedcollabError", "ConfigError", "RemoteError", "InUseError", "PkiError")},
    "FederationConfig": "fedcollab.config",
    "InstitutionConfig": "fedcollab.config",
    "Scenario": "fedcollab.config",
    "load_config": "fedcollab.config",
    "Coordinator": "fedcollab.coordinator",
    "InstitutionAgent": "fedcollab.institution._agent",
    "InstitutionDaemon": "fedcollab.institution",
    "DaemonEvent": "fedcollab.institution",
    "daemon_from_config": "fedcollab.institution",
    "run_simulation": "fedcollab.simulation",
    "SimulationResult": "fedcollab.simulation",
}

__all__ = [
    "ConfigError", "Coordinator", "DaemonEvent", "FederationConfig", "FedcollabError", "InUseError",
    "InstitutionAgent", "InstitutionConfig", "InstitutionDaemon", "PkiError", "RemoteError", "Scenario",
    "SimulationResult", "__version__", "daemon_from_config", "load_config", "run_simulation",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedcollab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
