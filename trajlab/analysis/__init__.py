"""The Dask-parallel analysis: run store -> SDE terms -> analysis store -> xarray."""

from trajlab.analysis.pipeline import analyze, open_analysis, simulate_paths
from trajlab.analysis.variables import LAYER_VARIABLES, NETWORK_VARIABLES

__all__ = ["LAYER_VARIABLES", "NETWORK_VARIABLES", "analyze", "open_analysis", "simulate_paths"]
