"""Per-sample gradients implied by a run store (exact for rank-one layers, best otherwise)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from trajlab.sketches import reconstruct_subspace, sketch_kind
from trajlab.store.reader import Run, open_run
from trajlab.store.target import show

__all__ = ["PerSampleGradients", "per_sample_gradients", "reconstruct_subspace"]


class PerSampleGradients(NamedTuple):
    """Per-sample gradients of one layer at one step.

    Attributes
    ----------
    grads : (batch, out, in) array.
    residual : (batch,) squared Frobenius norm of what the store could not reconstruct
        (``||G_i||^2 - ||grads_i||^2``; zeros for exact rank-one layers).
    relative_error : (batch,) ``sqrt(residual) / ||G_i||``.
    exact : whether the store holds the gradients exactly.
    """

    grads: np.ndarray
    residual: np.ndarray
    relative_error: np.ndarray
    exact: bool


def per_sample_gradients(run: Run | str, layer: str, step: int) -> PerSampleGradients:
    """The (batch, out, in) per-sample weight gradients that the store implies at ``step``.

    Exact (to the stored dtype) for Linear layers on (batch, features) inputs; for weight-shared
    layers the orthogonal projection of each G_i onto the recorded top-k singular subspaces, with
    the energy it misses. The gradients are those the optimizer applied: times ``grad_scale``
    (clipping, loss scaling) like the stored per-sample information.

    Parameters
    ----------
    run : Run or path
    layer : name of a recorded layer.
    step : optimizer-step index (a value of ``run.steps``).
    """
    run = open_run(run)
    lm = run.layer_meta(layer)
    kind = sketch_kind(lm.sketch)
    if not kind.per_sample:
        raise ValueError(f"layer {layer!r} was recorded without per-sample information "
                         f"(sketch {lm.sketch!r})")
    steps = run.steps
    hits = np.flatnonzero(steps == step)
    if hits.size == 0:
        raise KeyError(
            f"step {step} is not recorded in {show(run.store)} (recorded steps: "
            f"{steps[:5].tolist()}{'...' if steps.size > 5 else ''}, {steps.size} in all)"
        )
    row = int(hits[0])
    b = int(run.root_rows(["batch_size"], (row, row + 1))["batch_size"][0])
    arrays = run.layer_rows(layer, list(kind.variables(lm.rank)), (row, row + 1))
    try:
        grads, resid = kind.reconstruct({k: v[0] for k, v in arrays.items()}, b)
    except ValueError as exc:  # a kind that holds no gradients says what it holds instead
        raise ValueError(f"layer {layer!r}: {exc}") from None
    if kind.exact:
        zeros = np.zeros(b, dtype=grads.dtype)
        return PerSampleGradients(grads, zeros, zeros, True)
    total = np.maximum(np.einsum("bmn,bmn->b", grads, grads) + resid, np.finfo(grads.dtype).tiny)
    rel = np.sqrt(resid / total)
    return PerSampleGradients(grads, resid, rel, False)
