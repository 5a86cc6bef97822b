"""How a recording maps onto its store: metadata of a new run, chunk sizes, and the checks
that a resumed recording continues the stored run."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trajlab.errors import RecorderError
from trajlab.sketches import sketch_kind
from trajlab.store.layout import written_format
from trajlab.store.metadata import FORMAT_VERSION, LayerMeta, RunMeta, new_run_id


@functools.cache
def numpy_dtype(dtype: torch.dtype) -> str:
    """Storage dtype of a torch float dtype (bfloat16, which numpy lacks, is stored widened)."""
    if dtype == torch.bfloat16:
        return "float32"
    return str(torch.empty((), dtype=dtype).numpy().dtype)


def chunk_steps(metas: Sequence[LayerMeta], batch_size: int, itemsize: int) -> int:
    """Rows per chunk so that the largest array's chunk holds about 16 MB (1..256).

    Rows are committed a chunk at a time (or every ``flush_seconds``), and each flush costs a
    few milliseconds per array whatever its size: long chunks keep that off small models.
    """
    biggest = 0
    for m in metas:
        o, i = m.shape
        per_sample = batch_size * sketch_kind(m.sketch).sample_size(m.shape, m.rank)
        biggest = max(biggest, o * i, per_sample)
    rows = (16 << 20) // max(1, biggest * itemsize)
    return int(min(256, max(1, 2 ** int(math.log2(max(1, rows))))))


def new_meta(*, metas: Sequence[LayerMeta], dtype: str, ps_dtype: str, every: int,
             chunk: int, sampler: str, dataset_size: int | None, user: dict[str, Any],
             probe: bool, model: dict[str, Any]) -> RunMeta:
    from trajlab._version import __version__

    return RunMeta(
        format_version=written_format((m.sketch for m in metas), FORMAT_VERSION),
        dtype=dtype,
        ps_dtype=ps_dtype,
        every=every,
        chunk_steps=chunk,
        sampler=sampler,
        dataset_size=dataset_size,
        layers=tuple(metas),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        trajlab_version=__version__,
        torch_version=torch.__version__,
        user=jsonable(user),
        probe=probe,
        run_id=new_run_id(),
        model=jsonable(model),
    )


def check_append(old: RunMeta, metas: Sequence[LayerMeta], *, dtype: str, every: int,
                 probe: bool) -> None:
    """Refuse to append a recording that does not continue ``old`` the same way."""
    problems = []
    old_layers = {lm.name: lm for lm in old.layers}
    for m in metas:
        o = old_layers.get(m.name)
        if o is None:
            problems.append(f"layer {m.name!r} is not in the store")
        elif (o.shape, o.sketch, o.rank) != (m.shape, m.sketch, m.rank):
            problems.append(f"layer {m.name!r}: store has {o.shape} {o.sketch} rank {o.rank}, "
                            f"model has {m.shape} {m.sketch} rank {m.rank}")
    if set(old_layers) != {m.name for m in metas}:
        problems.append(f"store layers {sorted(old_layers)} != recorded "
                        f"{[m.name for m in metas]}")
    if old.dtype != dtype:
        problems.append(f"store dtype {old.dtype} != model dtype {dtype}")
    if old.every != every:
        problems.append(f"the store was recorded with every={old.every}, this recorder has "
                        f"every={every} (the analysis's time step depends on it)")
    if probe and not old.probe:
        problems.append("the store was recorded without a probe (no probe_grad arrays)")
    if problems:
        raise RecorderError("cannot append: the recording does not match the stored run: "
                            + "; ".join(problems) + ". Record into a new store instead")


def continuity(name: str, stored_after: np.ndarray, now: torch.Tensor, *,
               last_step: int | None = None) -> str | None:
    """A message when the weights at the first resumed step are not where the stored run left
    them (weights not restored from the checkpoint of that step), else None."""
    stored = np.asarray(stored_after)
    dtype = stored.dtype if stored.dtype.kind == "f" else np.dtype(np.float64)
    # compared in the stored dtype: the stored weight plus the stored update may differ from the
    # applied weights by a rounding of that dtype (the update is stored as after - before)
    now_np = now.detach().to("cpu", torch.float64).numpy().astype(dtype).astype(np.float64)
    ref = stored.astype(np.float64)
    if not np.all(np.isfinite(ref)):
        return None
    diff = float(np.linalg.norm(now_np - ref) / max(np.linalg.norm(ref), 1e-300))
    if diff <= 8 * float(np.finfo(dtype).eps):
        return None
    at = f" (step {last_step})" if last_step is not None else ""
    return (f"layer {name!r}: the weights at the first resumed step differ from where the "
            f"stored run left them by {diff:.2e} (relative): the model was not restored from "
            f"the checkpoint of the last recorded step{at}, so K will jump at this step. "
            "Restore the model and optimizer state of that step; if you restored a later "
            "checkpoint, pass Recorder(..., start_step=<its step>) so that steps keep their "
            "numbers (the analysis then refuses to integrate across the gap); or record into a "
            "new store")


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` as JSON types: numpy and 0-d torch scalars become numbers (not their text), other
    objects their ``str``."""
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (np.ndarray, torch.Tensor)) and o.ndim == 0:
            return o.item()
        return str(o)

    return json.loads(json.dumps(d, default=default))
