"""The end terms every layer kernel shares, computed once (MATH.md §3–§5).

Each layer kernel (:func:`~trajlab.sde.layer_terms`, :func:`~trajlab.sde.noise_free_terms`,
:func:`~trajlab.sde.resolvent_layer_terms`, :func:`~trajlab.sde.diagonal_layer_terms`) computes
the spectral quantities its form allows (SVD, resolvent, closed form for diagonal matrices):
``K``, the gap, the first and second derivatives of ``s_1`` along the flow gradient and along
the applied update, ``u_1^T g v_1`` and, with per-sample information, the noise terms.
:func:`layer_epilogue` turns those into the returned terms: the pathwise terms, the optimizer's
drift, the variance/covariance splits, the total drift and the discretisation term. A change of
these terms is made here once, for every kernel.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["flow_gradient", "layer_epilogue"]


def flow_gradient(g: Tensor, grad_full: Tensor | None, matrix_dims: int = 2
                  ) -> tuple[Tensor, Tensor]:
    """The gradient of the flow term and where it is the full-data one (MATH §3 choice).

    Parameters
    ----------
    g : Tensor (..., *matrix)
        Batch-mean gradients, ``matrix_dims`` trailing dimensions per matrix (1 for diagonals
        stored as vectors).
    grad_full : Tensor like ``g``, optional
        Full-data gradients; rows where it is not finite (e.g. NaN where no probe ran) fall back
        to ``g``.

    Returns
    -------
    grad : Tensor like ``g`` (in ``g``'s dtype).
    used_full : bool Tensor (...), whether ``grad_full`` was used.
    """
    lead = g.shape[:g.dim() - matrix_dims]
    if grad_full is None:
        return g, torch.zeros(lead, dtype=torch.bool, device=g.device)
    grad_full = grad_full.to(g.dtype)
    used_full = torch.isfinite(grad_full)
    for _ in range(matrix_dims):
        used_full = used_full.all(-1)
    sel = used_full.reshape(*lead, *(1,) * matrix_dims)
    return torch.where(sel, grad_full, g), used_full


def layer_epilogue(
    *,
    K: Tensor,
    gap: Tensor,
    gap_tol: float,
    used_full: Tensor,
    flow: Tensor,
    disc_raw: Tensor,
    p1: Tensor,
    p2: Tensor,
    plain: Tensor,
    eta: Tensor,
    noise: Mapping[str, Tensor] | None = None,
    extra: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The terms of one layer kernel from its spectral quantities (shapes (...) unless stated).

    Parameters
    ----------
    K, gap : ``s_1`` and the relative spectral gap ``(s_1 - s_2) / s_1``.
    gap_tol : ``degenerate = gap < gap_tol``.
    used_full : bool, whether the flow gradient was the full-data one (:func:`flow_gradient`).
    flow : ``d s_1[grad]`` along the flow gradient.
    disc_raw : ``(eta / 2) d^2 s_1[grad]``, before the batch gradient's bias is removed.
    p1, p2 : ``d s_1[dW]`` and ``d^2 s_1[dW]`` along the applied update.
    plain : ``d s_1[-eta g] = -eta u_1^T g v_1``, plain SGD's first-order step.
    eta : learning rates (broadcast against ``K``).
    noise : the noise terms, or None without a noise estimate: ``drift_noise``,
        ``drift_noise_var``, ``diffusion2``, ``diffusion2_var``, ``noise_proj`` (..., B) and
        any further per-kernel keys (``coverage_u``, ``coverage_v``), returned as given.
    extra : further keys returned as given (``alignment``).

    Returns
    -------
    dict of str to Tensor
        ``K``, ``spectral_gap``, ``degenerate``, ``flow_full_gradient``, ``drift_flow``
        (``-flow``), ``pathwise_increment`` (``p1 + p2 / 2``), ``pathwise_first_order``,
        ``drift_optimizer`` (``(p1 - plain) / eta``, 0 where ``eta = 0``: what the optimizer adds
        to plain SGD's first-order drift, a rate) and ``drift_discretization``: ``disc_raw``
        where the full-data gradient was used; elsewhere ``disc_raw - drift_noise`` (with the
        batch gradient standing in for grad L, ``E[d2 s1[g]] = d2 s1[grad L] + tr(H Sigma)``)
        or NaN without a noise estimate (the bias cannot be removed). With ``noise`` also its
        keys, ``drift_noise_cov``, ``diffusion2_cov`` (total less the variance part) and
        ``drift = drift_flow + drift_noise``.
    """
    safe_eta = torch.where(eta == 0, torch.ones_like(eta), eta)
    out = {
        "K": K,
        "spectral_gap": gap,
        "degenerate": gap < gap_tol,
        **(extra or {}),
        "flow_full_gradient": used_full,
        "drift_flow": -flow,
        "pathwise_increment": p1 + 0.5 * p2,
        "pathwise_first_order": p1,
        "drift_optimizer": torch.where(eta == 0, torch.zeros_like(p1), (p1 - plain) / safe_eta),
    }
    if noise is None:
        out["drift_discretization"] = torch.where(used_full, disc_raw,
                                                  torch.full_like(disc_raw, float("nan")))
        return out
    drift_noise, diffusion2 = noise["drift_noise"], noise["diffusion2"]
    out.update(noise)
    out["drift_noise_cov"] = drift_noise - noise["drift_noise_var"]
    out["diffusion2_cov"] = diffusion2 - noise["diffusion2_var"]
    out["drift"] = out["drift_flow"] + drift_noise
    out["drift_discretization"] = torch.where(used_full, disc_raw, disc_raw - drift_noise)
    return out
