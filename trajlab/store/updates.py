"""Updates stored only where the weights cannot give them (pure numpy + zarr reads).

With ``every = 1`` the row after step t is step t + 1 and starts from exactly the weights
step t left, so update(t) = weight(t + 1) - weight(t) — the same float subtraction the recorder
would have stored. The writer checks that equality for each row (bit for bit) and stores the
update only where it fails (``every > 1``, weights changed between steps by user code, the last
row of a run), so every dense matrix is written once per step instead of twice.
"""

from __future__ import annotations

import numpy as np


def derive_updates(weight: np.ndarray, update: np.ndarray, stored: np.ndarray,
                   next_weight: np.ndarray | None) -> np.ndarray:
    """Updates of rows 0..T-1 from weights (T, m, n), stored updates and flags (T,).

    ``next_weight`` is the weight of the row after the last one (None when there is none, in
    which case the last row's update must be stored or stays NaN).
    """
    stored = np.asarray(stored, dtype=bool).reshape(-1)
    if stored.all():
        return update
    nxt = weight[1:] if next_weight is None else np.concatenate([weight[1:], next_weight[None]])
    diff = np.full_like(weight, np.nan)
    diff[: nxt.shape[0]] = nxt - weight[: nxt.shape[0]]
    return np.where(stored[:, None, None], update, diff)


def read_updates(group, r0: int, r1: int, committed: int) -> np.ndarray:
    """Rows ``r0:r1`` of a layer group's updates (``committed``: rows that may be read)."""
    if "update_stored" not in group:  # stores written before derived updates
        return group["update"][r0:r1]
    w = group["weight"][r0:min(r1 + 1, committed)]
    nxt = w[r1 - r0] if w.shape[0] > r1 - r0 else None
    return derive_updates(w[: r1 - r0], group["update"][r0:r1], group["update_stored"][r0:r1], nxt)
