"""The recorder's failure policy in action: stop recording (training goes on) or raise, per
``on_error``, and the warnings a :class:`~trajlab.record.recorder.Recorder` says once (disk
space, parameters added to the optimizer, non-finite rows). The messages themselves are in
:mod:`trajlab.record.failures`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING

from trajlab.errors import RecorderError, user_stacklevel
from trajlab.record import disk_space, failures, optimizer_hooks
from trajlab.store.target import show

if TYPE_CHECKING:
    from trajlab.record.recorder import Recorder


def stop(rec: Recorder, err: BaseException, *, where: str) -> None:
    """Stop recording (training goes on) or raise, per ``on_error``; the store is marked
    truncated with the reason, and the message says which steps are kept."""
    reason = f"{type(err).__name__}: {err}"
    rec._stopped_reason = reason
    rec._remove(rec._layer_handles)
    writer = rec._writer
    if writer is None or writer.error is not None:
        # no live writer thread: mark it here (else the writer marks it when it closes)
        with contextlib.suppress(Exception):
            rec._store_writer.set_truncated(reason)
    kept = failures.committed_steps(rec.store, rec.options.storage_options)
    if rec.options.on_error == "raise":
        raise RecorderError(failures.stopped_error_message(rec._step, reason, kept)) from err
    warnings.warn("trajlab: " + failures.stopped_message(show(rec.store), rec._step,
                                                         reason, kept),
                  RuntimeWarning, stacklevel=user_stacklevel())


def check_writer(rec: Recorder) -> None:
    """Stop (or raise) when the background writer failed; say the first non-finite row."""
    w = rec._writer
    if w is not None and w.error is not None and rec._stopped_reason is None:
        rec._stop(w.error, where="writer")
    nonfinite_warning(rec)


def nonfinite_warning(rec: Recorder) -> None:
    """Warn once about the first row flagged non-finite (by a layer or by the writer)."""
    if rec._nonfinite_seen:
        rec._warned.warn("nonfinite", failures.nonfinite_message(*rec._nonfinite_seen[0]))


def check_disk(rec: Recorder, step: int) -> None:
    """Warn once when the rest of the run will not fit the target's free space."""
    try:
        short = rec._disk.check(step=step, rows_put=rec._n_recorded)
    except OSError:  # the disk cannot be measured: recording goes on unchecked
        rec._disk.done = True
        return
    if short is not None:
        rec._warned.warn("disk", disk_space.message(
            short, where=show(rec.store), steps=rec.options.steps, every=rec.every))


def param_groups_changed(rec: Recorder) -> None:
    """The optimizer's parameters changed since the recorder was made (add_param_group, a
    group edited): those added are not recorded (layers are planned once); say so, once."""
    rec._n_params = optimizer_hooks.count_params(rec.optimizer)
    added = failures.added_params(rec.optimizer,
                                  (id(layer.target.param) for layer in rec._layers), rec.model)
    if added:
        rec._warned.warn("params_added", failures.added_message(added, rec._step))


__all__ = ["check_disk", "check_writer", "nonfinite_warning", "param_groups_changed", "stop"]
