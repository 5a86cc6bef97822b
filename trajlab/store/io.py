"""Concurrent reads and writes of many Zarr arrays (one event-loop round trip each way)."""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.core.sync import sync


def read_many(items: Sequence[tuple[zarr.Array, Any]]) -> list[np.ndarray]:
    """``[arr[sel] for arr, sel in items]``, fetched concurrently."""

    async def _all():
        return await asyncio.gather(*(a._async_array.getitem(sel) for a, sel in items))

    return list(sync(_all()))


def write_many(items: Sequence[tuple[zarr.Array, Any, Any]]) -> None:
    """``arr[sel] = value`` for every item, written concurrently."""

    async def _all() -> None:
        await asyncio.gather(*(a._async_array.setitem(sel, v) for a, sel, v in items))

    sync(_all())
