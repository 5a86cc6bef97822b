"""Resume: where a recording starts, and whether the model continues the run it appends to.

:func:`plan` reads the opened run store (``mode="a"`` appends after its last committed row) and
checks ``every``, the weights' dtype, the layers and their shapes against the model; a
mismatch is a :class:`RecorderError` naming it and the fix. Layers that the stored run left
out at its first step (broadcast over the batch) stay left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trajlab.errors import RecorderError
from trajlab.record import store_policy
from trajlab.record.layer_state import LayerState
from trajlab.store.metadata import RunMeta
from trajlab.store.run_store import RunStoreWriter


@dataclass(frozen=True)
class Resume:
    """Where a recording starts.

    Attributes
    ----------
    step : index of the next optimizer step (None: the recorder's default, 0).
    meta : the stored run's metadata when appending (None: a new store).
    layers : the layers still recorded.
    expected : per layer, weight + update of the last committed row, when the recording
        continues right after it (the continuity check of the first step), else None.
    """

    step: int | None
    meta: RunMeta | None
    layers: list[LayerState]
    expected: dict[str, np.ndarray] | None


def plan(sw: RunStoreWriter, layers: list[LayerState], summary: dict[str, Any], *,
         start_step: int | None, every: int) -> Resume:
    """Check the model against the opened store and say where the recording starts.

    ``summary``'s entries of layers left out (broadcast over the batch in the stored run) are
    updated to say why.
    """
    last = sw.last_step
    step = None
    if start_step is not None:
        if last is not None and start_step <= last:
            raise RecorderError(
                f"start_step={start_step} but the store already holds steps up to "
                f"{last}; resume with start_step > {last} or record into a new store"
            )
        step = start_step
    elif last is not None:
        step = last + 1
    if not (sw.is_created and sw.meta is not None):
        return Resume(step, None, layers, None)
    old = sw.meta
    if old.every != every:
        raise RecorderError(
            f"cannot append: the store was recorded with every={old.every}, this "
            f"recorder has every={every} (the analysis's time step depends on it); "
            "use the same every or record into a new store")
    dtype = store_policy.numpy_dtype(layers[0].target.param.dtype)
    if old.dtype != dtype:
        raise RecorderError(f"cannot append: the store holds {old.dtype} weights, the "
                            f"model has {dtype}; record into a new store")
    stored = set(old.layer_names)
    broadcast = {e["name"]: e for e in (old.model or {}).get("modules", [])
                 if "broadcast over the batch" in str(e.get("why", ""))}
    left_out = [layer for layer in layers if layer.name not in stored
                and layer.target.module_name in broadcast]
    if left_out:  # left out at the stored run's first step (see assembly.drop_broadcast)
        for layer in left_out:
            layer.dropped = True
        layers = [layer for layer in layers if not layer.dropped]
        for e in summary["modules"]:
            if e["name"] in broadcast:
                e.update(recorded=False, recorded_parameters=0,
                         why=broadcast[e["name"]]["why"])
                e.pop("how", None)
    missing = [layer.name for layer in layers if layer.name not in stored]
    if missing:
        raise RecorderError(f"cannot append: layers {missing} are not in the store "
                            f"(it holds {sorted(stored)})")
    wrong = [f"{layer.name!r} is {tuple(layer.weight().shape)} in the model, "
             f"{old.layer(layer.name).shape} in the store" for layer in layers
             if tuple(layer.weight().shape) != old.layer(layer.name).shape]
    if wrong:
        raise RecorderError("cannot append: the model does not match the stored run: "
                            + "; ".join(wrong) + ". Record into a new store instead")
    expected = None
    if last is not None and step == last + 1:
        expected = {}
        for layer in layers:
            row = sw.last_row(layer.name, ("weight", "update"))
            expected[layer.name] = row["weight"] + row["update"]
    return Resume(step, old, layers, expected)


__all__ = ["Resume", "plan"]
