"""Per-sample gradients implied by a run store (exact for rank-one layers, best otherwise)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from trajlab.store.reader import Run, open_run


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


def reconstruct_subspace(
    proj_out: np.ndarray, proj_in: np.ndarray, U: np.ndarray, V: np.ndarray
) -> np.ndarray:
    """Orthogonal projection of G_i onto {U A^T + B V^T}: U U^T G + G V V^T - U U^T G V V^T.

    Parameters
    ----------
    proj_out : (B, m, k) = G_i V.  proj_in : (B, n, k) = G_i^T U.  U : (m, k).  V : (n, k).
    """
    core = np.einsum("mk,bml->bkl", U, proj_out)  # U^T G V, (B, k, k)
    return (
        np.einsum("mk,bnk->bmn", U, proj_in)
        + np.einsum("bmk,nk->bmn", proj_out, V)
        - np.einsum("mk,bkl,nl->bmn", U, core, V)
    )


def per_sample_gradients(run: Run | str, layer: str, step: int) -> PerSampleGradients:
    """The (batch, out, in) per-sample weight gradients that the store implies at ``step``.

    Exact (to the stored dtype) for Linear layers on (batch, features) inputs; for weight-shared
    layers the orthogonal projection of each G_i onto the recorded top-k singular subspaces, with
    the energy it misses.

    Parameters
    ----------
    run : Run or path
    layer : module name of a recorded layer.
    step : optimizer-step index (a value of ``run.steps``).
    """
    run = open_run(run)
    lm = run.layer_meta(layer)
    steps = run.steps
    hits = np.flatnonzero(steps == step)
    if hits.size == 0:
        raise KeyError(
            f"step {step} is not recorded in {run.store!r} (recorded steps: "
            f"{steps[:5].tolist()}{'...' if steps.size > 5 else ''}, {steps.size} in all)"
        )
    row = int(hits[0])
    b = int(run.root["batch_size"][row].values)
    ds = run.layer(layer).isel(step=row)
    if lm.sketch == "rank1":
        d = ds["ps_grad_out"].values[:b]
        a = ds["ps_input"].values[:b]
        grads = np.einsum("bm,bn->bmn", d, a)
        zeros = np.zeros(b, dtype=grads.dtype)
        return PerSampleGradients(grads, zeros, zeros, True)
    po = ds["ps_proj_out"].values[:b]
    pi = ds["ps_proj_in"].values[:b]
    U = ds["basis_u"].values
    V = ds["basis_v"].values
    grads = reconstruct_subspace(po, pi, U, V)
    total = ds["ps_sqnorm"].values[:b]
    resid = np.maximum(total - np.einsum("bmn,bmn->b", grads, grads), 0.0)
    rel = np.sqrt(resid / np.maximum(total, np.finfo(grads.dtype).tiny))
    return PerSampleGradients(grads, resid, rel, False)
