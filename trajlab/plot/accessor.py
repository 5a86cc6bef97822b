"""``ds.lipschitz``: the plots and helpers of :mod:`trajlab.plot` as an xarray accessor."""

from __future__ import annotations

from collections.abc import Sequence

import xarray as xr


@xr.register_dataset_accessor("lipschitz")
class LipschitzAccessor:
    """Plots for a trajlab analysis Dataset: ``ds.lipschitz.plot_validation()`` etc."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    def plot_validation(self, *, layers: Sequence[str] | None = None, inset_steps: int = 50):
        """See :func:`trajlab.plot.plot_validation`."""
        from trajlab.plot import plot_validation

        return plot_validation(self._ds, layers=layers, inset_steps=inset_steps)

    def plot_drift(self, *, window: int = 25):
        """See :func:`trajlab.plot.plot_drift`."""
        from trajlab.plot import plot_drift

        return plot_drift(self._ds, window=window)

    def plot_noise_split(self, *, window: int = 25):
        """See :func:`trajlab.plot.plot_noise_split`."""
        from trajlab.plot import plot_noise_split

        return plot_noise_split(self._ds, window=window)

    def plot_band(self, *, measured: Sequence[xr.Dataset] = (), label: str = "run"):
        """See :func:`trajlab.plot.plot_band`."""
        from trajlab.plot import plot_band

        return plot_band(self._ds, measured=measured, label=label)
