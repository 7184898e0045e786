"""fedcollab: federated learning for research institutions.

A coordinator aggregates model updates round after round; each institution runs a
daemon next to its data that trains locally and sends only updates.
"""

import os

# flwr reports telemetry unless told not to; set before anything can import it.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

__version__ = "0.1.0"

__all__ = ["__version__"]
