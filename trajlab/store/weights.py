"""Weights stored as keyframes plus exact updates (pure numpy).

A weight row is stored only where ``weight_stored`` is true; between keyframes
``W[r] = W[r - 1] + update[r - 1]`` in the stored dtype, which the recorder has checked to
reproduce the real weight bit for bit (otherwise it stores that row too). Every chunk starts
with a keyframe, so chunks rebuild independently.
"""

from __future__ import annotations

import numpy as np


def rebuild_weights(weight: np.ndarray, update: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Fill the rows of ``weight`` (T, m, n) that are not stored from the previous row.

    ``stored`` (T,) bool says which rows hold data; the first row must be one of them (else the
    rows before the first keyframe stay NaN).
    """
    stored = np.asarray(stored, dtype=bool).reshape(-1)
    if stored.all():
        return weight
    out = np.array(weight, copy=True)
    for r in range(out.shape[0]):
        if not stored[r]:
            if r == 0:
                out[r] = np.nan
            else:
                np.add(out[r - 1], update[r - 1], out=out[r])
    return out


def read_weights(group, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of a layer group's weights, rebuilt from the chunk's keyframe."""
    w = group["weight"]
    if "weight_stored" not in group:  # stores written before keyframes: every row stored
        return w[r0:r1]
    c0 = (r0 // w.chunks[0]) * w.chunks[0]
    full = rebuild_weights(w[c0:r1], group["update"][c0:r1], group["weight_stored"][c0:r1])
    return full[r0 - c0:]
