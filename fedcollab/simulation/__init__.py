"""Local multi-institution simulations over the real runtime."""

from fedcollab.simulation._compare import plot_comparison
from fedcollab.simulation._run import SimulationResult, institution_configs, run_simulation

__all__ = ["SimulationResult", "institution_configs", "plot_comparison", "run_simulation"]
