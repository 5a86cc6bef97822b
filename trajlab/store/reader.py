"""Opening run stores lazily as xarray."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import xarray as xr
import zarr
import zarr.errors

from trajlab.store import schema
from trajlab.store.run_store import StoreError, StoreLike, read_meta
from trajlab.store.schema import LayerMeta, RunMeta


class Run:
    """A recorded run, opened lazily: metadata is read now, arrays on demand (Dask-backed).

    Only committed steps are visible. Obtain one with :func:`open_run`.

    Attributes
    ----------
    meta : RunMeta
        Run-level metadata (layers, sampler, dtype, ...).
    n_steps : int
        Number of committed recorded steps.
    """

    def __init__(self, store: StoreLike, *, storage_options: dict | None = None) -> None:
        self.store = store
        self.storage_options = storage_options
        kw: dict[str, Any] = {"mode": "r"}
        if storage_options is not None:
            kw["storage_options"] = storage_options
        try:
            self._group = zarr.open_group(store, **kw)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise FileNotFoundError(
                f"no run store at {store!r}; record one with trajlab.Recorder or `trajlab demo`"
            ) from e
        except ValueError as e:
            raise StoreError(f"{store!r} is not a Zarr v3 group: {e}") from e
        self.meta: RunMeta
        self.meta, self.n_steps = read_meta(self._group, where=str(store))

    # ------------------------------------------------------------------ API
    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the recorded layers (module names)."""
        return self.meta.layer_names

    def layer_meta(self, name: str) -> LayerMeta:
        """Metadata of one layer; KeyError naming the recorded layers if unknown."""
        return self.meta.layer(name)

    def _open(self, group: str | None) -> xr.Dataset:
        """The group's arrays as a lazy Dataset, cut to the committed rows.

        Built array by array (not with ``xr.open_zarr``) because after an interrupted write
        arrays may have different lengths beyond the commit marker.
        """
        import dask.array as da

        try:
            g = self._group if group is None else self._group[group]
        except KeyError as e:
            raise StoreError(
                f"{self.store!r} has no data for {group!r} yet (the recorder stopped before "
                "its first commit)"
            ) from e
        data = {}
        for name, arr in g.arrays():
            dims = tuple(arr.metadata.dimension_names)
            lazy = da.from_zarr(arr, chunks=arr.chunks)[: self.n_steps]
            data[name] = xr.Variable(dims, lazy, attrs=dict(arr.attrs))
        ds = xr.Dataset(data, attrs=dict(g.attrs))
        return ds

    @cached_property
    def root(self) -> xr.Dataset:
        """Step-level variables (lr, batch_size, loss, indices, probe) with a ``step`` coordinate."""
        ds = self._open(None)
        if schema.STEP not in ds:
            return ds
        return ds.assign_coords({schema.STEP: np.asarray(ds[schema.STEP].values)})

    @property
    def steps(self) -> np.ndarray:
        """Step indices of the committed rows."""
        if schema.STEP not in self.root:
            return np.zeros(0, dtype=np.int64)
        return self.root[schema.STEP].values

    def layer(self, name: str) -> xr.Dataset:
        """One layer's variables as a lazy Dataset with dims (step, sample, out, in, rank)."""
        lm = self.layer_meta(name)
        ds = self._open(f"{schema.LAYERS_GROUP}/{lm.group}")
        ds = ds.assign_coords({schema.STEP: self.steps})
        if "update_stored" in ds:
            ds["update"] = _derived_update(ds)
        if "grad" not in ds and lm.sketch == "rank1":
            ds["grad"] = derived_rank1_grad(ds, self.root["batch_size"])
        ds.attrs.update({"layer": name, "sketch": lm.sketch, "module": lm.module})
        return ds

    def __getitem__(self, name: str) -> xr.Dataset:
        return self.layer(name)

    def layer_nbytes_stored(self, name: str) -> int:
        """Bytes one layer's group occupies (compressed)."""
        g = self._group[f"{schema.LAYERS_GROUP}/{self.layer_meta(name).group}"]
        return sum(int(arr.nbytes_stored()) for _, arr in g.arrays())

    def nbytes_stored(self) -> int:
        """Bytes the store occupies (compressed), summed over its arrays."""
        total = 0
        for _, arr in self._group.arrays():
            total += int(arr.nbytes_stored())
        for _, g in self._group.groups():
            for _, sub in g.groups():
                for _, arr in sub.arrays():
                    total += int(arr.nbytes_stored())
        return total

    def __repr__(self) -> str:
        return (
            f"<trajlab.Run {self.store!r}: {self.n_steps} steps, layers "
            f"{', '.join(self.layers)}{' (truncated)' if self.meta.truncated else ''}>"
        )


def _derived_update(ds: xr.Dataset) -> xr.DataArray:
    """Lazily fill the updates that are not stored from consecutive weights (store.updates)."""
    import dask.array as da

    w = ds["weight"].data
    nxt = da.concatenate([w[1:], da.full((1, *w.shape[1:]), np.nan, dtype=w.dtype)])
    nxt = nxt.rechunk(w.chunks)
    f = ds["update_stored"].data.rechunk((w.chunks[0],))[:, None, None]
    data = da.where(f, ds["update"].data.rechunk(w.chunks), nxt - w)
    return xr.DataArray(data, dims=ds["update"].dims, coords=ds["update"].coords,
                        attrs=ds["update"].attrs)


def derived_rank1_grad(ds: xr.Dataset, batch_size: xr.DataArray) -> xr.DataArray:
    """Batch-mean gradient implied by exact rank-one factors: mean_i outer(delta_i, a_i)."""
    d = ds["ps_grad_out"].fillna(0.0)
    a = ds["ps_input"].fillna(0.0)
    g = xr.dot(d, a, dim=schema.SAMPLE) / batch_size.astype(d.dtype)
    g = g.transpose(schema.STEP, schema.OUT, schema.IN).astype(d.dtype)
    g.attrs["description"] = (
        "batch-mean gradient, derived from the exact per-sample factors (not stored)"
    )
    return g


def open_run(store: StoreLike, *, storage_options: dict | None = None) -> Run:
    """Open a run store lazily.

    Parameters
    ----------
    store : str or zarr store
        Local path or fsspec URL (``s3://bucket/run.zarr``) of a store written by
        :class:`trajlab.Recorder`.
    storage_options : dict, optional
        fsspec options for URLs.

    Returns
    -------
    Run
        ``run.root`` (step-level variables) and ``run.layer(name)`` (per-layer variables) are
        Dask-backed ``xr.Dataset``s holding only committed steps.

    Raises
    ------
    FileNotFoundError
        Nothing is stored at ``store``.
    trajlab.StoreError
        The store is not a trajlab run store or has a newer format version.

    Examples
    --------
    >>> run = trajlab.open_run("run.zarr")  # doctest: +SKIP
    >>> run.layer("fc1").weight  # (step, out, in)  # doctest: +SKIP
    """
    if isinstance(store, Run):
        return store
    return Run(store, storage_options=storage_options)
