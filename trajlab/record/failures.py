"""The recorder's failure policy, as text and once-only warnings.

What the recorder says when something goes wrong while training goes on: a layer whose capture
failed, NaN or Inf gradients, parameters added to the optimizer after the layers were planned, a
recording stopped (``on_error="warn"``) or raised (``on_error="raise"``), a run that recorded
nothing. The decisions stay in :class:`trajlab.record.recorder.Recorder`; this module builds the
messages (pure) and reads what a stopped recording kept from the store itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from trajlab.errors import user_stacklevel


class OnceWarnings:
    """``RuntimeWarning`` s prefixed ``trajlab:``, each key at most once per recording."""

    def __init__(self) -> None:
        self._keys: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        """Mark ``key`` as said (a warning given some other way, or a check done once)."""
        self._keys.add(key)

    def warn(self, key: str, message: str) -> bool:
        """Warn ``trajlab: message`` unless ``key`` was said; True when it warned."""
        if key in self._keys:
            return False
        self._keys.add(key)
        warnings.warn(f"trajlab: {message}", RuntimeWarning, stacklevel=user_stacklevel())
        return True


def added_params(optimizer: torch.optim.Optimizer, known: Iterable[int],
                 model: nn.Module) -> list[str]:
    """Names of the matrices (``dim >= 2``) the optimizer steps that are not among ``known``
    (ids of the recorded parameters), in the optimizer's order."""
    known = set(known)
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), f"<a {tuple(p.shape)} tensor outside the model>")
            for g in optimizer.param_groups for p in g["params"]
            if id(p) not in known and p.dim() >= 2]


def added_message(added: list[str], step: int) -> str:
    """Why parameters added to the optimizer are not recorded, and what to do instead."""
    more = f" and {len(added) - 4} more" if len(added) > 4 else ""
    return (f"parameters added to the optimizer by step {step} are not recorded: "
            f"{', '.join(added[:4])}{more}. The recorder plans its layers when it is created; "
            "to record them, close it and start a new Recorder into a new store (a store's "
            "layers are fixed)")


def layer_failed_message(name: str, step: int, why: str) -> str:
    """A layer whose capture failed numerically: flagged, recording goes on."""
    return (f"layer {name!r} at step {step}: {why}; the row is recorded with NaN per-sample "
            "information and flagged ('nonfinite'), recording continues")


def nonfinite_message(step: int, name: str) -> str:
    """The first NaN or Inf gradient seen."""
    return (f"NaN or Inf in the gradient of layer {name!r} at step {step}; recorded and "
            "flagged (variable 'nonfinite'), recording continues")


def nothing_recorded_message(failure: BaseException | None, where: str) -> str:
    """A recording that closed without a recorded step, and why."""
    if failure is not None:
        why = f"the training loop raised {type(failure).__name__}: {failure}".strip()
    else:
        why = "optimizer.step() was not called while recording"
    return f"no step was recorded ({why}); nothing was written to {where}"


def stopped_error_message(step: int, reason: str, kept: str) -> str:
    """``on_error="raise"``: the RecorderError's text."""
    return f"trajlab: recording stopped at step {step}: {reason}. {kept}"


def stopped_message(where: str, step: int, reason: str, kept: str) -> str:
    """``on_error="warn"``: the warning's text (training goes on)."""
    return (f"recording into {where} stopped at step {step} ({reason}); training continues. "
            f"{kept}; the store is marked truncated.")


def committed_steps(store: Any, storage_options: dict | None) -> str:
    """What a stopped recording kept, read from the store itself (the writer that committed
    may be another process, and rows may have been waiting when it failed)."""
    try:
        from trajlab.store.reader import open_run

        run = open_run(store, storage_options=storage_options)
        if run.n_steps == 0:
            return "No step was committed"
        first = int(run.rows.root_rows(["step"], (0, 1))["step"][0])
        last = int(run.rows.root_rows(["step"], (run.n_steps - 1, run.n_steps))["step"][0])
        return f"Steps {first} to {last} ({run.n_steps} recorded) are committed and kept"
    except Exception:  # noqa: BLE001 - the store may be unreadable (e.g. its disk is gone)
        return "Steps committed before are kept"


__all__ = ["OnceWarnings", "added_message", "added_params", "committed_steps",
           "layer_failed_message", "nonfinite_message", "nothing_recorded_message",
           "stopped_error_message", "stopped_message"]
