"""A new store's groups and arrays laid out in a local directory directly (no event loop).

Through Zarr, every ``create_group``/``create_array`` is a coroutine on Zarr's event loop
thread, and each document it writes is one more task of Zarr's file thread pool, after a check
that no node exists there; a writer thread that hands over a run store's ~40 documents waits
for those threads to be scheduled, which on a busy 2-core machine cost 100-600 ms per store
(``benchmarks/fixed_cost.py``). For a local store the same documents (Zarr's own metadata
objects, encoded by Zarr) are written here with plain file calls, each to a temporary file
renamed into place, as Zarr's ``LocalStore`` does (atomic).

The metadata is built as Zarr's ``init_array`` builds it; where this Zarr release's internals
differ (:class:`Unsupported`), the caller falls back to Zarr's own calls. The documents are
byte-identical to Zarr's (``tests/store/test_local_create.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import zarr
from zarr.core.buffer import default_buffer_prototype

from trajlab.store.local_docs import write_doc

_DOC = "zarr.json"


class Unsupported(Exception):
    """This Zarr release builds metadata differently: use Zarr's own calls."""


def array_metadata(spec: Mapping[str, Any]) -> Any:
    """The ``ArrayV3Metadata`` that ``group.create_array(**spec)`` would write (zarr format 3,
    no sharding, default chunk key encoding and serializer)."""
    known = {"name", "shape", "chunks", "dtype", "fill_value", "dimension_names", "filters",
             "compressors", "attributes"}
    if set(spec) - known:
        raise Unsupported(f"create_array arguments {sorted(set(spec) - known)}")
    try:
        from zarr.core.array import (
            AsyncArray,
            _parse_chunk_encoding_v3,
            _parse_chunk_key_encoding,
        )
        from zarr.core.chunk_grids import _auto_partition
        from zarr.core.common import parse_shapelike
        from zarr.core.dtype import parse_dtype
        from zarr.core.dtype.common import HasItemSize

        zdtype = parse_dtype(spec["dtype"], zarr_format=3)
        shape = parse_shapelike(spec["shape"])
        item_size = zdtype.item_size if isinstance(zdtype, HasItemSize) else 1
        _, chunks = _auto_partition(array_shape=shape, shard_shape=None,
                                    chunk_shape=spec["chunks"], item_size=item_size)
        aa, ab, bb = _parse_chunk_encoding_v3(
            compressors=spec.get("compressors", "auto"), filters=spec.get("filters", "auto"),
            serializer="auto", dtype=zdtype)
        return AsyncArray._create_metadata_v3(
            shape=shape, dtype=zdtype, fill_value=spec.get("fill_value"), chunk_shape=chunks,
            chunk_key_encoding=_parse_chunk_key_encoding(None, zarr_format=3),
            codecs=(*aa, ab, *bb), dimension_names=spec.get("dimension_names"),
            attributes=spec.get("attributes"))
    except (ImportError, AttributeError, TypeError) as e:  # another Zarr release
        raise Unsupported(f"{type(e).__name__}: {e}") from e


def group_metadata(attributes: Mapping[str, Any]) -> Any:
    """The ``GroupMetadata`` of a zarr format 3 group with ``attributes``."""
    from zarr.core.group import GroupMetadata

    return GroupMetadata(attributes=dict(attributes), zarr_format=3)


def _doc(meta: Any) -> bytes:
    return meta.to_buffer_dict(default_buffer_prototype())[_DOC].to_bytes()


def create_nodes(root: zarr.Group, groups: Sequence[tuple[str, Mapping[str, Any]]],
                 arrays: Sequence[tuple[str, Mapping[str, Any]]]) -> list[zarr.Array]:
    """Write the documents of new groups and arrays under the local group ``root`` (a fresh
    store's root group, already written), parents before children.

    Parameters
    ----------
    root : the root group of a local store.
    groups : (path relative to the root, attributes) of each new group, parents first.
    arrays : (path of the parent group, ``create_array`` keyword arguments) of each array.

    Returns
    -------
    The arrays, in order, bound to the root's store without reading anything back.

    Raises
    ------
    Unsupported
        Before anything is written, when ``root``'s store is not Zarr's ``LocalStore`` itself
        (a wrapper store sees every write through Zarr) or this Zarr release builds metadata
        differently.
    """
    from zarr.core.array import AsyncArray
    from zarr.storage import StorePath

    store = root._async_group.store_path.store
    if type(store).__name__ != "LocalStore":  # e.g. a wrapper: it sees every write through Zarr
        raise Unsupported(f"not a LocalStore: {type(store).__name__}")
    base = Path(store.root)
    prefix = root._async_group.store_path.path
    metas = [(f"{parent}/{spec['name']}" if parent else spec["name"], array_metadata(spec))
             for parent, spec in arrays]
    for path, attrs in groups:
        d = base / prefix / path
        d.mkdir(parents=True, exist_ok=True)
        write_doc(d / _DOC, _doc(group_metadata(attrs)))
    out = []
    for path, meta in metas:
        d = base / prefix / path
        d.mkdir(parents=True, exist_ok=True)
        write_doc(d / _DOC, _doc(meta))
        full = f"{prefix}/{path}" if prefix else path
        out.append(zarr.Array(AsyncArray(metadata=meta, store_path=StorePath(store, full))))
    return out


__all__ = ["Unsupported", "array_metadata", "create_nodes", "group_metadata"]
