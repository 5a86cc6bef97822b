"""Writing run stores (Zarr v3): create, append committed rows, grow, trim, mark truncated.

The writer appends rows (one row = one recorded step) to arrays chunked along ``step`` and then
advances the commit marker, the root attribute ``trajlab_committed`` (with the committed sample
capacity ``trajlab_samples`` in the same metadata write). Readers only ever look at the first
``trajlab_committed`` rows and ``trajlab_samples`` samples, so a writer killed at any moment —
between two array writes, between two array resizes, before the marker — leaves a store that
opens at its last committed step, and a resumed writer overwrites the uncommitted tail. Every
Zarr write (chunk or metadata document) replaces a whole object atomically on local disks and
object stores.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zarr
import zarr.codecs

from trajlab.errors import StoreCorruptError, StoreError
from trajlab.store.codecs import Profile, codecs_for, crc32c_of, fill_value
from trajlab.store.encode_pool import EncodePool
from trajlab.store.layout import RunLayout
from trajlab.store.local_create import Unsupported, create_nodes
from trajlab.store.local_docs import array_root, resize_local, write_doc
from trajlab.store.manifest import NONE, accepts, manifest_spec, sample_chunks, trailer
from trajlab.store.metadata import RunMeta
from trajlab.store.names import (
    ATTR_KEY,
    CHUNKS_ARRAY,
    COMMIT_KEY,
    IN,
    LAYER_ATTR_KEY,
    LAYERS_GROUP,
    OUT,
    RANK,
    SAMPLE,
    SAMPLES_KEY,
    STEP,
    TRUNCATION_ARRAY,
    TRUNCATION_RESERVE,
)
from trajlab.store.reader import read_commit
from trajlab.store.rows import StoredArray, read_many
from trajlab.store.target import StoreLike, Target, check_writable, create_group, inspect

_WRITE_CONFIG = {"write_empty_chunks": True}


@dataclass
class StepRecord:
    """Everything recorded at one step, as host arrays.

    ``root`` maps root variable names to scalars or 1-d arrays (``indices``); ``layers`` maps
    layer names to {variable: array without the step axis}. Per-sample arrays hold exactly
    ``batch_size`` rows; the writer pads them to the store's sample capacity.
    """

    root: dict[str, Any]
    layers: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _concurrently(coroutines) -> None:
    """Run Zarr's async operations together on Zarr's event loop (one round trip)."""
    import asyncio

    from zarr.core.sync import sync

    async def _all() -> None:
        await asyncio.gather(*coroutines)

    sync(_all())


def write_many(items) -> None:
    """``arr[sel] = value`` for every item, written concurrently."""
    _concurrently([a._async_array.setitem(sel, v) for a, sel, v in items])


def _gathered(coroutines) -> list:
    """The results of Zarr's async operations run together on Zarr's event loop."""
    import asyncio

    from zarr.core.sync import sync

    async def _all() -> list:
        return list(await asyncio.gather(*coroutines))

    return sync(_all())


def resize_many(items) -> None:
    """``arr.resize(shape)`` for every item. Arrays of a local store have their metadata
    documents written here directly (:mod:`trajlab.store.local_docs`: ~35 resizes through
    Zarr's event loop took 10-90 ms of the writer thread beside training); others through
    Zarr, concurrently (one by one, a resize of the ~30 arrays of an MLP store took ~90 ms)."""
    remote = []
    for arr, shape in items:
        root = array_root(arr)
        if root is None:
            remote.append((arr, shape))
        else:
            resize_local(arr, root, shape)
    if remote:
        _concurrently([a._async_array.resize(shape) for a, shape in remote])


#: Rows allocated along ``step`` at the first append (whole chunks): growing costs a metadata
#: write per array, so short runs should not grow chunk by chunk; readers cut at the commit
#: marker and :meth:`RunStoreWriter.finalize` trims to the committed rows.
MIN_CAPACITY = 64


class RunStoreWriter:
    """Append-only writer of a run store; not thread-safe (one writer thread owns it).

    Parameters
    ----------
    store : path, fsspec URL or Zarr store.
    mode : ``"w-"`` create, fail if a run store exists; ``"w"`` replace an existing *run store*;
        ``"a"`` append to an existing run store (created if absent). Nothing that is not a
        trajlab run store is ever replaced or written into, in any mode.
    storage_options : passed to fsspec for URLs.
    codec_profile : ``"fast"`` (LZ4, default) or ``"small"`` (zstd-1) compression of float
        variables in a new store (:func:`trajlab.store.codecs.codecs_for`); an existing store
        keeps its codecs.
    """

    def __init__(
        self,
        store: StoreLike,
        *,
        mode: Literal["w-", "w", "a"] = "w-",
        storage_options: dict | None = None,
        codec_profile: Profile = "fast",
    ) -> None:
        if mode not in ("w-", "w", "a"):
            raise ValueError(f"mode must be 'w-', 'w' or 'a', got {mode!r}")
        self.store = store
        self.mode = mode
        self.storage_options = storage_options
        self.codec_profile = codec_profile
        self.group: zarr.Group | None = None
        self.meta: RunMeta | None = None
        self.layout: RunLayout | None = None
        self.committed = 0
        self.capacity = 0  # rows allocated along step (whole chunks)
        self.sample_capacity = 0  # committed sample capacity
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._manifest: zarr.Array | None = None  # format 3: the chunk manifest
        self._index: dict[str, int] = {}  # array path -> its index in the manifest
        self._scratch: dict[tuple[str, str], np.ndarray] = {}  # reused row blocks (append)
        self._transposed: dict[str, np.ndarray] = {}  # reused transposed chunks (one per array)
        self._executor: EncodePool | None = None  # created at the first whole-chunk write
        self._assisting = False
        self._assist_source: Callable[[], bool] | None = None
        #: Called before every write of the store's metadata and before each append's data;
        #: raises when this writer's store lock changed hands (trajlab.store.lock.Fence).
        self.fence: Callable[[], None] | None = None
        self.target: Target = inspect(store, storage_options=storage_options)
        check_writable(self.target, "run", overwrite=mode == "w", resume=mode == "a")
        if self.target.state == "run" and mode == "a":
            group = self._open("r+")
            attrs = group.attrs.asdict()
            meta = RunMeta.from_dict(attrs[ATTR_KEY], where=str(store))
            committed = read_commit(attrs, str(store))
            if committed > 0:
                self.meta, self.group, self.committed = meta, group, committed
                self.layout = RunLayout.of_group(group, meta)
                if self.layout.variant == "v1":
                    raise StoreError(
                        f"{store!r} is a format-1 store of the first release; trajlab cannot "
                        "append to it (record the continuation into a new store)"
                    )
                self._bind_arrays()
                self.capacity = min(a.shape[0] for a in self._arrays.values())
                samples = attrs.get(SAMPLES_KEY)
                self.sample_capacity = (int(samples) if isinstance(samples, int)
                                        else self._sample_sizes()[0])
            # else: created, but killed before its first commit: laid out anew by create()

    def _open(self, mode: str) -> zarr.Group:
        kw: dict[str, Any] = {"mode": mode}
        if self.storage_options is not None:
            kw["storage_options"] = self.storage_options
        return zarr.open_group(self.store, zarr_format=3, **kw)

    # ----------------------------------------------------------------- layout
    @property
    def is_created(self) -> bool:
        return self.group is not None

    @property
    def last_step(self) -> int | None:
        """Step index of the last committed row, None for an empty store."""
        if self.group is None or self.committed == 0:
            return None
        return int(self._arrays[("", "step")][self.committed - 1])

    def last_row(self, layer: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Variables of one layer at the last committed row (for continuity checks)."""
        from trajlab.store.rows import RowReader

        assert self.meta is not None and self.layout is not None and self.group is not None
        reader = RowReader(self.group, self.layout, self.committed, self.sample_capacity,
                           str(self.store))
        rows = reader.layer_rows(self.meta.layer(layer), names,
                                 (self.committed - 1, self.committed))
        return {k: v[0] for k, v in rows.items()}

    def create(self, meta: RunMeta, *, sample_capacity: int) -> None:
        """Lay out a new store for ``meta`` (replacing a run store when mode is "w"/"a")."""
        sample_capacity = max(1, int(sample_capacity))
        self._check_fence()
        attrs = {ATTR_KEY: meta.to_dict(), COMMIT_KEY: 0, SAMPLES_KEY: sample_capacity}
        # The group document (metadata, zero commit marker) is written first and atomically:
        # a store killed during creation opens as an empty run and is laid out anew on resume.
        group = create_group(self.target, "run", attrs)
        self.target = inspect(self.store, storage_options=self.storage_options)
        layout = RunLayout.for_meta(meta)
        c = meta.chunk_steps
        # Arrays are created with the rows of the first append's growth (whole chunks, as in
        # append): one metadata write per array less (readers cut at the commit marker).
        rows = math.ceil(MIN_CAPACITY / c) * c
        # Then every other node: the layer groups (parents first) and the arrays, each
        # (parent group path, key, create_array arguments).
        groups = [(LAYERS_GROUP, {})] + [(f"{LAYERS_GROUP}/{lm.group}",
                                          {LAYER_ATTR_KEY: lm.to_dict()}) for lm in meta.layers]
        specs: list[tuple[str, tuple[str, str] | None, dict[str, Any]]] = [
            ("", None, self._truncation_spec())]
        if layout.position_bound:
            specs.append(("", None, manifest_spec(len(layout.array_paths()), rows // c)))
        for name, var in layout.root_vars.items():
            specs.append(("", ("", name),
                          self._spec(name, var, layout, c, rows, layout.sizes(sample_capacity))))
        for lm, (path, _) in zip(meta.layers, groups[1:]):
            sizes = {SAMPLE: sample_capacity, OUT: lm.shape[0], IN: lm.shape[1], RANK: lm.rank}
            for name, var in layout.layer_vars(lm).items():
                specs.append((path, (lm.name, name),
                              self._spec(name, var, layout, c, rows, sizes)))
        made = self._create_nodes(group, groups, [(path, kw) for path, _, kw in specs])
        arrays = [a.with_config(_WRITE_CONFIG) for a in made]
        self._write_truncation_reserve(arrays[0])
        self.group, self.meta, self.layout, self.committed = group, meta, layout, 0
        self.capacity = rows
        self._scratch = {}
        self._transposed = {}
        self.sample_capacity = sample_capacity
        self._arrays = {key: arr for (_, key, _), arr in zip(specs, arrays) if key is not None}
        self._manifest = arrays[1] if layout.position_bound else None
        self._index = {p: i for i, p in enumerate(layout.array_paths())}

    def _create_nodes(self, group: zarr.Group, groups: list[tuple[str, dict[str, Any]]],
                      arrays: list[tuple[str, dict[str, Any]]]) -> list[zarr.Array]:
        """Create the groups (path, attributes; parents first) and arrays (parent path,
        ``create_array`` arguments) of a new store under its root ``group``.

        A local store's documents are written directly (:mod:`trajlab.store.local_create`:
        Zarr's own metadata, no event-loop round trip); any other store's through Zarr, each
        level's documents together (one round trip of Zarr's event loop per level instead of
        two per array: ~270 -> ~60 ms for an MLP)."""
        if self.target.path is not None:
            try:
                return create_nodes(group, groups, arrays)
            except Unsupported:
                pass  # this Zarr release: through Zarr below (nothing was written)
        made: dict[str, Any] = {"": group._async_group}
        levels: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        for path, attrs in groups:
            levels.setdefault(path.count("/"), []).append((path, attrs))
        for depth in sorted(levels):  # one round trip per level
            level = levels[depth]
            got = _gathered([made[path.rpartition("/")[0]].create_group(
                path.rpartition("/")[2], attributes=attrs) for path, attrs in level])
            made.update(zip((path for path, _ in level), got))
        created = _gathered([made[parent].create_array(**kw) for parent, kw in arrays])
        return [zarr.Array(a) for a in created]

    def _spec(self, name, var, layout: RunLayout, chunk_steps: int, rows: int,
              sizes) -> dict[str, Any]:
        """Keyword arguments of ``create_array`` (name included) of one variable's array of
        ``rows`` steps."""
        dtype = layout.dtype(var)
        shape = (rows, *(sizes[d] for d in var.dims))
        return {
            "name": name,
            "shape": shape,
            "chunks": (chunk_steps, *(max(1, s) for s in shape[1:])),
            "dtype": dtype,
            "fill_value": fill_value(dtype),
            "dimension_names": (STEP, *var.dims),
            **codecs_for(name, len(shape), dtype, checksum=layout.checksummed,
                         profile=self.codec_profile),
            "attributes": {"description": var.description},
        }

    def _bind_arrays(self) -> None:
        assert self.group is not None and self.meta is not None and self.layout is not None
        lay = self.layout
        self._arrays = {("", n): self.group[n].with_config(_WRITE_CONFIG)
                        for n in lay.root_vars}
        for lm in self.meta.layers:
            lg = self.group[lay.group_path(lm)]
            for name in lay.layer_vars(lm):
                self._arrays[(lm.name, name)] = lg[name].with_config(_WRITE_CONFIG)
        self._manifest = None
        if lay.position_bound:
            try:
                self._manifest = self.group[CHUNKS_ARRAY].with_config(_WRITE_CONFIG)
            except KeyError:
                raise StoreError(
                    f"{self.store!r}: the chunk manifest {CHUNKS_ARRAY!r} that format 3 "
                    "requires is missing; the store is damaged (restore it from a copy, or "
                    "record into a new store)") from None
            self._index = {p: i for i, p in enumerate(lay.array_paths())}

    def _sample_arrays(self) -> list[tuple[zarr.Array, int]]:
        out = []
        for arr in self._arrays.values():
            dims = tuple(arr.metadata.dimension_names or ())
            if SAMPLE in dims:
                out.append((arr, dims.index(SAMPLE)))
        return out

    def _sample_sizes(self) -> tuple[int, int]:
        sizes = [arr.shape[ax] for arr, ax in self._sample_arrays()]
        return (min(sizes), max(sizes)) if sizes else (0, 0)

    def _grow_samples(self, n: int) -> None:
        """Give every per-sample array at least ``n`` samples. Each resize is its own metadata
        write; readers keep to the committed capacity until the next commit records ``n``."""
        todo = []
        for arr in self._arrays.values():
            dims = tuple(arr.metadata.dimension_names or ())
            if SAMPLE not in dims:
                continue
            ax = dims.index(SAMPLE)
            if arr.shape[ax] < n:
                shape = list(arr.shape)
                shape[ax] = n
                todo.append((arr, tuple(shape)))
        resize_many(todo)
        man = self._manifest
        if man is not None:
            need = max(sample_chunks(arr) for arr in self._arrays.values())
            if need > man.shape[2]:
                resize_many([(man, (man.shape[0], man.shape[1], need, 2))])
        self.sample_capacity = n

    # ----------------------------------------------------------------- writing
    def append(self, records: list[StepRecord]) -> int:
        """Write ``records`` after the committed rows, then commit them. Returns committed rows.

        Arrays grow geometrically by whole chunks (readers cut at the commit marker;
        :meth:`finalize` trims), and all arrays are written concurrently.
        """
        if not records:
            return self.committed
        assert self.group is not None and self.meta is not None, "create() first"
        self._check_fence()
        n_max = max(int(r.root["batch_size"]) for r in records)
        lo, hi = self._sample_sizes()
        if n_max > self.sample_capacity or n_max > lo or lo != hi:
            # Also repairs a writer killed mid-growth: arrays left at different sizes, or all
            # grown but the commit marker's capacity not yet updated (a resumed writer reads the
            # old capacity; committing it again would cut every later row to the old width).
            self._grow_samples(max(n_max, hi, self.sample_capacity))
        start, stop = self.committed, self.committed + len(records)
        if stop > self.capacity:
            # Grow geometrically (whole chunks): O(log T) metadata rewrites for a run of T rows.
            # (at least MIN_CAPACITY rows at once: each resize rewrites every array's metadata)
            c = self.meta.chunk_steps
            self._resize_steps(math.ceil(max(stop, 2 * self.capacity, MIN_CAPACITY) / c) * c)
        writes, pending, blocks = [], [], {}
        for key, arr in self._arrays.items():
            layer, name = key
            if layer == "":
                rows = [r.root.get(name) for r in records]
            elif name == "step":
                rows = [r.root["step"] for r in records]
            else:
                rows = [r.layers[layer].get(name) for r in records]
            block = self._stack(arr, rows, name, self._block(key, arr, len(rows)))
            if self._manifest is not None:
                blocks[key] = block
            elif self._whole_chunk(arr, start, block):
                # encoded and written by a small pool: the codecs and file writes release
                # the GIL, so a flush overlaps the encoding of one array with another's I/O
                pending.append(self._pool().submit(self._write_whole_chunk, arr, start, block))
            else:
                writes.append((arr, slice(start, stop), block))
        if blocks:
            self._write_bound(blocks, start, stop)
        for f in pending:
            f.result()
        if writes:
            write_many(writes)
        self._check_fence()
        self.group.attrs.update({COMMIT_KEY: stop, SAMPLES_KEY: self.sample_capacity})
        self.committed = stop
        return stop

    def _check_fence(self) -> None:
        if self.fence is not None:
            self.fence()

    def _pool(self) -> EncodePool:
        if self._executor is None:
            from trajlab.priority import background_thread, spare_cpus

            # one core stays with training (two encoders on a 2-core machine slowed a training
            # step 1.25-1.9x during flushes), and the encoders yield to it (trajlab.priority);
            # one more encodes only while the producer is behind (assist, assist_when)
            self._executor = EncodePool(spare_cpus(), 1, initializer=background_thread,
                                        assist_source=self._assist_source)
            self._executor.assist(self._assisting)
        return self._executor

    def assist_when(self, source: Callable[[], bool]) -> None:
        """Also encode with one more thread while ``source()`` is true (a flag set by another
        process: the training process of a writer process); before the first write."""
        self._assist_source = source

    def assist(self, on: bool) -> None:
        """Encode with one more thread while ``on`` (the producer waits on the writer: its
        core is idle; see :mod:`trajlab.store.encode_pool`). Callable from any thread."""
        self._assisting = bool(on)
        pool = self._executor
        if pool is not None:
            pool.assist(on)

    def _whole_chunk(self, arr: zarr.Array, start: int, block: np.ndarray) -> bool:
        """Whether ``block`` is exactly one whole chunk of ``arr`` in a local store, with
        codecs :meth:`_write_whole_chunk` knows."""
        c = arr.chunks[0]
        known = (zarr.codecs.TransposeCodec, zarr.codecs.BytesCodec, zarr.codecs.BloscCodec,
                 zarr.codecs.Crc32cCodec)
        return (self.target.path is not None and not start % c and block.shape[0] == c
                and tuple(arr.chunks[1:]) == tuple(arr.shape[1:])
                and all(isinstance(codec, known) for codec in arr.metadata.codecs))

    def _write_whole_chunk(self, arr: zarr.Array, start: int, block: np.ndarray) -> bool:
        """Encode and write ``block`` as one whole chunk file of a local store, without Zarr's
        async machinery (which costs ~3x the codecs' own CPU time per chunk here); False (the
        caller writes through Zarr) unless ``block`` is exactly one chunk of ``arr`` and every
        codec is one this path knows. The file is written as Zarr writes it: encoded by the
        array's own codec objects, to a temporary file renamed over the chunk (atomic)."""
        root = self.target.path
        c = arr.chunks[0]
        if (root is None or start % c or block.shape[0] != c
                or tuple(arr.chunks[1:]) != tuple(arr.shape[1:])):
            return False
        encoded = self._encode_chunk(arr, block)
        if encoded is None:
            return False
        self._write_chunk_file(arr, (start // c, *(0 for _ in arr.shape[1:])), encoded[0])
        return True

    def _encode_chunk(self, arr: zarr.Array, block: np.ndarray
                      ) -> tuple[tuple[Any, ...], int] | None:
        """The bytes of one whole chunk of ``arr`` (a tuple of buffers) and the CRC32C its
        ``crc32c`` codec appends (or None: a codec this path does not know, or no checksum).
        Encoded by the array's own codec objects, so the bytes are those Zarr would write."""
        crc_value = None
        data: Any = block
        for codec in arr.metadata.codecs:
            if isinstance(codec, zarr.codecs.TransposeCodec):
                moved = data.transpose(codec.order)
                out = self._transposed.get(arr.path)
                if out is None or out.shape != moved.shape or out.dtype != moved.dtype:
                    out = self._transposed[arr.path] = np.empty(moved.shape, moved.dtype)
                np.copyto(out, moved)  # into a reused buffer: fresh pages cost a fault each
                data = out
            elif isinstance(codec, zarr.codecs.BytesCodec):
                order = "<" if codec.endian is None or codec.endian.value == "little" else ">"
                data = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder(order)
                                            if data.dtype.itemsize > 1 else data.dtype)
                data = data.reshape(-1).view(np.uint8)
            elif isinstance(codec, zarr.codecs.BloscCodec):
                data = np.frombuffer(codec._blosc_codec.encode(data), dtype=np.uint8)
            elif isinstance(codec, zarr.codecs.Crc32cCodec):
                crc_value = crc32c_of(data)
                crc = np.array([crc_value], dtype="<u4").view(np.uint8)
                data = (data, crc)
            else:
                return None
        if crc_value is None:
            return None
        parts = data if isinstance(data, tuple) else (data,)
        return parts, crc_value

    def _write_chunk_file(self, arr: zarr.Array, coords: tuple[int, ...],
                          parts: tuple[Any, ...]) -> None:
        """Write one encoded chunk at ``coords``, replacing the old one atomically (a local
        store: a temporary file renamed over it; any other: one Zarr store write)."""
        key = arr.metadata.encode_chunk_key(coords)
        root = self.target.path
        if root is None:
            from zarr.core.buffer import default_buffer_prototype
            from zarr.core.sync import sync

            sp = arr._async_array.store_path
            full = (f"{sp.path}/" if sp.path else "") + key
            buf = default_buffer_prototype().buffer.from_bytes(
                b"".join(bytes(memoryview(p)) for p in parts))
            sync(sp.store.set(full, buf))
            return
        path = root / arr.path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{id(parts):x}.partial")
        try:
            with open(tmp, "wb") as f:
                f.writelines(memoryview(part) for part in parts)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # ----------------------------------------------------------------- format 3
    def _write_bound(self, blocks: dict[tuple[str, str], np.ndarray], start: int,
                     stop: int) -> None:
        """Write rows ``start:stop`` (``blocks``: one per array) as whole chunk files, each
        chunk's checksum recorded in the chunk manifest first (:mod:`trajlab.store.manifest`).

        A chunk that already holds committed rows (a flush of less than a chunk before) is
        read back, extended and rewritten; its manifest entry then accepts the old file and
        the new one, so a kill between the manifest write and the chunk write, or between the
        chunk write and the commit, leaves every committed row readable.
        """
        assert self.meta is not None and self._manifest is not None
        man = self._manifest
        c = self.meta.chunk_steps
        i0, i1 = start // c, (stop - 1) // c
        n_arrays, n_sample = man.shape[1], man.shape[2]
        rows = {i: np.full((n_arrays, n_sample, 2), NONE, dtype=np.uint64)
                for i in range(i0, i1 + 1)}
        for i, row in rows.items():
            row[-1, 0] = i  # the row's own position (a moved manifest file is named)
        extend = start % c != 0  # chunk i0 holds committed rows i0*c .. start-1
        old_row = np.asarray(man[i0]) if extend else None
        jobs = []  # (arr, coords, chunk block, array index, step chunk, sample chunk, old crc)
        for key, arr in self._arrays.items():
            a = self._index[arr.path]
            block = blocks[key]
            dims = tuple(arr.metadata.dimension_names or ())
            for i in range(i0, i1 + 1):
                lo, hi = max(start, i * c), min(stop, (i + 1) * c)
                if lo == i * c and hi == (i + 1) * c:
                    chunk = block[lo - start:hi - start]
                else:
                    chunk = np.full((c, *arr.shape[1:]), arr.metadata.fill_value,
                                    dtype=arr.dtype)
                    if lo > i * c:
                        chunk[:lo - i * c] = arr[i * c:lo]
                    chunk[lo - i * c:hi - i * c] = block[lo - start:hi - start]
                for coords, piece in self._pieces(arr, dims, i, chunk):
                    j = coords[dims.index(SAMPLE)] if SAMPLE in dims else 0
                    old = NONE
                    if lo > i * c:
                        old = self._old_checksum(arr, coords, old_row[a, j])
                    jobs.append((arr, coords, piece, a, i, j, old))
        pool = self._pool()
        encoded = [pool.submit(self._encode_chunk, arr, piece)
                   for arr, _, piece, *_ in jobs]
        results = []
        for (arr, coords, _, a, i, j, old), f in zip(jobs, encoded):
            got = f.result()
            if got is None:
                raise StoreError(f"{self.store!r}: array {arr.path!r} has codecs the writer "
                                 "cannot checksum itself; the store is damaged")
            parts, crc = got
            rows[i][a, j] = (old, crc)
            results.append((arr, coords, parts))
        for i, row in rows.items():  # the manifest first: it accepts the old and new files
            man[i] = row
        for f in [pool.submit(self._write_chunk_file, *r) for r in results]:
            f.result()

    @staticmethod
    def _pieces(arr: zarr.Array, dims: tuple[str, ...], i: int, chunk: np.ndarray):
        """(coords, whole chunk) of every chunk of step chunk ``i`` (``chunk``: its rows at
        the array's full width); only the sample axis may span several chunks."""
        if SAMPLE not in dims or arr.chunks[dims.index(SAMPLE)] >= arr.shape[dims.index(SAMPLE)]:
            yield (i, *(0 for _ in arr.shape[1:])), chunk
            return
        ax = dims.index(SAMPLE)
        cs = arr.chunks[ax]
        for j in range(-(-arr.shape[ax] // cs)):
            sel = [slice(None)] * chunk.ndim
            sel[ax] = slice(j * cs, (j + 1) * cs)
            piece = chunk[tuple(sel)]
            if piece.shape[ax] < cs:  # the edge chunk: padded to the chunk's shape
                pad = [(0, 0)] * chunk.ndim
                pad[ax] = (0, cs - piece.shape[ax])
                piece = np.pad(piece, pad, constant_values=arr.metadata.fill_value)
            coords = tuple(j if k == ax else (i if k == 0 else 0) for k in range(chunk.ndim))
            yield coords, np.ascontiguousarray(piece)

    def _old_checksum(self, arr: zarr.Array, coords: tuple[int, ...], entry: np.ndarray
                      ) -> int:
        """The checksum of the chunk file now at ``coords`` (which holds committed rows), after
        checking that the manifest accepts it there (NONE when there is no file: a chunk of
        sample padding only)."""
        from zarr.abc.store import SuffixByteRequest
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        sp = arr._async_array.store_path
        key = (f"{sp.path}/" if sp.path else "") + arr.metadata.encode_chunk_key(coords)
        tail = sync(sp.store.get(key, default_buffer_prototype(),
                                 byte_range=SuffixByteRequest(4)))
        if tail is None:
            return NONE
        crc = trailer(tail.to_bytes())
        if not accepts(entry, crc):
            raise StoreCorruptError(
                f"{self.store!r}: array {arr.path!r}, chunk {'/'.join(map(str, coords))} holds "
                "committed rows but a file that was not written at this position (chunk files "
                "swapped or copied in); the writer will not extend it: restore the store from a "
                "copy or record into a new store")
        return crc

    @property
    def derives_updates(self) -> bool:
        """Whether this store's layout stores updates only where weights cannot give them."""
        return self.layout is not None and self.layout.variant != "v1"

    def _resize_steps(self, rows: int) -> None:
        todo = [(arr, (rows, *arr.shape[1:])) for arr in self._arrays.values()
                if arr.shape[0] != rows]
        man = self._manifest
        if man is not None and self.meta is not None:
            n = -(-rows // self.meta.chunk_steps)
            if man.shape[0] != n:
                todo.append((man, (n, *man.shape[1:])))
        resize_many(todo)
        self.capacity = rows

    def finalize(self) -> None:
        """Trim every array to the committed rows (so plain readers see exact lengths) and
        stop the encoding threads."""
        if self.group is not None and any(a.shape[0] != self.committed
                                          for a in self._arrays.values()):
            self._check_fence()
            self._resize_steps(self.committed)
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def _block(self, key: tuple[str, str], arr: zarr.Array, n: int) -> np.ndarray:
        """A reused (n, *row shape) buffer for ``arr``'s rows: no fresh pages per flush (page
        faults and unmaps of multi-MB blocks cost as much as the copy on a VM)."""
        shape = tuple(arr.shape[1:])
        buf = self._scratch.get(key)
        if buf is None or buf.shape[0] < n or buf.shape[1:] != shape or buf.dtype != arr.dtype:
            rows = max(n, self.meta.chunk_steps if self.meta is not None else n)
            buf = self._scratch[key] = np.empty((rows, *shape), dtype=arr.dtype)
        return buf[:n]

    @staticmethod
    def _stack(arr: zarr.Array, rows: list[Any], name: str,
               out: np.ndarray | None = None) -> np.ndarray:
        """Rows stacked into one block (``out`` when given), padded with the fill value."""
        shape = arr.shape[1:]
        dims = tuple(arr.metadata.dimension_names or ())[1:]
        if out is None:
            out = np.empty((len(rows), *shape), dtype=arr.dtype)
        if all(r is not None and np.shape(r) == shape for r in rows):
            for i, row in enumerate(rows):  # common case
                out[i] = row
            return out
        out[...] = arr.metadata.fill_value
        for i, row in enumerate(rows):
            if row is None:
                continue
            row = np.asarray(row)
            if dims and dims[0] == SAMPLE:
                if row.shape[0] > shape[0] or row.shape[1:] != shape[1:]:
                    raise ValueError(f"{name}: a row of shape {row.shape} does not fit the "
                                     f"stored shape {shape}")
                out[i, : row.shape[0]] = row
            else:
                out[i] = row
        return out

    # ----------------------------------------------------------------- truncation
    @staticmethod
    def _truncation_spec() -> dict[str, Any]:
        """``create_array`` arguments of the array that takes a truncation reason when the
        disk is already full."""
        return {
            "name": TRUNCATION_ARRAY, "shape": (TRUNCATION_RESERVE,),
            "chunks": (TRUNCATION_RESERVE,), "dtype": "uint8", "fill_value": 32,
            "dimension_names": ("byte",), "compressors": None,
            "attributes": {"description": "JSON {\"truncated\": reason} padded with spaces, "
                           "written in place when recording stops early (works on a full "
                           "disk)"},
        }

    def _write_truncation_reserve(self, arr: zarr.Array) -> None:
        """Allocate the truncation marker's chunk (spaces): a plain file in a local store (its
        only codec is ``bytes``: the file is the raw bytes), else through Zarr."""
        blank = np.full(TRUNCATION_RESERVE, 32, dtype=np.uint8)
        root = self.target.path
        if root is None:
            arr[:] = blank
            return
        path = root / arr.path / arr.metadata.encode_chunk_key((0,))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_doc(path, blank.tobytes())

    def set_truncated(self, reason: str) -> None:
        """Mark the store truncated (recording stopped early) with the reason.

        The reason goes first into the reserved array, in place (local stores: no new disk
        blocks, so it works on a full disk), then into the metadata (which may fail there).
        """
        if self.group is None or self.meta is None:
            return
        self._check_fence()
        import json

        text = json.dumps({"truncated": reason[: TRUNCATION_RESERVE - 64]}).encode()
        text = text.ljust(TRUNCATION_RESERVE)
        path = self.target.path
        try:
            if path is not None:
                chunk = path / TRUNCATION_ARRAY / "c" / "0"
                fd = os.open(chunk, os.O_WRONLY)
                try:
                    os.pwrite(fd, text, 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                self.group[TRUNCATION_ARRAY][:] = np.frombuffer(text, dtype=np.uint8)
        except (OSError, KeyError):
            pass
        d = self.meta.to_dict()
        d["truncated"] = reason
        # Re-read the group document first: another handle (a writer process) may have moved
        # the commit marker since this one cached its attributes.
        fresh = self._open("r+")
        fresh.attrs[ATTR_KEY] = d
        self.group = fresh


__all__ = ["RunStoreWriter", "StepRecord", "StoredArray", "read_many", "write_many"]
