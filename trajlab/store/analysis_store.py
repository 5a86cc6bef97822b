"""The analysis store: layout, resume markers, locking and lazy opening (Zarr v3).

An analysis store holds per-(step, layer) and per-step variables chunked along ``step`` only
(whole along ``layer`` and ``sample``): the node that finishes a step chunk writes every
variable of that chunk at once and then sets its done-marker, so a killed analysis resumes with
the unfinished chunks only. Its metadata (:class:`~trajlab.store.metadata.AnalysisMeta`) keys it
to the analysed run's identity and committed rows, so a stale analysis is never returned as new.

Every read is checked as in run stores (:class:`~trajlab.store.rows.StoredArray`): a chunk that
fails its checksum, cannot be decoded, or is missing where the store says it was written, is a
:class:`~trajlab.errors.StoreCorruptError` naming the array and the chunk, never NaN. In format 3
(:class:`~trajlab.store.layout.AnalysisLayout`) each chunk's checksum is also bound to its array
and step chunk by the chunk manifest ``trajlab_chunks`` (:mod:`trajlab.store.manifest`), so a
chunk file swapped with another, or copied in from another array, is such an error too.
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
from trajlab.store.layout import AnalysisLayout
from trajlab.store.manifest import NONE, ManifestReader, empty_row, file_trailer, manifest_spec
from trajlab.store.metadata import AnalysisMeta
from trajlab.store.names import ATTR_KEY, CHUNKS_ARRAY, STEP
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
    fix (recompute it with ``analyze``); with ``manifest`` (format 3), so does a chunk file not
    written at its position. Array-like for ``dask.array.from_array``."""

    def __init__(self, arr: zarr.Array, name: str, where: str,
                 manifest: ManifestReader | None = None) -> None:
        self.arr = arr
        self.name = name
        self.where = where
        self.manifest = manifest
        if not any(isinstance(c, zarr.codecs.Crc32cCodec) for c in arr.metadata.codecs):
            raise StoreCorruptError(
                f"{where}: array {name!r} has no crc32c checksum in its codecs, which every "
                "analysis array has: its zarr.json was edited or is damaged (damaged chunks "
                f"would read as wrong numbers); {repair_hint(where)}")
        self.stored = StoredArray(arr, name, rows=arr.shape[0] if arr.ndim else 0,
                                  samples=None, strict=True, where=where, manifest=manifest)
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
            what = _short(str(e))
            if f"array {self.name!r}" not in what:  # the manifest's own damage
                what = (f"{self.where}: array {self.name!r} cannot be checked: "
                        f"{what.removeprefix(f'{self.where}: ')}")
            raise StoreCorruptError(f"{what}. The analysis store is damaged (a chunk "
                                    "deleted, swapped or its bytes changed): "
                                    f"{repair_hint(self.where)}") from e
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
    """A StoredArray or manifest error without its run-store advice (where, array, chunk,
    cause)."""
    for advice in (". The stored", "; the data", ". Chunk files were", "; restore the store",
                   "; the store is damaged"):
        message = message.split(advice)[0]
    return message.replace(" inside the committed rows", "")


class AnalysisStore:
    """An open analysis store (obtain with :meth:`create` or :meth:`open`)."""

    def __init__(self, group: zarr.Group, meta: AnalysisMeta, where: str,
                 layout: AnalysisLayout | None = None) -> None:
        self.group = group
        self.meta = meta
        self.where = where
        self.layout = layout or AnalysisLayout.of_group(group, meta, where)
        self._reader: ManifestReader | None = None

    @property
    def unchecked(self) -> str | None:
        """What :meth:`verify` cannot check in this store's format (None: everything)."""
        return self.layout.unchecked

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
            arrays[name] = {"shape": shape, "chunks": chunks, "dtype": dtype,
                            "fill_value": _fill(dtype), "dimension_names": dims,
                            "attributes": {"description": desc},
                            "compressors": compressors_for(np.dtype(dtype))}
        arrays[DONE] = {"shape": (n_chunks,), "chunks": (1,), "dtype": "uint8", "fill_value": 0,
                        "dimension_names": ("chunk",),
                        "compressors": compressors_for(np.dtype("uint8")),
                        "attributes": {"description": "1 = this step chunk is written"}}
        layout = AnalysisLayout.for_meta(meta)
        if layout.position_bound:
            spec = manifest_spec(len(layout.array_paths()), n_chunks)
            arrays[spec.pop("name")] = spec
        _create_arrays(group, arrays)
        meta = dataclasses.replace(meta, state="ready")
        group.attrs[ATTR_KEY] = meta.to_dict()
        return cls(group, meta, str(target.store), layout)

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
        """Write every variable of step chunk ``ci`` (rows relative to the store), record their
        checksums in the chunk manifest (format 3), then mark the chunk done (last: a chunk is
        done only once all of it is written and bound to its position)."""
        arrays = self._arrays([*values, DONE, *self._manifest_name()])
        write_many([(arrays[n].with_config(_CONFIG), rows, v) for n, v in values.items()])
        self._bind(arrays, {n: [ci] for n in values})
        arrays[DONE].with_config(_CONFIG)[ci] = 1

    def write_all(self, values: Mapping[str, np.ndarray]) -> None:
        """Write whole variables (the series-wide integrals, ``step``) and record their
        checksums in the chunk manifest (format 3). Their commit is the store's state
        "complete" (``step``: verify checks it in any state, and ``analyze`` rewrites it when
        it fails, a kill between its write and its manifest entry included)."""
        arrays = self._arrays([*values, *self._manifest_name()])
        write_many([(arrays[n].with_config(_CONFIG), slice(None), v) for n, v in values.items()])
        self._bind(arrays, {n: range(-(-arrays[n].shape[0] // arrays[n].chunks[0]))
                            for n in values if arrays[n].ndim})

    def _bind(self, arrays: Mapping[str, zarr.Array],
              chunks: Mapping[str, Collection[int]]) -> None:
        """Record in the chunk manifest the checksum of each just-written chunk file (``chunks``:
        array name -> step chunks), read back from the file (:func:`manifest.file_trailer`;
        ``arrays`` holds the manifest too, when :meth:`_manifest_name` asked for it).
        Each touched manifest row is read, updated and rewritten whole; a row that cannot be
        read, or is not its own, is started afresh (the other arrays' chunks of that step chunk
        then fail their check and are recomputed, never accepted unchecked). Nothing in a
        format-2 store."""
        if not self.layout.position_bound or not chunks:
            return
        got = arrays.get(CHUNKS_ARRAY)
        man = (got if isinstance(got, zarr.Array) else self._manifest_array()).with_config(_CONFIG)
        paths = self.layout.array_paths()
        index = {p: i for i, p in enumerate(paths)}
        steps = sorted({ci for cs in chunks.values() for ci in cs})
        jobs = [(n, ci) for n, cs in chunks.items() for ci in cs]

        async def row(ci: int) -> np.ndarray:
            try:
                got = np.asarray(await man._async_array.getitem(slice(ci, ci + 1)))[0]
            except Exception:  # noqa: BLE001 - damaged: started afresh (see above)
                got = None
            if got is None or got.shape[0] != len(paths) + 1 or \
                    tuple(int(v) for v in got[-1, 0]) != (ci, ci):
                got = empty_row(ci, len(paths), man.shape[2])
            return got

        async def _all() -> None:
            rows = dict(zip(steps, await asyncio.gather(*(row(ci) for ci in steps))))
            crcs = await asyncio.gather(*(
                file_trailer(arrays[n], (ci, *(0,) * (arrays[n].ndim - 1))) for n, ci in jobs))
            for (n, ci), crc in zip(jobs, crcs):
                rows[ci][index[n], 0] = (NONE if crc is None else crc, NONE)
            await asyncio.gather(*(man._async_array.setitem(slice(ci, ci + 1), rows[ci][None])
                                   for ci in steps))

        sync(_all())

    def _manifest_name(self) -> list[str]:
        """``[CHUNKS_ARRAY]`` where the format has a manifest (opened with the arrays a write
        touches, in one round trip), else ``[]``."""
        return [CHUNKS_ARRAY] if self.layout.position_bound else []

    def _manifest_array(self) -> zarr.Array:
        """The chunk manifest (format 3); a StoreCorruptError when it is gone."""
        try:
            arr = self.group[CHUNKS_ARRAY]
        except Exception as e:  # KeyError (deleted), a damaged zarr.json
            raise StoreCorruptError(
                f"{self.where}: the chunk manifest {CHUNKS_ARRAY!r} that analysis format 3 "
                f"requires is missing or unreadable ({type(e).__name__}); without it no chunk "
                "can be checked to sit at its position") from e
        if not isinstance(arr, zarr.Array):
            raise StoreCorruptError(f"{self.where}: {CHUNKS_ARRAY!r} is not an array; the store "
                                    "is damaged")
        return arr

    def _manifest_reader(self, *, fresh: bool = False) -> ManifestReader | None:
        """The manifest's reader for checks on read (None in format 2). Its rows are cached in
        a complete store (they no longer change) and ``fresh`` ones (a snapshot for one
        verification); else read afresh for every chunk."""
        if not self.layout.position_bound:
            return None
        if self._reader is not None and not fresh:
            return self._reader
        arr = self._manifest_array()
        n = int(arr.shape[0])
        reader = ManifestReader(arr, self.layout.array_paths(), n,
                                n if (fresh or self.meta.complete) else 0, self.where)
        if not fresh:
            self._reader = reader
        return reader

    def read(self, names: list[str]) -> dict[str, np.ndarray]:
        """Whole variables, checked (:class:`CheckedArray`), read concurrently (format 3: the
        manifest's rows read once, first, for all of them)."""
        arrays = self._arrays(names)
        manifest = self._manifest_reader(fresh=True)
        checked = [CheckedArray(arrays[n], n, self.where, manifest) for n in names]

        async def preload(ci: int) -> None:
            try:
                await manifest.row(ci)
            except StoreCorruptError:
                pass  # raised again, naming the array, by the read that needs the row

        async def _all() -> list[np.ndarray]:
            if manifest is not None:
                await asyncio.gather(*(preload(ci) for ci in range(manifest.arr.shape[0])))
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
        self._reader = None  # its rows may be cached from now on

    def mark_unfinished(self) -> None:
        """Back to "ready" (a finished store with damaged chunks, before they are recomputed:
        until then it opens as unfinished, never as complete)."""
        if self.meta.state != "ready":
            self.meta = dataclasses.replace(self.meta, state="ready")
            self.group.attrs[ATTR_KEY] = self.meta.to_dict()
            self._reader = None  # rows cached while complete will be rewritten

    # ------------------------------------------------------------------ checking
    def verify(self, *, integrals: Collection[str],
               progress: Callable[[], None] | None = None) -> list[ChunkProblem]:
        """Read every chunk the store says is written; one :class:`ChunkProblem` per array or
        chunk that is missing, fails its checksum or cannot be decoded, or (format 3) holds a
        file not written at its position (empty: intact; :attr:`unchecked` says what a format-2
        store cannot be checked for).

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
        arrays, problems_meta = self._arrays_checked(names, fresh=True)
        problems += problems_meta
        unbound = self._check_manifest(arrays)  # its bad rows, named once each
        problems += unbound
        todo: dict[str, list[int]] = {}  # array -> step chunks that must be written
        for name, arr in arrays.items():
            if not arr.ndim or (name != STEP and name in integrals and not self.meta.complete):
                continue
            whole = name == STEP or name in integrals
            todo[name] = [ci for ci in range(-(-arr.shape[0] // arr.chunks[0]))
                          if (whole or (ci < done.size and done[ci]))
                          and not any(p.chunk == ci for p in unbound)]
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
            # (format 3: strict, for the position check of each chunk, a 4-byte read)
            plain = StoredArray(arr.arr, name, rows=arr.shape[0], samples=None,
                                strict=arr.manifest is not None, where=self.where,
                                manifest=arr.manifest)
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

    def _check_manifest(self, arrays: Mapping[str, CheckedArray]) -> list[ChunkProblem]:
        """A problem (array ``trajlab_chunks``, step chunk) for every manifest row that cannot
        be read or is not its own (a swapped or moved manifest file): the chunks of that step
        chunk cannot be checked, so :meth:`verify` names the row once instead of each of
        them. The good rows stay cached in the readers of ``arrays``."""
        manifest = next((a.manifest for a in arrays.values() if a.manifest is not None), None)
        if manifest is None:
            return []

        async def one(ci: int) -> ChunkProblem | None:
            try:
                await manifest.row(ci)
            except StoreCorruptError as e:
                return ChunkProblem(CHUNKS_ARRAY, ci, (
                    f"{_short(str(e)).removeprefix(f'{self.where}: ')}; the chunks of step "
                    f"chunk {ci} cannot be checked"))
            return None

        async def _all() -> list[ChunkProblem | None]:
            return await asyncio.gather(*(one(ci) for ci in range(manifest.arr.shape[0])))

        return [p for p in sync(_all()) if p is not None]

    def _variable_names(self) -> list[str]:
        """The stored variables (from the metadata; the listing for a store without them)."""
        names = self.meta.variables or tuple(n for n, _ in self.group.arrays())
        return [n for n in names if n not in (DONE, CHUNKS_ARRAY)]

    def n_checks(self) -> int:
        """An upper bound of the chunks :meth:`verify` reads (for progress bars)."""
        total = 0
        for name, arr in self.group.arrays():
            if name not in (DONE, CHUNKS_ARRAY) and arr.ndim:
                total += -(-arr.shape[0] // arr.chunks[0])
        return total

    def _arrays_checked(self, names: list[str], *, fresh: bool = False
                        ) -> tuple[dict[str, CheckedArray], list[ChunkProblem]]:
        """The named arrays as :class:`CheckedArray`, and a problem for each whose metadata is
        missing or unreadable, and for a format-3 manifest that is (``fresh``: the manifest's
        rows read for this call only, see :meth:`_manifest_reader`)."""
        async def one(n: str) -> Any:
            try:
                return await self.group._async_group.getitem(n)
            except Exception as e:  # noqa: BLE001 - KeyError (deleted), a damaged zarr.json
                return e

        async def _all() -> list[Any]:
            return await asyncio.gather(*(one(n) for n in names))

        arrays, problems = {}, []
        try:
            manifest = self._manifest_reader(fresh=fresh)
        except StoreCorruptError as e:
            return {}, [ChunkProblem(CHUNKS_ARRAY, None, _short(str(e)).removeprefix(
                f"{self.where}: "))]
        for n, a in zip(names, sync(_all())):
            if isinstance(a, Exception) or not isinstance(a, zarr.AsyncArray):
                why = "missing" if isinstance(a, KeyError) else f"unreadable ({a!r})"
                problems.append(ChunkProblem(n, None, f"array {n!r} is {why}: its metadata "
                                                      "(zarr.json) was deleted or damaged"))
            else:
                try:
                    arrays[n] = CheckedArray(zarr.Array(a), n, self.where, manifest)
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
