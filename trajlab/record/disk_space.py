"""An early warning when a recording will not fit the free space of its disk.

With ``Recorder(..., steps=N)`` the recorder knows how long the run will be. Once the writer has
committed its first rows, :class:`DiskSpaceCheck` measures the stored bytes per recorded step on
the local target, projects the rest of the run (:func:`shortfall`, pure arithmetic) and, when
that exceeds the free space of the target's disk, says so once: the projected size, the free
space and the ``every`` that would fit. URL targets (``s3://``, ...) are not checked.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from trajlab.store.names import COMMIT_KEY
from trajlab.store.target import StoreLike, local_path


@dataclass(frozen=True)
class Shortfall:
    """A run whose remaining rows do not fit the free space.

    Attributes
    ----------
    needed : projected bytes of the rows not yet on disk (pending and future recorded steps).
    free : free bytes of the target's disk.
    rows : rows not yet on disk.
    bytes_per_row : stored bytes of one recorded step, measured.
    every_that_fits : the smallest ``every`` whose remaining rows fit, or None when even one
        row per remaining step range does not fit.
    """

    needed: float
    free: int
    rows: int
    bytes_per_row: float
    every_that_fits: int | None


def remaining_rows(step: int, steps: int, every: int) -> int:
    """Recorded steps after ``step`` in a run of ``steps`` steps (indices ``0..steps-1``)."""
    if step >= steps - 1:
        return 0
    return (steps - 1) // every - step // every


def shortfall(*, bytes_per_row: float, pending_rows: int, step: int, steps: int, every: int,
              free: int) -> Shortfall | None:
    """Whether the rest of a run fits ``free`` bytes; None when it does.

    Parameters
    ----------
    bytes_per_row : stored bytes of one recorded step.
    pending_rows : rows recorded but not yet on disk (in the writer's queue).
    step : the last recorded step.  steps : the run's steps.  every : its ``every``.
    free : free bytes where the store is.
    """
    rows = pending_rows + remaining_rows(step, steps, every)
    needed = rows * bytes_per_row
    if needed <= free:
        return None
    left = free - pending_rows * bytes_per_row  # for the future rows, at another every
    span = steps - 1 - step  # steps after this one
    fit = None
    if left >= bytes_per_row > 0:
        most = int(left // bytes_per_row)  # future rows that fit
        # rows(e) >= floor(span / e), so no e <= span / (most + 1) fits: start above it
        e = max(every + 1, span // (most + 1))
        while e <= span and remaining_rows(step, steps, e) > most:
            e += 1
        fit = e if e <= span else None
    return Shortfall(needed=needed, free=free, rows=rows, bytes_per_row=bytes_per_row,
                     every_that_fits=fit)


def size_text(n: float) -> str:
    """Bytes as ``"3.8 MB"`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns


def message(s: Shortfall, *, where: str, steps: int, every: int) -> str:
    """The warning's text: what does not fit, by how much, and what would."""
    fix = (f"every={s.every_that_fits} would fit" if s.every_that_fits is not None
           else "no every fits the rest")
    return (f"the run store {where} will not fit its disk: steps={steps} at every={every} "
            f"leave {s.rows} recorded steps of about {size_text(s.bytes_per_row)} each "
            f"(measured on the committed rows), {size_text(s.needed)} in all, but the disk has "
            f"{size_text(s.free)} free. {fix}; or record per_sample_dtype='float16' or "
            "per_sample=False, or free space or record elsewhere. Should the disk fill, "
            "recording stops as on_error says and the committed steps are kept")


class DiskSpaceCheck:
    """Measure once, after the first committed rows, whether the run fits its disk.

    Parameters
    ----------
    store : the run store's location; only local targets are checked.
    steps : the run's expected steps (None: nothing to check).
    every : the recorder's ``every``.
    """

    def __init__(self, store: StoreLike, *, steps: int | None, every: int) -> None:
        self.path: Path | None = local_path(store) if steps is not None else None
        self.steps, self.every = steps, every
        self.done = self.path is None  # measured once (or nothing to measure)
        self.rows_before = 0  # rows the store held when this recording started (appending)

    def check(self, *, step: int, rows_put: int) -> Shortfall | None:
        """After a recorded step: once rows are committed, measure and project (once).

        ``rows_put`` : rows this recording has given the writer so far.
        """
        if self.done:
            return None
        committed = self._committed()
        if not committed:
            return None  # nothing on disk yet: measure at a later recorded step
        self.done = True
        stored = stored_bytes(self.path)
        free = shutil.disk_usage(existing(self.path)).free
        pending = max(0, rows_put - (committed - self.rows_before))
        return shortfall(bytes_per_row=stored / committed, pending_rows=pending, step=step,
                         steps=self.steps, every=self.every, free=free)

    def _committed(self) -> int | None:
        """The commit marker in the root's zarr.json (any writer, thread or process)."""
        try:
            with open(self.path / "zarr.json") as f:
                value = json.load(f).get("attributes", {}).get(COMMIT_KEY, 0)
        except (OSError, ValueError):
            return None  # not created yet, or being rewritten: try again later
        return value if isinstance(value, int) and not isinstance(value, bool) else None


def stored_bytes(path: Path) -> int:
    """Bytes of a store's files other than its metadata documents."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            if f != "zarr.json":
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:  # removed while walking (a *.partial renamed)
                    pass
    return total


def existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (for ``shutil.disk_usage``)."""
    p = path.expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


__all__ = ["DiskSpaceCheck", "Shortfall", "message", "remaining_rows", "shortfall",
           "size_text", "stored_bytes"]
