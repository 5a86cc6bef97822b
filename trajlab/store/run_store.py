"""Reading and writing run stores (Zarr v3).

The writer appends rows (one row = one recorded step) to arrays chunked along ``step`` and then
advances the commit marker, the root attribute ``trajlab_committed``. Readers only ever look at
the first ``trajlab_committed`` rows, so a writer killed between the two leaves a store that opens
at its last committed step, and a resumed writer overwrites the uncommitted tail. Every Zarr write
(chunk or metadata document) replaces a whole object atomically on local disks and object stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zarr
import zarr.codecs
import zarr.errors

from trajlab.store import schema
from trajlab.store.io import write_many
from trajlab.store.schema import RunMeta

StoreLike = Any  # str path, fsspec URL, or zarr Store

# Float data (weights, gradients, per-sample factors) is nearly incompressible: zstd-3 keeps
# ~89% of random-like float32 at ~350 MB/s, LZ4 ~93% at ~900 MB/s (NaN placeholders and ReLU
# zeros shrink under both). The writer must keep up with training, so floats get LZ4 with byte
# shuffle; integers and flags (indices, step, masks) get zstd.
_FAST = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
_DENSE = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def compressor_for(name: str, dtype: np.dtype) -> zarr.codecs.BloscCodec:
    """The codec of one stored variable."""
    return _FAST if dtype.kind == "f" else _DENSE


class StoreError(Exception):
    """A run or analysis store cannot be used as asked."""


class StoreExistsError(StoreError, FileExistsError):
    """The target store already exists and overwriting was not requested."""


@dataclass
class StepRecord:
    """Everything recorded at one step, as host arrays.

    ``root`` maps root variable names to scalars or 1-d arrays (``indices``); ``layers`` maps
    layer names to {variable: array without the step axis}. Per-sample arrays hold exactly
    ``batch_size`` rows; the writer pads them to the store's sample capacity.
    """

    root: dict[str, Any]
    layers: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _fill_value(dtype: np.dtype) -> Any:
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "b":
        return False
    return -1


def store_exists(store: StoreLike, *, storage_options: dict | None = None) -> bool:
    """Whether a Zarr group (of any kind) exists at ``store``."""
    try:
        zarr.open_group(store, mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return False
    except ValueError as e:  # non-group node or empty directory
        if "not found" in str(e).lower() or "no group" in str(e).lower():
            return False
        raise
    return True


def _open_group(store: StoreLike, mode: str, storage_options: dict | None) -> zarr.Group:
    kw: dict[str, Any] = {"mode": mode}
    if storage_options is not None:
        kw["storage_options"] = storage_options
    return zarr.open_group(store, zarr_format=3, **kw)


def read_meta(group: zarr.Group, *, where: str = "") -> tuple[RunMeta, int]:
    """Validate a group as a trajlab run store and return (metadata, committed rows)."""
    attrs = group.attrs.asdict()
    if schema.ATTR_KEY not in attrs:
        raise StoreError(
            f"{where or 'this store'} is a Zarr group but not a trajlab run store (its root "
            f"attributes have no {schema.ATTR_KEY!r} entry); point at a store written by "
            "trajlab.Recorder"
        )
    raw = attrs[schema.ATTR_KEY]
    if raw.get("kind", "run") != "run":
        raise StoreError(f"{where} is a trajlab {raw.get('kind')} store, not a run store")
    version = int(raw.get("format_version", -1))
    if version > schema.FORMAT_VERSION:
        raise StoreError(
            f"{where} has run-store format version {version}, newer than this trajlab reads "
            f"(up to {schema.FORMAT_VERSION}); upgrade trajlab (pip install -U trajlab)"
        )
    if version < 1:
        raise StoreError(f"{where} has an invalid format version {version!r}")
    return RunMeta.from_dict(raw), int(attrs.get(schema.COMMIT_KEY, 0))


class RunStoreWriter:
    """Append-only writer of a run store; not thread-safe (one writer thread owns it).

    Parameters
    ----------
    store : path, fsspec URL or Zarr store.
    mode : ``"w-"`` create, fail if anything exists; ``"w"`` overwrite; ``"a"`` append to an
        existing trajlab run store (created if absent).
    storage_options : passed to fsspec for URLs.
    """

    def __init__(
        self,
        store: StoreLike,
        *,
        mode: Literal["w-", "w", "a"] = "w-",
        storage_options: dict | None = None,
    ) -> None:
        if mode not in ("w-", "w", "a"):
            raise ValueError(f"mode must be 'w-', 'w' or 'a', got {mode!r}")
        self.store = store
        self.mode = mode
        self.storage_options = storage_options
        self.group: zarr.Group | None = None
        self.meta: RunMeta | None = None
        self.committed = 0
        self.capacity = 0  # rows allocated along step (whole chunks); 0 = resize on next append
        self.sample_capacity = 0
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        exists = store_exists(store, storage_options=storage_options)
        if exists and mode == "w-":
            raise StoreExistsError(
                f"a store already exists at {store!r}; pass mode='a' to append to it (resume) "
                "or mode='w' to overwrite it, or choose another path"
            )
        if exists and mode == "a":
            group = _open_group(store, "r+", storage_options)
            meta, committed = read_meta(group, where=str(store))
            if committed > 0:
                self.meta, self.committed, self.group = meta, committed, group
                self._bind_arrays()
            else:
                # Created, but killed before its first commit: lay it out anew.
                self.mode = "w"

    # ----------------------------------------------------------------- layout
    @property
    def is_created(self) -> bool:
        return self.group is not None

    @property
    def last_step(self) -> int | None:
        """Step index of the last committed row, None for an empty store."""
        if self.group is None or self.committed == 0:
            return None
        return int(self.group["step"][self.committed - 1])

    def create(self, meta: RunMeta, *, sample_capacity: int) -> None:
        """Create the layout for ``meta`` (mode "w-"/"w", or "a" on an absent store)."""
        mode = "w" if self.mode == "w" else "w-"
        kw: dict[str, Any] = {"mode": mode, "zarr_format": 3,
                              "attributes": {schema.ATTR_KEY: meta.to_dict(), schema.COMMIT_KEY: 0}}
        if self.storage_options is not None:
            kw["storage_options"] = self.storage_options
        # The group document (with the metadata and a zero commit marker) is written first and
        # atomically: a store killed during creation opens as an empty run and is re-laid out
        # by a resumed recorder.
        group = zarr.open_group(self.store, **kw)
        dtype = np.dtype(meta.dtype)
        c = meta.chunk_steps
        for name, (dims, dt) in schema.ROOT_VARS.items():
            self._create(group, name, dims, dt, dtype, c, {schema.SAMPLE: sample_capacity})
        layers = group.create_group(schema.LAYERS_GROUP)
        for lm in meta.layers:
            lg = layers.create_group(lm.group, attributes={"trajlab_layer": lm.to_dict()})
            sizes = {
                schema.SAMPLE: sample_capacity,
                schema.OUT: lm.shape[0],
                schema.IN: lm.shape[1],
                schema.RANK: lm.rank,
            }
            for name, (dims, dt) in schema.layer_vars(lm.sketch, lm.stored_grad,
                                                      meta.probe).items():
                self._create(lg, name, dims, dt, dtype, c, sizes)
        self.group, self.meta, self.committed = group, meta, 0
        self._bind_arrays()

    @staticmethod
    def _create(group, name, dims, dt, float_dtype, chunk_steps, sizes) -> None:
        dtype = np.dtype(dt) if dt is not None else float_dtype
        shape = (0, *(sizes[d] for d in dims))
        group.create_array(
            name,
            shape=shape,
            chunks=(chunk_steps, *shape[1:]),
            dtype=dtype,
            fill_value=_fill_value(dtype),
            dimension_names=(schema.STEP, *dims),
            compressors=[compressor_for(name, dtype)],
            attributes={"description": schema.DESCRIPTIONS.get(name, "")},
        )

    def _bind_arrays(self) -> None:
        assert self.group is not None and self.meta is not None
        self._arrays = {("", name): self.group[name] for name in schema.ROOT_VARS}
        for lm in self.meta.layers:
            lg = self.group[f"{schema.LAYERS_GROUP}/{lm.group}"]
            for name in schema.layer_vars(lm.sketch, lm.stored_grad, self.meta.probe):
                if name in lg:  # older stores lack the newer optional variables
                    self._arrays[(lm.name, name)] = lg[name]
        self.sample_capacity = self._arrays[("", "indices")].shape[1]

    def _grow_samples(self, n: int) -> None:
        for arr in self._arrays.values():
            dims = arr.metadata.dimension_names
            if dims and schema.SAMPLE in dims:
                axis = dims.index(schema.SAMPLE)
                shape = list(arr.shape)
                shape[axis] = n
                # Chunks span the whole sample axis; keep that true after growing.
                arr.resize(tuple(shape))
        self.sample_capacity = n

    # ----------------------------------------------------------------- writing
    def append(self, records: list[StepRecord]) -> int:
        """Write ``records`` after the committed rows, then commit them. Returns committed rows.

        Arrays grow geometrically by whole chunks (readers cut at the commit marker;
        :meth:`finalize` trims),
        and all arrays are written concurrently.
        """
        if not records:
            return self.committed
        assert self.group is not None and self.meta is not None, "create() first"
        n_max = max(int(r.root["batch_size"]) for r in records)
        if n_max > self.sample_capacity:
            self._grow_samples(n_max)
        start, stop = self.committed, self.committed + len(records)
        if stop > self.capacity:
            # Grow geometrically (whole chunks): O(log T) metadata rewrites for a run of T rows.
            c = self.meta.chunk_steps
            self._resize_steps(math.ceil(max(stop, 2 * self.capacity) / c) * c)
        writes = []
        for (layer, name), arr in self._arrays.items():
            if layer == "":
                rows = [r.root.get(name) for r in records]
            elif name == "step":
                rows = [r.root["step"] for r in records]
            else:
                rows = [r.layers[layer].get(name) for r in records]
            writes.append((arr, slice(start, stop), self._stack(arr, rows)))
        write_many(writes)
        self.committed = stop
        self.group.attrs[schema.COMMIT_KEY] = stop
        return stop

    @property
    def derives_updates(self) -> bool:
        """Whether this store's layout stores updates only where weights cannot give them."""
        return any(name == "update_stored" for _, name in self._arrays)

    def _resize_steps(self, rows: int) -> None:
        for arr in self._arrays.values():
            if arr.shape[0] != rows:
                arr.resize((rows, *arr.shape[1:]))
        self.capacity = rows

    def finalize(self) -> None:
        """Trim every array to the committed rows (so plain readers see exact lengths)."""
        if self.group is not None and self.capacity != self.committed:
            self._resize_steps(self.committed)

    def _stack(self, arr: zarr.Array, rows: list[Any]) -> np.ndarray:
        shape = arr.shape[1:]
        dims = arr.metadata.dimension_names[1:]
        if all(r is not None and np.shape(r) == shape for r in rows):
            return np.stack([np.asarray(r, dtype=arr.dtype) for r in rows])  # common case
        out = np.full((len(rows), *shape), arr.metadata.fill_value, dtype=arr.dtype)
        for i, row in enumerate(rows):
            if row is None:
                continue
            row = np.asarray(row)
            if dims and dims[0] == schema.SAMPLE:
                out[i, : row.shape[0]] = row
            else:
                out[i] = row
        return out

    def set_truncated(self, reason: str) -> None:
        """Mark the store truncated (recording stopped early) with the reason."""
        if self.group is None or self.meta is None:
            return
        d = self.meta.to_dict()
        d["truncated"] = reason
        self.group.attrs[schema.ATTR_KEY] = d
