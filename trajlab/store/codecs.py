"""Codecs of stored arrays: compression chosen per variable, and a CRC32C checksum on every chunk.

Only codecs of the Zarr v3 core specification are used (``transpose``, ``blosc``, ``crc32c``),
so any Zarr v3 reader opens a run store without trajlab. The checksum is the last codec of
every array (4 bytes per chunk): a flipped or truncated chunk is an error instead of wrong
numbers.

The choice per variable was measured on recorded runs (an MLP 784-512-512-10 and the digits
ConvNet; ratio = stored / raw, speed = raw MB per CPU second of the encoder, see
docs/format.md, *Chunking and compression*):

* Weights change slowly from step to step. Transposed so that ``step`` is the fastest axis and
  bit-shuffled, each weight's sign, exponent and leading mantissa bits become long constant
  runs: LZ4 keeps 0.61-0.72 of the bytes (8-64 rows per chunk) where plain byte-shuffled LZ4
  keeps 0.92, at the same speed. (A numcodecs ``delta`` over the float bits is not bit-exact
  through zarr, and custom codecs would lock plain readers out.)
* Per-sample factors behind ReLUs are half zeros: byte-shuffled LZ4 keeps 0.76-0.88; zstd-1
  keeps 0.58-0.62 but is 2-3x slower.
* Dense random-like floats (projections, batch gradients): bit-shuffled LZ4, 0.85-0.90.
* Integers and flags: zstd-3 (they are tiny).

``profile="fast"`` (the default) takes the LZ4 variants: on a disk that sustains ~200 MB/s the
encoder's time plus the bytes' write time is lowest there. ``profile="small"`` takes zstd-1
everywhere (about 10-30% fewer bytes for float data, at 2-3x the encoder's CPU time), for slow
or billed storage. ``profile="plain"`` is the layout of trajlab 0.1 (byte-shuffled LZ4 for every
float array), kept for comparisons.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import zarr.codecs

Profile = Literal["fast", "small", "plain"]
PROFILES: tuple[str, ...] = ("fast", "small", "plain")

_FAST = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
_DENSE = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
_CHECKSUM = zarr.codecs.Crc32cCodec()

#: Variables that change slowly from one recorded step to the next (stored step-last).
TEMPORAL = frozenset({"weight", "basis_u", "basis_v"})
#: Per-sample factors that are often sparse (ReLU zeros): byte shuffle suits them best.
FACTORS = frozenset({"ps_input", "ps_grad_out"})


def compressors_for(dtype: np.dtype, *, checksum: bool = True) -> list:
    """Bytes-to-bytes codecs by dtype only (compressor, then checksum); analysis stores."""
    comp = _FAST if np.dtype(dtype).kind == "f" else _DENSE
    return [comp, _CHECKSUM] if checksum else [comp]


def codecs_for(name: str, ndim: int, dtype: np.dtype, *, checksum: bool = True,
               profile: Profile = "fast") -> dict[str, Any]:
    """``filters`` and ``compressors`` of one run-store variable (keyword arguments of
    ``zarr.Group.create_array``).

    Parameters
    ----------
    name : the variable's name (``weight``, ``ps_input``, ...).
    ndim : dimensions of the stored array, ``step`` first.
    dtype : storage dtype.
    checksum : end with the CRC32C codec.
    profile : ``"fast"`` (LZ4), ``"small"`` (zstd-1) or ``"plain"`` (trajlab 0.1); see the
        module docstring.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    dtype = np.dtype(dtype)
    filters: list = []
    if dtype.kind != "f":
        comp = _DENSE
    elif profile == "plain":
        comp = _FAST
    else:
        cname, clevel = ("lz4", 5) if profile == "fast" else ("zstd", 1)
        shuffle = "shuffle" if name in FACTORS else "bitshuffle"
        if name in TEMPORAL and ndim > 1:
            filters = [zarr.codecs.TransposeCodec(order=(*range(1, ndim), 0))]
            shuffle = "bitshuffle"
        comp = zarr.codecs.BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle,
                                      typesize=dtype.itemsize)
    return {"filters": filters or None, "compressors": [comp, _CHECKSUM] if checksum else [comp]}


def fill_value(dtype: np.dtype):
    """Fill value of padding and unwritten rows: NaN for floats, False, -1 for integers."""
    kind = np.dtype(dtype).kind
    if kind == "f":
        return np.nan
    if kind == "b":
        return False
    return -1


def crc32c_of(data: Any) -> int:
    """CRC32C of a buffer, as Zarr's ``crc32c`` codec computes it.

    Uses the ``crc32c`` package, which releases the GIL while it hashes (and runs at ~20 GB/s
    with SSE4.2): the writer thread hashes every chunk beside training, and Zarr's own
    ``google_crc32c`` holds the GIL, which stalled every small op of the training thread for
    the hash's duration (an MLP step went from 4 to 115 ms beside a thread hashing in a loop).
    Falls back to ``google_crc32c`` when ``crc32c`` is not installed.
    """
    try:
        from crc32c import crc32c
    except ImportError:  # pragma: no cover - crc32c is a dependency
        import google_crc32c

        return int(google_crc32c.value(data))
    return int(crc32c(data))
