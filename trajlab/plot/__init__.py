"""Figures of the paper's kind from an analysis Dataset (matplotlib; thin over xarray).

Each function takes the Dataset returned by :func:`trajlab.analyze` (or
:func:`trajlab.open_analysis`) and returns a ``matplotlib.figure.Figure``. The same functions
are reachable as ``ds.lipschitz.plot_validation()`` etc.
"""

from trajlab.plot.figures import (
    needed_variables,
    optimizer_aware,
    plot_band,
    plot_drift,
    plot_noise_split,
    plot_validation,
)

__all__ = ["needed_variables", "optimizer_aware", "plot_band", "plot_drift", "plot_noise_split",
           "plot_validation"]
