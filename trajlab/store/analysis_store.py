"""The analysis store: layout, resume markers, locking and lazy opening (Zarr v3).

An analysis store holds per-(step, layer) and per-step variables chunked along ``step`` only
(whole along ``layer`` and ``sample``): the node that finishes a step chunk writes every
variable of that chunk at once and then sets its done-marker, so a killed analysis resumes with
the unfinished chunks only. Its metadata (:class:`~trajlab.store.metadata.AnalysisMeta`) keys it
to the analysed run's identity and committed rows, so a stale analysis is never returned as new.

Every read is checked as in run stores (:class:`~trajlab.store.rows.StoredArray`): a chunk that
fails its checksum, cannot be decoded, or is missing where the store says it was written, is a
:class:`~trajlab.errors.StoreCorruptError` naming the array and the chunk, never NaN.
:meth:`AnalysisStore.verify` reads every written chunk; ``analyze`` runs it before it reuses or
resumes a store and recomputes what it finds damaged.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
import zarr
import zarr.codecs
from zarr.core.sync import sync

from trajlab.errors import StoreCorruptError, StoreError
from trajlab.store.codecs import compressors_for
from trajlab.store.metadata import AnalysisMeta
from trajlab.store.names import ATTR_KEY, STEP
from trajlab.store.rows import StoredArray
from trajlab.store.run_store import write_many
from trajlab.store.target import StoreLike, Target, create_group, inspect, show

DONE = "_done"
_CONFIG = {"write_empty_chunks": True}

#: A variable to lay out: (dims, dtype, description).
Spec = tuple[tuple[str, ...], str, str]


@dataclass(frozen=True)
class ChunkProblem:
    """A part of an analysis store that cannot be used.

    Attributes
    ----------
    array : the array's name.  chunk : the chunk's index along ``step`` (None: the whole
        array, e.g. its metadata is missing).  message : what is wrong, naming both.
    """

    array: str
    chunk: int | None
    message: str


def repair_hint(where: str) -> str:
    """The fix for a damaged analysis store at ``where``."""
    return (f"rerun `trajlab analyze RUN --out {where}` (trajlab.analyze with the same "
            "arguments and out=), which recomputes the missing or damaged chunks; "
            f"`trajlab info {where} --verify` lists them all")


class CheckedArray:
    """One analysis array read through :class:`~trajlab.store.rows.StoredArray`: every chunk
    of a written array must exist and pass its checksum, and a read that finds one that does
    not raises :class:`~trajlab.errors.StoreCorruptError` naming the array, the chunk and the
    fix (recompute it with ``analyze``). Array-like for ``dask.array.from_array``."""

    def __init__(self, arr: zarr.Array, name: str, where: str) -> None:
        self.arr = arr
        self.name = name
        self.where = where
        if not any(isinstance(c, zarr.codecs.Crc32cCodec) for c in arr.metadata.codecs):
            raise StoreCorruptError(
                f"{where}: array {name!r} has no crc32c checksum in its codecs, which every "
                "analysis array has: its zarr.json was edited or is damaged (damaged chunks "
                f"would read as wrong numbers); {repair_hint(where)}")
        self.stored = StoredArray(arr, name, rows=arr.shape[0] if arr.ndim else 0,
                                  samples=None, strict=True, where=where)
        self.shape = tuple(arr.shape)
        self.dtype = arr.dtype
        self.ndim = arr.ndim
        self.chunks = arr.chunks

    async def aget(self, sel: Any) -> np.ndarray:
        """Read ``sel`` (ints, slices of any step, integer sequences, each on its own axis:
        Dask pushes such selections into the getter), checked: the covering unit-step block
        is read, then indexed in memory."""
        block, post = self._covering(sel)
        try:
            out = await self.stored.aget(block)
        except StoreCorruptError as e:
            raise StoreCorruptError(f"{_short(str(e))}. The analysis store is damaged (a chunk "
                                    f"deleted or its bytes changed): {repair_hint(self.where)}"
                                    ) from e
        for ax in reversed(range(len(post))):  # last axis first: dropped axes keep numbering
            p = post[ax]
            if isinstance(p, slice):
                if p != slice(None):
                    out = out[(slice(None),) * ax + (p,)]
            else:
                out = np.take(out, p, axis=ax)
        return out

    def _covering(self, sel: Any) -> tuple[tuple[slice, ...], list[Any]]:
        """(unit-step slices covering ``sel``, per axis the index that takes ``sel`` out of
        the block: a slice, an int (the axis is dropped) or an integer array)."""
        sel = sel if isinstance(sel, tuple) else (sel,)
        if any(s is Ellipsis for s in sel):
            i = sel.index(Ellipsis)
            sel = sel[:i] + (slice(None),) * (self.ndim - len(sel) + 1) + sel[i + 1:]
        sel = sel + (slice(None),) * (self.ndim - len(sel))
        if len(sel) != self.ndim:
            raise IndexError(f"too many indices for array {self.name!r} of {self.ndim} "
                             "dimensions")
        block: list[slice] = []
        post: list[Any] = []
        for s, n in zip(sel, self.shape):
            if isinstance(s, (int, np.integer)):
                i = int(s) + (n if s < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {s} out of range for {self.name!r} of length {n}")
                block.append(slice(i, i + 1))
                post.append(0)
            elif isinstance(s, slice):
                idx = range(*s.indices(n))
                if len(idx) == 0:
                    block.append(slice(0, 0))
                    post.append(slice(None))
                elif idx.step == 1:
                    block.append(slice(idx.start, idx.stop))
                    post.append(slice(None))
                else:
                    lo, hi = min(idx), max(idx)
                    block.append(slice(lo, hi + 1))
                    stop = idx.stop - lo
                    post.append(slice(idx.start - lo, stop if stop >= 0 else None, idx.step))
            else:
                idx = np.asarray(s)
                if idx.dtype == bool:
                    idx = np.flatnonzero(idx)
                idx = np.where(idx < 0, idx + n, idx).astype(np.int64).reshape(-1)
                if idx.size and (idx.min() < 0 or idx.max() >= n):
                    raise IndexError(f"index out of range for {self.name!r} of length {n}")
                lo = int(idx.min()) if idx.size else 0
                block.append(slice(lo, int(idx.max()) + 1 if idx.size else lo))
                post.append(idx - lo)
        return tuple(block), post

    def __getitem__(self, sel: Any) -> np.ndarray:
        return sync(self.aget(sel))

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]


def _short(message: str) -> str:
    """A StoredArray error without its run-store advice (where, array, chunk, cause)."""
    return (message.split(". The stored")[0].split("; the data")[0]
            .replace(" inside the committed rows", ""))


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
        """Done-marker of every step chunk (bool); a marker that cannot be read counts as not
        done (its chunk is recomputed, and the marker rewritten)."""
        return self._done_markers()[0]

    def _done_markers(self) -> tuple[np.ndarray, list[ChunkProblem]]:
        """(done-marker of every step chunk, a problem for each marker that cannot be read;
        one with chunk None when the marker array itself is gone)."""
        try:
            arr = self.group[DONE]
        except Exception as e:  # noqa: BLE001 - KeyError (deleted), a damaged zarr.json
            rows = self.meta.rows[1] - self.meta.rows[0]
            n = -(-rows // max(1, self.meta.chunk_rows))
            why = "missing" if isinstance(e, KeyError) else f"unreadable ({e!r})"
            return np.zeros(n, dtype=bool), [ChunkProblem(DONE, None, (
                f"array {DONE!r} (the done-markers) is {why}: its metadata (zarr.json) was "
                "deleted or damaged"))]
        try:
            return np.asarray(arr[:], dtype=bool), []
        except Exception:  # noqa: BLE001 - a damaged marker: find it, one chunk at a time
            return self._done_one_by_one(arr)

    def _done_one_by_one(self, arr: zarr.Array) -> tuple[np.ndarray, list[ChunkProblem]]:
        async def one(i: int) -> bool | Exception:
            try:
                return bool((await arr._async_array.getitem(slice(i, i + 1)))[0])
            except Exception as e:  # noqa: BLE001
                return e

        async def _all() -> list[bool | Exception]:
            return await asyncio.gather(*(one(i) for i in range(arr.shape[0])))

        found = sync(_all())
        problems = [ChunkProblem(DONE, i, f"array {DONE!r}, chunk {i} (the done-marker of step "
                                          f"chunk {i}) cannot be read ({type(v).__name__}: {v})")
                    for i, v in enumerate(found) if isinstance(v, Exception)]
        return np.array([v is True for v in found], dtype=bool), problems

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
        """Whole variables, checked (:class:`CheckedArray`), read concurrently."""
        arrays = self._arrays(names)
        checked = [CheckedArray(arrays[n], n, self.where) for n in names]

        async def _all() -> list[np.ndarray]:
            return await asyncio.gather(*(a.aget(slice(None)) for a in checked))

        return dict(zip(names, sync(_all())))

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

    def mark_unfinished(self) -> None:
        """Back to "ready" (a finished store with damaged chunks, before they are recomputed:
        until then it opens as unfinished, never as complete)."""
        if self.meta.state != "ready":
            self.meta = dataclasses.replace(self.meta, state="ready")
            self.group.attrs[ATTR_KEY] = self.meta.to_dict()

    # ------------------------------------------------------------------ checking
    def verify(self, *, integrals: Collection[str],
               progress: Callable[[], None] | None = None) -> list[ChunkProblem]:
        """Read every chunk the store says is written; one :class:`ChunkProblem` per array or
        chunk that is missing, fails its checksum or cannot be decoded (empty: intact).

        What must be written: ``step`` once laid out; the per-chunk variables in every step
        chunk whose done-marker is set (every chunk of a complete store); ``integrals`` (the
        variables written whole at the end) in a complete store. An unreadable done-marker is
        a problem of its step chunk.

        Parameters
        ----------
        integrals : names of the variables written whole once every chunk is done.
        progress : called once per chunk checked.
        """
        if self.meta.state == "layout":
            return []
        done, problems = self._done_markers()
        if self.meta.complete:
            done = np.ones_like(done)
        names = self._variable_names()
        arrays, problems_meta = self._arrays_checked(names)
        problems += problems_meta
        todo: dict[str, list[int]] = {}  # array -> step chunks that must be written
        for name, arr in arrays.items():
            if not arr.ndim or (name != STEP and name in integrals and not self.meta.complete):
                continue
            whole = name == STEP or name in integrals
            todo[name] = [ci for ci in range(-(-arr.shape[0] // arr.chunks[0]))
                          if whole or (ci < done.size and done[ci])]
        limit = asyncio.Semaphore(8)  # bounds the bytes in memory at once

        def rows(arr: CheckedArray | StoredArray, first: int, last: int) -> slice:
            c = arr.chunks[0]
            return slice(first * c, min((last + 1) * c, arr.shape[0]))

        async def one(name: str, arr: StoredArray, ci: int) -> ChunkProblem | None:
            try:
                await arr.aget(rows(arr, ci, ci))
            except StoreCorruptError as e:
                return ChunkProblem(name, ci, _short(str(e)).removeprefix(f"{self.where}: "))
            return None

        async def check(name: str, arr: CheckedArray, chunks: list[int]
                        ) -> list[ChunkProblem | None]:
            # existence from one listing of the array's keys (not a request per chunk)
            sp = arr.arr._async_array.store_path
            prefix = f"{sp.path}/" if sp.path else ""
            keys = {k async for k in sp.store.list_prefix(prefix)}
            grid = [range(-(-n // c)) for n, c in zip(arr.shape[1:], arr.chunks[1:])]
            found: list[ChunkProblem | None] = []
            present = []
            for ci in chunks:
                coords = [(ci,)]
                for r in grid:
                    coords = [c + (i,) for c in coords for i in r]
                lost = [c for c in coords
                        if prefix + arr.arr.metadata.encode_chunk_key(c) not in keys]
                if lost:
                    r = rows(arr, ci, ci)
                    found.append(ChunkProblem(name, ci, (
                        f"array {name!r} is missing chunk {'/'.join(map(str, lost[0]))} "
                        f"(rows {r.start}..{r.stop - 1})")))
                elif coords:
                    present.append(ci)
            # decoding and checksums: consecutive chunks read together (~16 MB), and the
            # chunks of a batch that fails one at a time, to name each bad one
            plain = StoredArray(arr.arr, name, rows=arr.shape[0], samples=None, strict=False,
                                where=self.where)
            row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
            per_batch = max(1, (16 << 20) // max(1, row_bytes * arr.chunks[0]))
            runs: list[list[int]] = []
            for ci in present:
                if not runs or ci != runs[-1][-1] + 1 or len(runs[-1]) >= per_batch:
                    runs.append([])
                runs[-1].append(ci)
            for run in runs:
                async with limit:
                    try:
                        await plain.aget(rows(arr, run[0], run[-1]))
                    except StoreCorruptError:
                        found += await asyncio.gather(*(one(name, plain, ci) for ci in run))
                if progress is not None:
                    for _ in run:
                        progress()
            if progress is not None:
                for _ in range(len(chunks) - len(present)):
                    progress()
            return found

        async def _all() -> list[ChunkProblem | None]:
            out = await asyncio.gather(*(check(n, arrays[n], c) for n, c in todo.items()))
            return [p for found in out for p in found]

        problems += [p for p in sync(_all()) if p is not None]
        return problems

    def _variable_names(self) -> list[str]:
        """The stored variables (from the metadata; the listing for a store without them)."""
        names = self.meta.variables or tuple(n for n, _ in self.group.arrays())
        return [n for n in names if n != DONE]

    def n_checks(self) -> int:
        """An upper bound of the chunks :meth:`verify` reads (for progress bars)."""
        total = 0
        for name, arr in self.group.arrays():
            if name != DONE and arr.ndim:
                total += -(-arr.shape[0] // arr.chunks[0])
        return total

    def _arrays_checked(self, names: list[str]) -> tuple[dict[str, CheckedArray],
                                                          list[ChunkProblem]]:
        """The named arrays as :class:`CheckedArray`, and a problem for each whose metadata is
        missing or unreadable."""
        async def one(n: str) -> Any:
            try:
                return await self.group._async_group.getitem(n)
            except Exception as e:  # noqa: BLE001 - KeyError (deleted), a damaged zarr.json
                return e

        async def _all() -> list[Any]:
            return await asyncio.gather(*(one(n) for n in names))

        arrays, problems = {}, []
        for n, a in zip(names, sync(_all())):
            if isinstance(a, Exception) or not isinstance(a, zarr.AsyncArray):
                why = "missing" if isinstance(a, KeyError) else f"unreadable ({a!r})"
                problems.append(ChunkProblem(n, None, f"array {n!r} is {why}: its metadata "
                                                      "(zarr.json) was deleted or damaged"))
            else:
                try:
                    arrays[n] = CheckedArray(zarr.Array(a), n, self.where)
                except StoreCorruptError as e:  # its codecs lack the checksum
                    problems.append(ChunkProblem(n, None, _short(str(e))))
        return arrays, problems

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
        names = [n for n in self._variable_names() if variables is None or n in variables]
        arrays, problems = self._arrays_checked(names)
        if problems:
            raise StoreCorruptError(f"{self.where}: {problems[0].message}. The analysis store is "
                                    f"damaged: {repair_hint(self.where)}")
        for name, arr in arrays.items():
            dims = tuple(arr.arr.metadata.dimension_names)
            if dims == (name,):
                values: Any = arr[:]
            else:
                # every read is checked: a missing or damaged chunk raises, naming it
                values = da.from_array(arr, chunks=arr.chunks, name=f"trajlab-{name}-{token}",
                                       meta=np.empty((0,) * arr.ndim, dtype=arr.dtype))
            data[name] = xr.Variable(dims, values, attrs=dict(arr.arr.attrs))
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


__all__ = ["DONE", "STEP", "AnalysisStore", "CheckedArray", "ChunkProblem", "repair_hint"]
