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
        arrays: dict[str, dict[str, Any]] = {}
        for name, (dims, dtype, desc) in specs.items():
            shape = tuple(sizes[d] for d in dims)
            chunks = (min(c, max(1, shape[0])), *(max(1, s) for s in shape[1:]))
            arrays[name] = dict(shape=shape, chunks=chunks, dtype=dtype, fill_value=_fill(dtype),
                                dimension_names=dims, attributes={"description": desc},
                                compressors=compressors_for(np.dtype(dtype)))
        arrays[DONE] = dict(shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0,
                            dimension_names=("chunk",), compressors=compressors_for(
                                np.dtype("uint8")),
                            attributes={"description": "1 = this step chunk is written"})
        _create_arrays(group, arrays)
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
        arrays = self._arrays([*values, DONE])
        write_many([(arrays[n].with_config(_CONFIG), rows, v) for n, v in values.items()])
        arrays[DONE].with_config(_CONFIG)[ci] = 1

    def write_all(self, values: Mapping[str, np.ndarray]) -> None:
        """Write whole variables (the series-wide integrals)."""
        arrays = self._arrays(list(values))
        write_many([(arrays[n].with_config(_CONFIG), slice(None), v) for n, v in values.items()])

    def read(self, names: list[str]) -> dict[str, np.ndarray]:
        arrays = self._arrays(names)
        return {n: arrays[n][:] for n in names}

    def _arrays(self, names: list[str]) -> dict[str, zarr.Array]:
        """The named arrays, their metadata read concurrently (not the whole listing)."""
        import asyncio

        from zarr.core.sync import sync

        async def _all() -> list[Any]:
            return await asyncio.gather(*(self.group._async_group.getitem(n) for n in names))

        return {n: zarr.Array(a) for n, a in zip(names, sync(_all()))}

    def mark_complete(self) -> None:
        self.meta = dataclasses.replace(self.meta, state="complete")
        self.group.attrs[ATTR_KEY] = self.meta.to_dict()

    # ------------------------------------------------------------------ reading
    def dataset(self, *, storage_options: dict | None = None,
                variables: list[str] | None = None) -> xr.Dataset:
        """The stored variables as a lazy Dataset (Dask-backed; index variables such as ``step``
        read into memory), ``_done`` left out."""
        import uuid

        import dask.array as da

        # One fresh token per opening names every variable's graph (a store rewritten in place
        # never shares a name with what was opened before): letting Dask tokenize each zarr
        # array instead costs ~50 ms per store (pickling its metadata), most of opening a
        # sweep's analyses. Index variables (a name that is also a dimension, e.g. ``step``)
        # are read now: xarray builds an index from them, which would otherwise compute a Dask
        # graph per store.
        token = uuid.uuid4().hex
        data = {}
        for name, arr in self.group.arrays():
            if name == DONE or (variables is not None and name not in variables):
                continue
            dims = tuple(arr.metadata.dimension_names)
            if dims == (name,):
                values: Any = arr[:]
            else:
                values = da.from_array(arr, chunks=arr.chunks, name=f"trajlab-{name}-{token}",
                                       meta=np.empty((0,) * arr.ndim, dtype=arr.dtype))
            data[name] = xr.Variable(dims, values, attrs=dict(arr.attrs))
        return xr.Dataset(data)


def _create_arrays(group: zarr.Group, arrays: Mapping[str, dict[str, Any]]) -> None:
    """``group.create_array(name, **kw)`` for every item, concurrently (one analysis store has
    ~45 arrays; one at a time they cost ~2.5 ms each, most of laying out a short run's store)."""
    import asyncio

    from zarr.core.sync import sync

    async def _all() -> None:
        await asyncio.gather(*(group._async_group.create_array(name, **kw)
                               for name, kw in arrays.items()))

    sync(_all())


def _fill(dtype: str):
    kind = np.dtype(dtype).kind
    return False if kind == "b" else (-1 if kind in "iu" else np.nan)


__all__ = ["DONE", "AnalysisStore", "STEP"]
