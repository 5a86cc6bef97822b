"""The Dask-parallel analysis: run stores -> SDE terms -> analysis stores -> xarray."""

from trajlab.analysis.pipeline import analyze, open_analyses, open_analysis, simulate_paths
from trajlab.analysis.plan import AnalysisOptions
from trajlab.analysis.variables import LAYER_VARIABLES, NETWORK_VARIABLES, VARIABLES

__all__ = [
    "LAYER_VARIABLES",
    "NETWORK_VARIABLES",
    "VARIABLES",
    "AnalysisOptions",
    "analyze",
    "open_analyses",
    "open_analysis",
    "simulate_paths",
]
