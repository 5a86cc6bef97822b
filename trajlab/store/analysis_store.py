"""The analysis store: layout, resume markers, locking and lazy opening (Zarr v3).

An analysis store holds per-(step, layer) and per-step variables chunked along ``step`` only
(whole along ``layer`` and ``sample``): the node that finishes a step chunk writes every
variable of that chunk at once and then sets its done-marker, so a killed analysis resumes with
the unfinished chunks only. Its metadata (:class:`~trajlab.store.metadata.AnalysisMeta`) keys it
to the analysed run's identity and committed rows, so a stale analysis is never returned as new.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr
import zarr

from trajlab.errors import StoreError
from trajlab.store.codecs import compressors_for
from trajlab.store.metadata import AnalysisMeta
from trajlab.store.names import ATTR_KEY, STEP
from trajlab.store.run_store import write_many
from trajlab.store.target import StoreLike, Target, create_group, inspect, show

DONE = "_done"
_CONFIG = {"write_empty_chunks": True}

#: A variable to lay out: (dims, dtype, description).
Spec = tuple[tuple[str, ...], str, str]


class AnalysisStore:
    """An open analysis store (obtain with :meth:`create` or :meth:`open`)."""

    def __init__(self, group: zarr.Group, meta: AnalysisMeta, where: str) -> None:
        self.group = group
        self.meta = meta
        self.where = where

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, target: Target, meta: AnalysisMeta, specs: Mapping[str, Spec],
               sizes: Mapping[str, int], n_chunks: int) -> AnalysisStore:
        """Lay out a new store (replacing an analysis store there; never anything else)."""
        meta = dataclasses.replace(meta, state="layout", variables=tuple(specs))
        group = create_group(target, "analysis", {ATTR_KEY: meta.to_dict()})
        c = meta.chunk_rows
        for name, (dims, dtype, desc) in specs.items():
            shape = tuple(sizes[d] for d in dims)
            chunks = (min(c, max(1, shape[0])), *(max(1, s) for s in shape[1:]))
            group.create_array(
                name, shape=shape, chunks=chunks, dtype=dtype, fill_value=_fill(dtype),
                dimension_names=dims, compressors=compressors_for(np.dtype(dtype)),
                attributes={"description": desc},
            )
        group.create_array(DONE, shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
                           dimension_names=("chunk",), compressors=compressors_for(
                               np.dtype("uint8")),
                           attributes={"description": "1 = this step chunk is written"})
        meta = dataclasses.replace(meta, state="ready")
        group.attrs[ATTR_KEY] = meta.to_dict()
        return cls(group, meta, str(target.store))

    @classmethod
    def open(cls, store: StoreLike, *, storage_options: dict | None = None,
             mode: str = "r") -> AnalysisStore:
        """Open an existing analysis store (FileNotFoundError / StoreError otherwise)."""
        target = inspect(store, storage_options=storage_options)
        if target.state == "absent" or target.state == "empty":
            raise FileNotFoundError(f"no analysis store at {show(store)}; create one with "
                                    "trajlab.analyze")
        if target.state != "analysis":
            raise StoreError(f"{show(store)} holds {target.describe()}, not a trajlab analysis "
                             "store")
        kw: dict[str, Any] = {"mode": mode}
        if storage_options is not None:
            kw["storage_options"] = storage_options
        group = zarr.open_group(store, **kw)
        meta = AnalysisMeta.from_dict(group.attrs.asdict().get(ATTR_KEY), where=str(store))
        return cls(group, meta, str(store))

    # ------------------------------------------------------------------ writing
    def done(self) -> np.ndarray:
        """Done-marker of every step chunk (bool)."""
        return np.asarray(self.group[DONE][:], dtype=bool)

    def write_chunk(self, ci: int, rows: slice, values: Mapping[str, np.ndarray]) -> None:
        """Write every variable of step chunk ``ci`` (rows relative to the store), then mark it
        done (after the data: a chunk is done only once all of it is written)."""
        arrays = {n: a.with_config(_CONFIG) for n, a in self.group.arrays() if n in values}
        write_many([(arrays[n], rows, v) for n, v in values.items()])
        self.group[DONE].with_config(_CONFIG)[ci] = 1

    def write_all(self, values: Mapping[str, np.ndarray]) -> None:
        """Write whole variables (the series-wide integrals)."""
        arrays = {n: a.with_config(_CONFIG) for n, a in self.group.arrays() if n in values}
        write_many([(arrays[n], slice(None), v) for n, v in values.items()])

    def read(self, names: list[str]) -> dict[str, np.ndarray]:
        arrays = dict(self.group.arrays())
        return {n: arrays[n][:] for n in names}

    def mark_complete(self) -> None:
        self.meta = dataclasses.replace(self.meta, state="complete")
        self.group.attrs[ATTR_KEY] = self.meta.to_dict()

    # ------------------------------------------------------------------ reading
    def dataset(self, *, storage_options: dict | None = None,
                variables: list[str] | None = None) -> xr.Dataset:
        """The stored variables as a lazy Dataset (Dask-backed), ``_done`` left out."""
        import dask.array as da

        data = {}
        for name, arr in self.group.arrays():
            if name == DONE or (variables is not None and name not in variables):
                continue
            dims = tuple(arr.metadata.dimension_names)
            data[name] = xr.Variable(dims, da.from_zarr(arr, chunks=arr.chunks),
                                     attrs=dict(arr.attrs))
        return xr.Dataset(data)


def _fill(dtype: str):
    kind = np.dtype(dtype).kind
    return False if kind == "b" else (-1 if kind in "iu" else np.nan)


__all__ = ["DONE", "AnalysisStore", "STEP"]
