"""Reading committed rows of a run store: checked array access and the one decoder of derived
variables (updates from consecutive weights, implied batch gradients, defaults).

Both the lazy xarray view (:class:`trajlab.Run`) and the analysis tasks read through
:class:`RowReader`, so a store variant is decoded in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.core.sync import sync

from trajlab.errors import StoreCorruptError
from trajlab.sketches import sketch_kind
from trajlab.store.layout import DEFAULTS, RunLayout
from trajlab.store.manifest import NONE, ManifestReader, accepts, trailer
from trajlab.store.metadata import LayerMeta
from trajlab.store.names import CHUNKS_ARRAY, SAMPLE, STEP


class StoredArray:
    """One stored array seen through the commit marker: ``shape`` stops at the committed rows
    (and the committed sample capacity), and every read fails loudly.

    A read raises :class:`~trajlab.errors.StoreCorruptError`, naming the array, the chunk and
    its rows, when a chunk fails its checksum or cannot be decoded, and (in checksummed stores,
    where every chunk is written) when a chunk inside the committed rows is missing.

    Parameters
    ----------
    arr : the Zarr array.  name : its path in the store (for messages).
    rows : committed rows.  samples : committed sample capacity (None: the array's own).
    strict : missing chunks are errors.  where : the store, for messages.
    batch : coroutine function returning the batch size of each committed row (lets a strict
        reader accept chunks that hold only sample padding, which are legitimately absent after
        the sample axis grew); awaited only when such a chunk is missing (inside the read's own
        event loop: a synchronous read there would fail with zarr's ``SyncError``).
    manifest : the store's chunk manifest (format 3): every chunk read is first checked to be
        the one written at its position (its CRC32C trailer is one the manifest accepts there).
    """

    def __init__(self, arr: zarr.Array, name: str, *, rows: int, samples: int | None,
                 strict: bool, where: str,
                 batch: Callable[[], Awaitable[np.ndarray]] | None = None,
                 manifest: ManifestReader | None = None) -> None:
        self.arr = arr
        self.name = name
        self.where = where
        self.strict = strict
        self.batch = batch
        self.manifest = manifest
        self.dims: tuple[str, ...] = tuple(arr.metadata.dimension_names or ())
        shape = list(arr.shape)
        if rows > shape[0]:
            raise StoreCorruptError(
                f"{where}: the commit marker says {rows} rows but array {name!r} holds only "
                f"{shape[0]}; the store's metadata is damaged (restore it from a copy)"
            )
        shape[0] = rows
        if samples is not None and SAMPLE in self.dims:
            ax = self.dims.index(SAMPLE)
            shape[ax] = min(shape[ax], samples)
        self.shape = tuple(shape)
        self.dtype = arr.dtype
        self.ndim = len(shape)
        self.chunks = arr.chunks

    # ------------------------------------------------------------------ selection helpers
    def _normalise(self, sel: Any) -> tuple[slice, ...]:
        if not isinstance(sel, tuple):
            sel = (sel,)
        if any(s is Ellipsis for s in sel):
            i = sel.index(Ellipsis)
            sel = sel[:i] + (slice(None),) * (self.ndim - len(sel) + 1) + sel[i + 1:]
        sel = sel + (slice(None),) * (self.ndim - len(sel))
        out = []
        for s, n in zip(sel, self.shape):
            if isinstance(s, (int, np.integer)):
                i = int(s) + (n if s < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {s} out of range for {self.name!r} of length {n}")
                out.append(slice(i, i + 1))
            elif isinstance(s, slice):
                a, b, step = s.indices(n)
                if step != 1:
                    raise IndexError("StoredArray supports unit-step slices only")
                out.append(slice(a, max(a, b)))
            else:
                raise IndexError(f"unsupported selection {s!r}")
        return tuple(out)

    def _chunks_of(self, sel: tuple[slice, ...]) -> list[tuple[int, ...]]:
        ranges = []
        for s, c in zip(sel, self.chunks):
            if s.stop <= s.start:
                return []
            ranges.append(range(s.start // c, (s.stop - 1) // c + 1))
        coords: list[tuple[int, ...]] = [()]
        for r in ranges:
            coords = [c + (i,) for c in coords for i in r]
        return coords

    async def _required(self, coords: tuple[int, ...]) -> bool:
        """Whether a chunk must exist (it holds at least one real, committed value)."""
        if SAMPLE not in self.dims or self.batch is None:
            return True
        ax = self.dims.index(SAMPLE)
        cs = self.chunks[ax]
        if coords[ax] == 0:
            return True
        r0 = coords[0] * self.chunks[0]
        rows = (await self.batch())[r0:r0 + self.chunks[0]]
        return bool(rows.size) and int(rows.max()) > coords[ax] * cs

    def _describe_chunk(self, coords: tuple[int, ...]) -> str:
        r0 = coords[0] * self.chunks[0]
        r1 = min(r0 + self.chunks[0], self.shape[0]) - 1
        return f"chunk {'/'.join(map(str, coords))} (rows {r0}..{r1})"

    # ------------------------------------------------------------------ reading
    async def aget(self, sel: Any) -> np.ndarray:
        """Read ``sel`` (slices/ints over the committed shape), checked."""
        nsel = self._normalise(sel)
        if self.strict:
            await self._check_present(nsel)
        try:
            out = await self.arr._async_array.getitem(nsel)
        except Exception as e:  # noqa: BLE001 - every decoding failure becomes one clear error
            bad = await self._find_bad_chunk(nsel)
            raise StoreCorruptError(
                f"{self.where}: array {self.name!r}, {bad} cannot be read "
                f"({type(e).__name__}: {e}). The stored bytes are damaged: restore the store "
                "from a copy or re-record these steps; `trajlab info --verify` lists every "
                "damaged chunk"
            ) from e
        out = np.asarray(out)
        squeeze = tuple(i for i, s in enumerate(sel if isinstance(sel, tuple) else (sel,))
                        if isinstance(s, (int, np.integer)))
        return out.squeeze(squeeze) if squeeze else out

    def __getitem__(self, sel: Any) -> np.ndarray:
        return sync(self.aget(sel))

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    async def _check_present(self, sel: tuple[slice, ...]) -> None:
        sp = self.arr._async_array.store_path
        prefix = f"{sp.path}/" if sp.path else ""
        coords = self._chunks_of(sel)
        if self.manifest is not None:
            found = await asyncio.gather(*(self._check_position(c) for c in coords))
        else:
            found = await asyncio.gather(*(
                sp.store.exists(prefix + self.arr.metadata.encode_chunk_key(c))
                for c in coords))
        missing = [c for c, ok in zip(coords, found) if not ok and await self._required(c)]
        if missing:
            raise StoreCorruptError(
                f"{self.where}: array {self.name!r} is missing {self._describe_chunk(missing[0])}"
                f"{f' and {len(missing) - 1} more chunk(s)' if len(missing) > 1 else ''} inside "
                "the committed rows; the data there is lost (files deleted?): restore the store "
                "from a copy, or analyse the other steps (`--steps`)"
            )

    async def _check_position(self, coords: tuple[int, ...]) -> bool:
        """Whether the chunk at ``coords`` exists; raises when its file is not the one written
        at that position (its checksum trailer is not one the manifest accepts there)."""
        from zarr.abc.store import SuffixByteRequest
        from zarr.core.buffer import default_buffer_prototype

        assert self.manifest is not None
        sp = self.arr._async_array.store_path
        key = (f"{sp.path}/" if sp.path else "") + self.arr.metadata.encode_chunk_key(coords)
        tail = await sp.store.get(key, default_buffer_prototype(),
                                  byte_range=SuffixByteRequest(4))
        entry = await self.manifest.entry(self.name, coords, self.dims)
        if tail is None:
            return False
        raw = tail.to_bytes()
        if len(raw) == 4 and accepts(entry, trailer(raw)):
            return True
        if len(raw) < 4:
            return True  # too short to hold a checksum: the decoder names it
        recorded = [int(v) for v in entry if int(v) != NONE]
        what = ("the manifest records no chunk written there" if not recorded else
                f"its checksum {trailer(raw):08x} is not the one recorded there "
                f"({' or '.join(f'{v:08x}' for v in recorded)})")
        raise StoreCorruptError(
            f"{self.where}: array {self.name!r}, {self._describe_chunk(coords)} holds a chunk "
            f"file that was not written at this position: {what}. Chunk files were swapped, "
            "moved or copied in from elsewhere, so its values would be wrong: restore the store "
            "from a copy; `trajlab info --verify` lists every such chunk")

    async def _find_bad_chunk(self, sel: tuple[slice, ...]) -> str:
        for c in self._chunks_of(sel):
            csel = tuple(slice(i * n, (i + 1) * n) for i, n in zip(c, self.chunks))
            csel = tuple(slice(s.start, min(s.stop, full))
                         for s, full in zip(csel, self.arr.shape))
            try:
                await self.arr._async_array.getitem(csel)
            except Exception:  # noqa: BLE001
                return self._describe_chunk(c)
        return "a chunk"

    async def verify(self, progress: Callable[[], None] | None = None) -> list[str]:
        """Read every committed chunk; one line per problem."""
        problems = []
        full = self._normalise(slice(None))
        for c in self._chunks_of(full):
            csel = tuple(slice(i * n, min((i + 1) * n, m))
                         for i, n, m in zip(c, self.chunks, self.shape))
            try:
                await self.aget(csel)
            except StoreCorruptError as e:
                problems.append(str(e).split(". The stored")[0].split("; the data")[0])
            if progress is not None:
                progress()
        return problems


def read_many(items: Sequence[tuple[StoredArray, Any]]) -> list[np.ndarray]:
    """``[arr[sel] for arr, sel in items]``, fetched concurrently (one event-loop round trip)."""

    async def _all():
        return await asyncio.gather(*(a.aget(sel) for a, sel in items))

    return list(sync(_all()))


# ----------------------------------------------------------------------------- decoding
def derive_updates(weight: np.ndarray, update: np.ndarray, stored: np.ndarray,
                   next_weight: np.ndarray | None) -> np.ndarray:
    """Updates of rows 0..T-1 from weights (T, m, n), stored updates and flags (T,).

    Where ``stored`` is false, update(t) = weight(t + 1) - weight(t): the writer checked that
    this equals the applied update bit for bit. ``next_weight`` is the weight of the row after
    the last one (None when there is none: then the last row's update must be stored).
    """
    stored = np.asarray(stored, dtype=bool).reshape(-1)
    if stored.all():
        return update
    nxt = weight[1:] if next_weight is None else np.concatenate([weight[1:], next_weight[None]])
    diff = np.full_like(weight, np.nan)
    diff[: nxt.shape[0]] = nxt - weight[: nxt.shape[0]]
    return np.where(stored[:, None, None], update, diff)


class RowReader:
    """Decoded rows of one run store (the committed ones only).

    Parameters
    ----------
    group : the store's root Zarr group.  layout : its :class:`RunLayout`.
    committed : committed rows.  samples : committed sample capacity (None: each array's own).
    where : the store, for messages.
    """

    def __init__(self, group: zarr.Group, layout: RunLayout, committed: int,
                 samples: int | None, where: str) -> None:
        self.group = group
        self.layout = layout
        self.committed = committed
        self.samples = samples
        self.where = where
        self._arrays: dict[str, StoredArray] = {}
        self._batch: np.ndarray | None = None
        self._manifest: ManifestReader | None = None

    def manifest(self) -> ManifestReader | None:
        """The chunk manifest's reader (format 3 stores with committed rows; else None)."""
        if self._manifest is None and self.layout.position_bound and self.committed:
            try:
                arr = self.group[CHUNKS_ARRAY]
            except KeyError:
                raise StoreCorruptError(
                    f"{self.where}: the chunk manifest {CHUNKS_ARRAY!r} that format 3 requires "
                    f"is missing although {self.committed} rows are committed; the store is "
                    "damaged: restore it from a copy") from None
            c = self.layout.meta.chunk_steps
            self._manifest = ManifestReader(arr, self.layout.array_paths(),
                                            -(-self.committed // c), self.committed // c,
                                            self.where)
        return self._manifest

    # ------------------------------------------------------------------ arrays
    def batch_sizes(self) -> np.ndarray:
        """The batch size of every committed row."""
        if self._batch is None:
            if self.committed:
                self.array("batch_size")  # opened outside the event loop (a synchronous call)
            self._batch = sync(self.abatch_sizes())
        return self._batch

    async def abatch_sizes(self) -> np.ndarray:
        """:meth:`batch_sizes` for code already running on Zarr's event loop."""
        if self._batch is None:
            batch = (await self.array("batch_size").aget(slice(None)) if self.committed
                     else np.zeros(0, dtype=np.int32))
            if batch.size and self.samples is not None and (
                    int(batch.max()) > self.samples or int(batch.min()) < 1):
                raise StoreCorruptError(
                    f"{self.where}: the committed sample capacity 'trajlab_samples' is "
                    f"{self.samples}, but committed rows hold batches of {int(batch.min())} to "
                    f"{int(batch.max())} samples; the store's root metadata (zarr.json) was "
                    "edited or is damaged: restore it from a copy")
            self._batch = batch
        return self._batch

    def expected_dtype(self, path: str) -> np.dtype | None:
        """The dtype the layout gives the array at ``path`` (None when it does not know it)."""
        parts = path.split("/")
        if len(parts) == 1:
            var = self.layout.root_vars.get(path)
            return None if var is None else self.layout.dtype(var)
        for lm in self.layout.meta.layers:
            if self.layout.group_path(lm) == "/".join(parts[:-1]):
                var = self.layout.layer_vars(lm).get(parts[-1])
                return None if var is None else self.layout.dtype(var)
        return None

    def array(self, path: str) -> StoredArray:
        """The checked view of the stored array at ``path`` ("lr", "layers/fc1/weight")."""
        if path not in self._arrays:
            try:
                arr = self.group[path]
            except KeyError:
                raise StoreCorruptError(
                    f"{self.where}: array {path!r} is missing although the store has "
                    f"{self.committed} committed rows; the store is damaged"
                ) from None
            want = self.expected_dtype(path)
            if want is not None and np.dtype(arr.dtype) != want:
                raise StoreCorruptError(
                    f"{self.where}: array {path!r} is stored as {np.dtype(arr.dtype)} but the "
                    f"run's metadata says {want}: the metadata was edited or is damaged "
                    "(restore zarr.json from a copy)")
            if self.layout.checksummed and not any(
                    isinstance(c, zarr.codecs.Crc32cCodec) for c in arr.metadata.codecs):
                raise StoreCorruptError(
                    f"{self.where}: array {path!r} has no crc32c checksum in its codecs, which "
                    "this store's format requires of every array: its zarr.json was edited or "
                    "is damaged (damaged chunks would read as wrong numbers); restore it from a "
                    "copy")
            batch = None
            if self.layout.checksummed and path != "batch_size":
                dims = tuple(arr.metadata.dimension_names or ())
                if SAMPLE in dims:
                    self.array("batch_size")  # opened here: abatch_sizes runs inside the loop
                    batch = self.abatch_sizes
            self._arrays[path] = StoredArray(arr, path, rows=self.committed,
                                             samples=self.samples,
                                             strict=self.layout.checksummed,
                                             where=self.where, batch=batch,
                                             manifest=self.manifest())
        return self._arrays[path]

    def has(self, path: str) -> bool:
        try:
            self.group[path]
        except KeyError:
            return False
        return True

    # ------------------------------------------------------------------ rows
    def root_rows(self, names: Sequence[str], rows: tuple[int, int]) -> dict[str, np.ndarray]:
        """Root variables for rows ``rows[0]:rows[1]``."""
        sl = self._slice(rows)
        if any(SAMPLE in self.layout.root_vars[n].dims for n in names
               if n in self.layout.root_vars):
            self.batch_sizes()  # checks the committed sample capacity against the batches
        vals = read_many([(self.array(n), sl) for n in names])
        return dict(zip(names, vals))

    def layer_rows(self, lm: LayerMeta, names: Sequence[str], rows: tuple[int, int]
                   ) -> dict[str, np.ndarray]:
        """Layer variables for rows ``rows[0]:rows[1]``, derived ones decoded.

        ``names`` may include derived variables (``update`` where updates are derived, ``grad``
        of sketch kinds that imply it, defaults such as ``grad_scale`` in older stores).
        Per-sample variables come padded to the committed sample capacity (NaN past each row's
        batch size).
        """
        sl = self._slice(rows)
        base = self.layout.group_path(lm)
        stored = self.layout.layer_vars(lm)
        derived = set(self.layout.derived_vars(lm))
        want: dict[str, tuple[StoredArray, Any]] = {}

        def need(name: str) -> None:
            if name in stored and name not in want:
                want[name] = (self.array(f"{base}/{name}"), sl)

        for n in names:
            if n in stored and not (n == "update" and "update" in derived):
                need(n)
            elif n == "update" and "update" in derived:
                need("update")
                need("update_stored")
            elif n == "grad" and "grad" in derived:
                for k in sketch_kind(lm.sketch).variables(lm.rank):
                    need(k)
            elif n in DEFAULTS:
                pass
            else:
                raise KeyError(f"layer {lm.name!r} has no variable {n!r}; it has "
                               f"{sorted(set(stored) | derived)}")
        extra_weight = None
        if "update" in names and "update" in derived:
            r1 = rows[1]
            if r1 < self.committed:
                extra_weight = (self.array(f"{base}/weight"), slice(r1, r1 + 1))
            need("weight")
        if any(SAMPLE in stored[n].dims for n in want):
            self.batch_sizes()  # checks the committed sample capacity against the batches
        items = list(want.values()) + ([extra_weight] if extra_weight else [])
        vals = read_many(items)
        got = dict(zip(want, vals[: len(want)]))
        out: dict[str, np.ndarray] = {}
        for n in names:
            if n == "update" and "update" in derived:
                nxt = vals[-1][0] if extra_weight else None
                out[n] = derive_updates(got["weight"], got["update"], got["update_stored"], nxt)
            elif n == "grad" and "grad" in derived:
                batch = self.batch_sizes()[sl]
                out[n] = sketch_kind(lm.sketch).implied_grad(got, batch)
            elif n in DEFAULTS and n not in stored:
                out[n] = np.full(rows[1] - rows[0], DEFAULTS[n])
            else:
                out[n] = got[n]
        return out

    def _slice(self, rows: tuple[int, int]) -> slice:
        r0, r1 = rows
        if not 0 <= r0 <= r1 <= self.committed:
            raise IndexError(f"rows {r0}:{r1} outside the {self.committed} committed rows")
        return slice(r0, r1)

    def variable_info(self, lm: LayerMeta | None) -> dict[str, tuple[tuple[str, ...], np.dtype,
                                                                       str]]:
        """(dims with step, dtype, description) of every variable a reader offers."""
        if lm is None:
            return {k: ((STEP, *v.dims), self.layout.dtype(v), v.description)
                    for k, v in self.layout.root_vars.items()}
        stored = self.layout.layer_vars(lm)
        out = {k: ((STEP, *v.dims), self.layout.dtype(v), v.description)
               for k, v in stored.items()}
        from trajlab.store.layout import LAYER_VARS

        for k in self.layout.derived_vars(lm):
            v = LAYER_VARS[k]
            out[k] = ((STEP, *v.dims), self.layout.dtype(v), v.description)
        return out


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-row dicts into arrays with a leading row axis."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}
