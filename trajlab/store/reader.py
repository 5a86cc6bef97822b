"""Opening run stores lazily as xarray (:func:`open_run`, :class:`Run`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import xarray as xr
import zarr
import zarr.errors

from trajlab.errors import StoreCorruptError, StoreError
from trajlab.store.layout import RunLayout
from trajlab.store.metadata import LayerMeta, RunMeta
from trajlab.store.names import (
    ATTR_KEY,
    COMMIT_KEY,
    SAMPLE,
    SAMPLES_KEY,
    STEP,
    TRUNCATION_ARRAY,
)
from trajlab.store.rows import RowReader, StoredArray
from trajlab.store.target import StoreLike, show


def read_commit(attrs: dict[str, Any], where: str) -> int:
    """The commit marker, validated: a non-negative integer."""
    value = attrs.get(COMMIT_KEY, 0)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise StoreCorruptError(
            f"{where}: the commit marker {COMMIT_KEY!r} is {value!r}, not a row count; the "
            "store's root metadata is damaged (restore zarr.json from a copy)"
        )
    return int(value)


def read_samples(attrs: dict[str, Any], where: str) -> int | None:
    """The committed sample capacity, validated: None (stores without it) or an integer >= 0."""
    value = attrs.get(SAMPLES_KEY)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise StoreCorruptError(
            f"{where}: the committed sample capacity {SAMPLES_KEY!r} is {value!r}, not a "
            "sample count; the store's root metadata (zarr.json) is damaged: restore it from a "
            "copy")
    return int(value)


def read_truncation(group: zarr.Group) -> str | None:
    """The truncation reason written in place into the reserved array, if any."""
    import json

    try:
        raw = bytes(np.asarray(group[TRUNCATION_ARRAY][:], dtype=np.uint8)).strip()
    except Exception:  # noqa: BLE001 - absent (format 1) or unreadable: no reason there
        return None
    if not raw:
        return None
    try:
        return json.loads(raw.decode()).get("truncated")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None


class Run:
    """A recorded run, opened lazily: metadata is read now, arrays on demand (Dask-backed).

    Only committed steps are visible. Obtain one with :func:`open_run`.

    Attributes
    ----------
    meta : RunMeta
        Run-level metadata (layers, sampler, dtype, ...).
    n_steps : int
        Number of committed recorded steps.
    layout : RunLayout
        Which variables the store holds and which are derived on read.
    """

    def __init__(self, store: StoreLike, *, storage_options: dict | None = None) -> None:
        self.store = store
        self.storage_options = storage_options
        self.where = show(store).strip("\x27")
        kw: dict[str, Any] = {"mode": "r"}
        if storage_options is not None:
            kw["storage_options"] = storage_options
        try:
            self._group = zarr.open_group(store, **kw)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise FileNotFoundError(
                f"no run store at {show(store)}; record one with trajlab.Recorder or `trajlab demo`"
            ) from e
        except (ValueError, TypeError) as e:
            raise StoreError(f"{show(store)} is not a Zarr v3 group: {e}") from e
        attrs = self._group.attrs.asdict()
        if ATTR_KEY not in attrs:
            raise StoreError(
                f"{show(store)} is a Zarr group but not a trajlab run store (its root attributes "
                f"have no {ATTR_KEY!r} entry); point at a store written by trajlab.Recorder"
            )
        meta = RunMeta.from_dict(attrs[ATTR_KEY], where=self.where)
        reserved = read_truncation(self._group)
        if reserved and not meta.truncated:
            import dataclasses

            meta = dataclasses.replace(meta, truncated=reserved)
        self.meta: RunMeta = meta
        self.n_steps = read_commit(attrs, self.where)
        self._laid_out = "step" in self._group and "batch_size" in self._group
        if self.n_steps and not self._laid_out:
            raise StoreCorruptError(f"{self.where}: {self.n_steps} rows are committed but the "
                                    "root arrays are missing; the store is damaged")
        self.layout = RunLayout.of_group(self._group, meta)
        samples = read_samples(attrs, self.where)
        if samples is not None and self._laid_out and "indices" in self._group:
            width = self._group["indices"].shape[1]  # every per-sample array is at least this wide
            if samples > width:
                raise StoreCorruptError(
                    f"{self.where}: the committed sample capacity {SAMPLES_KEY!r} is {samples}, "
                    f"but the per-sample arrays hold {width} samples; the store's root metadata "
                    "(zarr.json) was edited or is damaged: restore it from a copy")
        self._reader = RowReader(self._group, self.layout, self.n_steps, samples, self.where)
        if self._reader.samples is None and self._laid_out:
            self._reader.samples = self._min_samples()

    def _min_samples(self) -> int:
        """Committed sample capacity of stores without the attribute: the smallest array's."""
        sizes = []
        for path in self._array_paths():
            arr = self._group[path]
            dims = tuple(arr.metadata.dimension_names or ())
            if SAMPLE in dims:
                sizes.append(arr.shape[dims.index(SAMPLE)])
        return min(sizes) if sizes else 0

    def _array_paths(self) -> list[str]:
        paths = [n for n in self.layout.root_vars if n in self._group]
        for lm in self.meta.layers:
            base = self.layout.group_path(lm)
            for n in self.layout.layer_vars(lm):
                if self._reader_has(f"{base}/{n}"):
                    paths.append(f"{base}/{n}")
        return paths

    def _reader_has(self, path: str) -> bool:
        try:
            self._group[path]
        except KeyError:
            return False
        return True

    # ------------------------------------------------------------------ metadata
    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the recorded layers."""
        return self.meta.layer_names

    def layer_meta(self, name: str) -> LayerMeta:
        """Metadata of one layer; KeyError naming the recorded layers if unknown."""
        return self.meta.layer(name)

    @property
    def sample_capacity(self) -> int:
        """Length of the (padded) sample axis of the committed rows."""
        return int(self._reader.samples or 0)

    @property
    def rows(self) -> RowReader:
        """The decoded row reader (numpy) used by the analysis."""
        return self._reader

    def layer_rows(self, name: str, variables: Sequence[str], rows: tuple[int, int] | None = None
                   ) -> dict[str, np.ndarray]:
        """Layer variables as numpy arrays for rows ``rows`` (default all committed), derived
        variables decoded (see :meth:`RowReader.layer_rows`)."""
        rows = (0, self.n_steps) if rows is None else rows
        return self._reader.layer_rows(self.layer_meta(name), variables, rows)

    def root_rows(self, variables: Sequence[str], rows: tuple[int, int] | None = None
                  ) -> dict[str, np.ndarray]:
        """Step-level variables as numpy arrays for rows ``rows`` (default all committed)."""
        rows = (0, self.n_steps) if rows is None else rows
        if rows[1] <= rows[0]:
            return {v: np.zeros(0) for v in variables}
        return self._reader.root_rows(variables, rows)

    def uncommitted_rows(self) -> int:
        """Rows written past the commit marker (a live recording, or an interrupted write)."""
        if not self._laid_out:
            return 0
        return max(0, int(self._group["step"].shape[0]) - self.n_steps)

    # ------------------------------------------------------------------ xarray
    def _dataset(self, lm: LayerMeta | None) -> xr.Dataset:
        """A group's variables as a lazy Dataset cut to the committed rows; derived variables
        are decoded block by block through the row reader."""
        import dask.array as da

        info = self._reader.variable_info(lm)
        base = "" if lm is None else self.layout.group_path(lm) + "/"
        derived = set(self.layout.derived_vars(lm)) if lm is not None else set()
        data = {}
        for name, (dims, dtype, desc) in info.items():
            path = base + name
            stored = name not in derived and (self._laid_out and self._reader_has(path))
            if self.n_steps == 0:
                shape = tuple(0 if d == STEP else self._size(lm, d) for d in dims)
                lazy = da.zeros(shape, dtype=dtype)
            elif stored:
                arr = self._reader.array(path)
                chunks = tuple(min(c, max(s, 1)) for c, s in zip(arr.chunks, arr.shape))
                lazy = da.from_array(arr, chunks=chunks, asarray=True, fancy=False,
                                     name=f"trajlab-{self.layout.meta.identity}-{path}"
                                     f"-{self.n_steps}")
            else:
                lazy = self._derived(lm, name, dims, dtype)
            data[name] = xr.Variable(dims, lazy, attrs={"description": desc})
        return xr.Dataset(data)

    def _size(self, lm: LayerMeta | None, dim: str) -> int:
        if dim == SAMPLE:
            return self.sample_capacity
        if lm is None:
            return self.layout.sizes(self.sample_capacity).get(dim, 0)
        return {"out": lm.shape[0], "in": lm.shape[1], "rank": lm.rank}.get(dim, 0)

    def _derived(self, lm: LayerMeta, name: str, dims: tuple[str, ...], dtype) -> Any:
        """A lazy array whose step blocks come from :meth:`RowReader.layer_rows`."""
        import dask.array as da
        from dask.highlevelgraph import HighLevelGraph

        c = self.meta.chunk_steps
        bounds = [(a, min(a + c, self.n_steps)) for a in range(0, self.n_steps, c)]
        shape_rest = tuple(self._size(lm, d) for d in dims[1:])
        key = f"trajlab-derived-{self.layout.meta.identity}-{lm.group}-{name}-{self.n_steps}"
        reader = self._reader
        dsk = {(key, i, *([0] * len(shape_rest))): (_decode_block, reader, lm, name, rows)
               for i, rows in enumerate(bounds)}
        chunks = (tuple(b - a for a, b in bounds), *((s,) for s in shape_rest))
        graph = HighLevelGraph.from_collections(key, dsk, dependencies=())
        return da.Array(graph, key, chunks, dtype=dtype)

    @cached_property
    def root(self) -> xr.Dataset:
        """Step-level variables (lr, batch_size, loss, indices, probe), ``step`` coordinate."""
        ds = self._dataset(None)
        return ds.assign_coords({STEP: np.asarray(ds[STEP].values)})

    @property
    def steps(self) -> np.ndarray:
        """Step indices of the committed rows."""
        return self.root[STEP].values

    def layer(self, name: str) -> xr.Dataset:
        """One layer's variables as a lazy Dataset with dims (step, sample, out, in, rank)."""
        lm = self.layer_meta(name)
        ds = self._dataset(lm).assign_coords({STEP: self.steps})
        ds.attrs.update({"layer": name, "sketch": lm.sketch, "module": lm.module})
        return ds

    def __getitem__(self, name: str) -> xr.Dataset:
        return self.layer(name)

    # ------------------------------------------------------------------ sizes and checks
    def _arrays_of(self, prefix: str) -> list[zarr.Array]:
        try:
            g = self._group[prefix] if prefix else self._group
        except KeyError:
            return []
        return [a for _, a in g.arrays()]

    def layer_nbytes_stored(self, name: str) -> int:
        """Bytes one layer's group occupies (compressed)."""
        return sum(int(a.nbytes_stored()) for a in
                   self._arrays_of(self.layout.group_path(self.layer_meta(name))))

    def nbytes_stored(self) -> int:
        """Bytes the store occupies (compressed), summed over its arrays."""
        total = sum(int(a.nbytes_stored()) for a in self._arrays_of(""))
        return total + sum(self.layer_nbytes_stored(n) for n in self.layers)

    def verify(self, progress: Callable[[], None] | None = None) -> list[str]:
        """Read every committed chunk of every array; one line per problem (empty: intact).

        Finds chunks that fail their checksum or cannot be decoded, and (format 2) chunks
        missing inside the committed rows.
        """
        import asyncio

        from zarr.core.sync import sync

        if self.n_steps == 0:
            return []
        arrays: list[StoredArray] = []
        problems = []
        for path in self._expected_paths():
            try:
                arrays.append(self._reader.array(path))
            except StoreCorruptError as e:
                problems.append(str(e))

        async def _all():
            return await asyncio.gather(*(a.verify(progress) for a in arrays))

        for found in sync(_all()):
            problems.extend(found)
        try:
            self._reader.batch_sizes()  # consistent with the committed sample capacity
        except StoreCorruptError as e:
            problems.append(str(e).split("; the store's root")[0])
        return problems

    def _expected_paths(self) -> list[str]:
        paths = list(self.layout.root_vars)
        for lm in self.meta.layers:
            base = self.layout.group_path(lm)
            paths += [f"{base}/{n}" for n in self.layout.layer_vars(lm)]
        return paths

    def n_chunks(self) -> int:
        """Number of committed chunks :meth:`verify` reads (for progress bars)."""
        if self.n_steps == 0:
            return 0
        total = 0
        for path in self._expected_paths():
            try:
                a = self._reader.array(path)
            except StoreCorruptError:
                continue
            n = 1
            for s, c in zip(a.shape, a.chunks):
                n *= -(-s // c) if s else 0
            total += n
        return total

    def __repr__(self) -> str:
        return (
            f"<trajlab.Run {show(self.store)}: {self.n_steps} steps, layers "
            f"{', '.join(self.layers)}{' (truncated)' if self.meta.truncated else ''}>"
        )


def _decode_block(reader: RowReader, lm: LayerMeta, name: str, rows: tuple[int, int]):
    return reader.layer_rows(lm, [name], rows)[name]


def open_run(store: StoreLike | Run, *, storage_options: dict | None = None) -> Run:
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
    trajlab.StoreCorruptError
        The store's metadata is damaged (reads of damaged chunks raise it too, naming them).

    Examples
    --------
    >>> run = trajlab.open_run("run.zarr")  # doctest: +SKIP
    >>> run.layer("fc1").weight  # (step, out, in)  # doctest: +SKIP
    """
    if isinstance(store, Run):
        return store
    return Run(store, storage_options=storage_options)
