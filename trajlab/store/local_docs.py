"""Metadata documents of arrays in a local store, written directly (no event-loop round trip).

Resizing an array rewrites its ``zarr.json``. Through Zarr, each rewrite is a coroutine run
on Zarr's event loop thread; a writer thread that hands ~35 of them over (an MLP store's arrays)
waits for that thread to be scheduled, which on a busy 2-core machine cost tens of ms per
store-wide resize. For a local store the same bytes (Zarr's own encoding of the new metadata)
are written here with plain file calls, each to a temporary file renamed over the document,
as Zarr's ``LocalStore`` does (atomic).
"""

from __future__ import annotations

import os
from pathlib import Path

import zarr
from zarr.core.buffer import default_buffer_prototype

from trajlab.store.target import local_path


def array_root(arr: zarr.Array) -> Path | None:
    """The local directory of ``arr``'s store (None: not a local store)."""
    return local_path(arr._async_array.store_path.store)


def write_doc(path: Path, data: bytes) -> None:
    """Replace the file at ``path`` with ``data`` atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(data):x}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def resize_local(arr: zarr.Array, root: Path, shape: tuple[int, ...]) -> None:
    """``arr.resize(shape)`` in a local store rooted at ``root``: as Zarr does it (chunks
    outside a smaller shape removed first, then the metadata document), in place."""
    a = arr._async_array
    old = a.metadata
    new = old.update_shape(tuple(int(s) for s in shape))
    base = root / a.store_path.path if a.store_path.path else root
    if any(n < o for n, o in zip(new.shape, old.shape)):
        keep = set(new.chunk_grid.all_chunk_coords(new.shape))
        for coords in old.chunk_grid.all_chunk_coords(old.shape):
            if coords not in keep:
                (base / old.encode_chunk_key(coords)).unlink(missing_ok=True)
    doc = new.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
    write_doc(base / "zarr.json", doc)
    object.__setattr__(a, "metadata", new)


__all__ = ["array_root", "resize_local", "write_doc"]
