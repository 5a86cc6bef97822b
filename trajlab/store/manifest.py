"""Position-bound chunk checksums (run-store format 3, analysis-store format 3): the chunk
manifest.

Zarr's ``crc32c`` codec proves that a chunk file's bytes are the bytes written, not that they
were written *there*: two chunk files of one array swapped (or a chunk copied from another run
or another array of the same shape) pass it and read as wrong values. Format 3 therefore keeps,
for every chunk of every array, the CRC32C checksums its file may carry at that position, in
one root array ``trajlab_chunks`` (uint64, fill :data:`NONE`) with dims
``(step_chunk, array, sample_chunk, accepted)``:

* ``step_chunk``: the chunk's index along ``step``; one manifest chunk (one small file) per
  step chunk, holding every array's entries, so an append adds one file write per step chunk
  it touches;
* ``array``: the array's index in :meth:`trajlab.store.layout.RunLayout.array_paths`; one
  more entry, last, holds the step chunk's own index twice, so that a manifest chunk file
  moved to another position is named as such;
* ``sample_chunk``: the chunk's index along ``sample`` (0 for arrays without it: their other
  axes are one chunk each);
* ``accepted``: two checksums. A file at that position is intact only if its CRC32C trailer
  (the last 4 bytes the ``crc32c`` codec appends) is one of them.

Why two: the writer writes the manifest row *before* the chunks and commits (moves the commit
marker) after them. A chunk that already holds committed rows and is extended by an append
(a flush of less than a chunk) is rewritten; killed before that rewrite, its file still holds
the old bytes; killed after, the new ones. Both hold the same committed rows, so the row lists
both (old, new); the next append that touches the chunk replaces the pair.

The checksum is the chunk's own CRC, not a hash salted with the position: two chunks with equal
bytes are interchangeable (swapping them changes no value), and plain Zarr readers, which check
the same trailer, still open the store without trajlab.

Analysis stores (:mod:`trajlab.store.analysis_store`) keep the same array, with the stored
variables (:meth:`trajlab.store.layout.AnalysisLayout.array_paths`) on the ``array`` axis and
one ``sample_chunk`` (their arrays are one chunk across every axis but ``step``). Their commit
is the step chunk's done-marker (or the state "complete", for the series-wide integrals), so
the writer records each chunk's checksum *after* the chunk file is written, read back from the
file's trailer (:func:`file_trailer`), and *before* that commit: a chunk is checked only once
committed, and a kill in between leaves it uncommitted (recomputed on resume). There, the
second accepted value is :data:`NONE`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zarr

from trajlab.errors import StoreCorruptError
from trajlab.store.names import CHUNKS_ARRAY, SAMPLE

#: Entry value meaning "no checksum" (CRC32C values are below 2**32).
NONE = 1 << 32
#: Sample chunks per manifest chunk (the sample axis rarely grows past a few chunks).
SAMPLE_CHUNKS = 16
DIMS = ("step_chunk", "array", "sample_chunk", "accepted")


def trailer(data: bytes | memoryview) -> int:
    """The CRC32C a chunk file carries: its last 4 bytes, little-endian."""
    return int.from_bytes(bytes(data[-4:]), "little")


def accepts(entry: np.ndarray, crc: int) -> bool:
    """Whether a file with checksum ``crc`` may sit at the position of ``entry`` (2 values)."""
    return int(crc) in (int(entry[0]), int(entry[1]))


def sample_chunk(dims: Sequence[str], coords: Sequence[int]) -> int:
    """A chunk's index in the manifest's ``sample_chunk`` axis (0 without a sample axis)."""
    dims = tuple(dims)
    return int(coords[dims.index(SAMPLE)]) if SAMPLE in dims else 0


def sample_chunks(arr: zarr.Array) -> int:
    """Chunks of ``arr`` along ``sample`` (1 without a sample axis)."""
    dims = tuple(arr.metadata.dimension_names or ())
    if SAMPLE not in dims:
        return 1
    ax = dims.index(SAMPLE)
    return max(1, -(-int(arr.shape[ax]) // int(arr.chunks[ax])))


def manifest_spec(n_arrays: int, step_chunks: int = 0) -> dict:
    """Keyword arguments of ``create_array`` (name included) of an empty manifest for
    ``n_arrays`` arrays in a new store, allocated for ``step_chunks`` step chunks."""
    return {
        "name": CHUNKS_ARRAY, "shape": (step_chunks, n_arrays + 1, 1, 2),
        "chunks": (1, n_arrays + 1, SAMPLE_CHUNKS, 2),
        "dtype": "uint64", "fill_value": NONE, "dimension_names": DIMS, "compressors": [
            zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
            zarr.codecs.Crc32cCodec()],
        "attributes": {"description": "CRC32C checksums each chunk file may carry at its "
                       "position (step chunk, array, sample chunk; two accepted values, "
                       f"{NONE} = none); see trajlab docs/format.md"}}


def empty_row(step_chunk: int, n_arrays: int, n_sample: int = 1) -> np.ndarray:
    """A manifest row (``n_arrays + 1``, ``n_sample``, 2) with no checksum, holding its own
    position ``step_chunk`` in its last entry."""
    row = np.full((n_arrays + 1, n_sample, 2), NONE, dtype=np.uint64)
    row[-1, 0] = step_chunk
    return row


async def file_trailer(arr: zarr.Array, coords: Sequence[int]) -> int | None:
    """The CRC32C trailer of the chunk file of ``arr`` at ``coords`` (one 4-byte read; None
    when there is no file or it is too short to hold one)."""
    from zarr.abc.store import SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype

    sp = arr._async_array.store_path
    key = (f"{sp.path}/" if sp.path else "") + arr.metadata.encode_chunk_key(tuple(coords))
    tail = await sp.store.get(key, default_buffer_prototype(), byte_range=SuffixByteRequest(4))
    if tail is None:
        return None
    raw = tail.to_bytes()
    return trailer(raw) if len(raw) == 4 else None


def create_manifest(group: zarr.Group, n_arrays: int) -> zarr.Array:
    """Lay out an empty manifest for ``n_arrays`` arrays in a new store."""
    return group.create_array(**manifest_spec(n_arrays))


class ManifestReader:
    """Cached manifest rows of one store, for checks on read.

    Parameters
    ----------
    arr : the ``trajlab_chunks`` array.  paths : :meth:`RunLayout.array_paths`.
    committed_chunks : step chunks holding committed rows.  full_chunks : those whose rows are
        all committed (their entries never change; the last, partly committed one's may, while
        a writer extends it, so it is read afresh each time).  where : the store, for messages.
    """

    def __init__(self, arr: zarr.Array, paths: Sequence[str], committed_chunks: int,
                 full_chunks: int, where: str) -> None:
        self.arr = arr
        self.full_chunks = full_chunks
        self.index = {p: i for i, p in enumerate(paths)}
        self.where = where
        self._rows: dict[int, np.ndarray] = {}
        self.committed_chunks = committed_chunks
        if arr.shape[1] != len(paths) + 1:
            raise StoreCorruptError(
                f"{where}: the chunk manifest {CHUNKS_ARRAY!r} has entries for "
                f"{arr.shape[1] - 1} arrays, but the store has {len(paths)}; its zarr.json was "
                "edited or is damaged: restore the store from a copy")

    async def row(self, step_chunk: int) -> np.ndarray:
        """The entries (array, sample_chunk, 2) of one step chunk."""
        got = self._rows.get(step_chunk)
        if got is None and step_chunk >= self.arr.shape[0]:
            raise StoreCorruptError(
                f"{self.where}: the commit marker says {self.committed_chunks} step chunks "
                f"hold committed rows, but the chunk manifest {CHUNKS_ARRAY!r} covers only "
                f"{self.arr.shape[0]}; the store's metadata is damaged (restore it from a copy)")
        if got is None:
            try:
                got = np.asarray(await self.arr._async_array.getitem(
                    (slice(step_chunk, step_chunk + 1),)))[0]
            except Exception as e:  # any decoding failure is damage
                raise StoreCorruptError(
                    f"{self.where}: the chunk manifest {CHUNKS_ARRAY!r}, chunk "
                    f"{step_chunk}/0/0/0 cannot be read ({type(e).__name__}: {e}); the store "
                    "is damaged: restore it from a copy") from e
            if tuple(int(v) for v in got[-1, 0]) != (step_chunk, step_chunk):
                raise StoreCorruptError(
                    f"{self.where}: the chunk manifest {CHUNKS_ARRAY!r}, chunk "
                    f"{step_chunk}/0/0/0 holds the entries of step chunk {int(got[-1, 0, 0])}, "
                    "not its own: its chunk files were swapped or moved; restore the store "
                    "from a copy")
            if step_chunk < self.full_chunks:
                self._rows[step_chunk] = got
        return got

    async def entry(self, path: str, coords: Sequence[int], dims: Sequence[str]) -> np.ndarray:
        """The two accepted checksums of the chunk at ``coords`` of array ``path``."""
        row = await self.row(int(coords[0]))
        j = sample_chunk(dims, coords)
        if j >= row.shape[1]:
            return np.array([NONE, NONE], dtype=np.uint64)
        return row[self.index[path], j]


__all__ = ["CHUNKS_ARRAY", "DIMS", "NONE", "SAMPLE_CHUNKS", "ManifestReader", "accepts",
           "create_manifest", "empty_row", "file_trailer", "manifest_spec", "sample_chunk",
           "sample_chunks", "trailer"]
