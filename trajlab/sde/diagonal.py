"""Every layer term of a diagonal matrix ``W = diag(gamma)`` in closed form (MATH.md §2–§5).

The kernel of the layers whose sketch kind is :attr:`~trajlab.sketches.SketchKind.diagonal`
(normalisation scales, stored as their diagonals): O(T B d) instead of a spectrum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trajlab.sde.epilogue import flow_gradient, layer_epilogue
from trajlab.sde.layer import noise_scale

__all__ = ["diagonal_layer_terms"]


def diagonal_layer_terms(
    gamma: Tensor,
    g: Tensor,
    update: Tensor,
    lr: Tensor,
    *,
    ps_diag: Tensor | None = None,
    grad_full: Tensor | None = None,
    population: int | None = None,
    gap_tol: float = 1e-3,
) -> dict[str, Tensor]:
    """Every layer term of ``W = diag(gamma)`` in closed form, O(T B d) (MATH.md §2–§5).

    With ``j* = argmax_j |gamma_j|`` (unique) and ``s = sign(gamma_j*)``: ``K = |gamma_j*|``,
    ``u_1 = s e_j*``, ``v_1 = e_j*``, so ``d sigma_1[D] = s D_j*j*`` and, for the diagonal
    directions every recorded quantity has (gradients, updates, deviations),
    ``d^2 sigma_1[D] = 0`` and every Hessian-diagonal term vanishes on the diagonal entries.
    Hence ``drift_noise = drift_noise_var = 0``, ``c_i = s (g_ij* - g_j*)``,
    ``diffusion2 = eta sum_i c_i^2 / (B (B - 1))`` (times the finite-population factor) and
    ``diffusion2_var = eta Sigma_j*j*``. Equal to :func:`trajlab.sde.resolvent_layer_terms` on
    ``diag(gamma)`` at every step whose maximum is unique (tests/record/test_rules_kinds.py), without
    its O(d^3) spectrum. At a tie (gap 0) ``j*`` is the first maximal index and the step is
    flagged ``degenerate``, as sigma_1 is not differentiable there.

    Parameters
    ----------
    gamma, g, update : Tensor (T, d)
        Diagonals of the weights, batch gradients and applied updates of T steps.
    lr : Tensor (T,)
    ps_diag : Tensor (T, B, d), optional
        The recorded per-sample diagonals; None gives the noise-free terms.
    grad_full, population, gap_tol
        As for :func:`trajlab.sde.resolvent_layer_terms` (``grad_full`` (T, d)).

    Returns
    -------
    dict of str to Tensor
        The keys of :func:`trajlab.sde.resolvent_layer_terms` with or without a sketch.
    """
    dt = gamma.dtype
    T, d = gamma.shape
    eta = torch.as_tensor(lr, dtype=dt, device=gamma.device).expand(T)
    mag = gamma.abs()
    top = torch.topk(mag, min(2, d), dim=-1)
    K = top.values[:, 0]
    second = top.values[:, 1] if d > 1 else torch.zeros_like(K)
    j = top.indices[:, :1]
    s = torch.where(gamma.gather(-1, j)[:, 0] < 0, -1.0, 1.0).to(dt)
    safe_k = torch.where(K > 0, K, torch.ones_like(K))
    gap = torch.where(K > 0, (K - second) / safe_k, torch.zeros_like(K))

    def at(x: Tensor) -> Tensor:
        return x.to(dt).gather(-1, j)[:, 0]

    grad, used_full = flow_gradient(g.to(dt), grad_full, matrix_dims=1)
    zero = torch.zeros_like(K)
    noise = None
    if ps_diag is not None:
        B = ps_diag.shape[-2]
        fpc, scale = noise_scale(B, population)
        per_sample = ps_diag.to(dt).gather(-1, j[:, None, :].expand(T, B, 1))[..., 0]  # (T, B)
        c = s[:, None] * (per_sample - at(g)[:, None])
        second_moment = (ps_diag.to(dt) ** 2).sum(-2).gather(-1, j)[:, 0]
        sigma_jj = ((second_moment - B * at(g) ** 2) / (B * (B - 1))).clamp_min(0) * fpc
        one = torch.ones_like(K)
        noise = {
            "drift_noise": zero,
            "drift_noise_var": zero.clone(),
            "diffusion2": eta * scale * (c * c).sum(-1),
            "diffusion2_var": eta * sigma_jj,
            "noise_proj": c,
            "coverage_u": one,
            "coverage_v": one.clone(),
        }
    # diagonal directions: d2 sigma_1 = 0 along the flow gradient and the update
    return layer_epilogue(K=K, gap=gap, gap_tol=gap_tol, used_full=used_full, flow=s * at(grad),
                          disc_raw=zero.clone(), p1=s * at(update), p2=zero.clone(),
                          plain=-eta * s * at(g), eta=eta, noise=noise)
