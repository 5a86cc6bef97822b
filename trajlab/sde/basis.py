"""Noise terms of a rank-one layer from its statistics in W's singular basis (MATH.md §2–3).

The kernel of the ``rank1_basis`` sketch (:class:`~trajlab.sketches.Rank1Basis`; docs/math.md,
"Sufficient statistics of rank-one layers"). In the oriented frame ``W_o = U diag(S) V^T``
(``W`` itself when m <= n, else ``W^T``; s = min(m, n)) with per-sample gradients
``G_i = outer(x_i, y_i)`` and ``Omega_i = G_i - gbar`` (gbar their mean), everything the noise
terms need is, with ``beta_i = x_i . u_1`` and ``t_i = U^T x_i``:

* ``b_i = U^T Omega_i v_1 = t_i c_i1 - mean_k t_k c_k1`` and
  ``a_i = V^T Omega_i^T u_1 = beta_i c_i - mean_k beta_k c_k`` (c_i = V^T y_i),
* ``||Omega_i^T u_1||^2 = beta_i^2 ||y_i||^2 - 2 beta_i h_i + mean_k beta_k h_k``
  (h_i = y_i . gbar^T u_1),

so that ``d2 s_1[Omega_i] = sum_{j>=2} [s_1 (a_ij^2 + b_ij^2) + 2 s_j a_ij b_ij] / (s_1^2 - s_j^2)
+ (||Omega_i^T u_1||^2 - ||a_i||^2) / s_1`` (the SVD form of MATH.md §2; W_o has no left null
space). The variance parts need ``sum_pq H_pq sum_i G_i,pq^2`` and ``sum_pq (u_1 v_1^T)_pq^2
sum_i G_i,pq^2``: with ``H = u_1^2 colv^T + colu (v_1^2)^T + 2 (u_1 v_1^T) * (R W)`` (the
resolvent form's Hessian diagonal, R = sum_{j>=2} u_j u_j^T / (s_1^2 - s_j^2)) they are sums over
samples of ``(x_i^2)``-contractions times ``e_ij = sum_q V_qj^2 y_iq^2`` and
``f_ij = sum_q V_q1 V_qj y_iq^2``, less the batch mean's own ``B gbar^2`` part, from the same
contractions of ``N = gbar_o * gbar_o`` stored per step. The batch gradient's own terms (flow,
discretisation) need ``gbar v_1`` and ``gbar^T u_1`` only as above: ``U^T gbar v_1 =
mean_k t_k c_k1``, ``V^T gbar^T u_1 = mean_k beta_k c_k``, ``||gbar^T u_1||^2 = mean_k beta_k
h_k`` (:func:`basis_gradient_terms`). All of it in the recorder's basis (U, S stored with the
step).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from trajlab.sde.layer import noise_scale

__all__ = ["basis_gradient_terms", "basis_noise_terms"]


def _d2(S: Tensor, a: Tensor, b: Tensor, qq: Tensor) -> Tensor:
    """``d2 s_1`` along directions given in the basis: ``a = V^T D^T u_1``, ``b = U^T D v_1``
    (..., k, s) and ``qq = ||D^T u_1||^2`` (..., k); SVD form of MATH.md §2 (no left null
    space in the oriented frame)."""
    s1 = S[..., 0, None, None]
    sj = S[..., None, 1:]
    aj, bj = a[..., 1:], b[..., 1:]
    return (((s1 * (aj * aj + bj * bj) + 2 * sj * aj * bj) / (s1 * s1 - sj * sj)).sum(-1)
            + (qq - (a * a).sum(-1)) / s1[..., 0])


def _moments(tensors: Mapping[str, Tensor], dt: torch.dtype):
    """``(U, S, t, beta, c, h)`` of the statistics in ``dt``."""
    U, S = tensors["svd_u"].to(dt), tensors["svd_s"].to(dt)
    t = tensors["ps_small"].to(dt) @ U                    # U^T x_i      (..., B, s)
    return U, S, t, t[..., 0], tensors["ps_coords"].to(dt), tensors["ps_big_mean_dot"].to(dt)


def basis_gradient_terms(tensors: Mapping[str, Tensor], dtype: torch.dtype = torch.float64
                         ) -> tuple[Tensor, Tensor]:
    """``(u_1^T gbar v_1, d2 s_1[gbar])`` of the batch-mean gradient, from ``rank1_basis``
    statistics (leading dims ``...``): the flow and discretisation terms' inputs.

    Both are invariant under the sign of the singular pair, so they equal the analysis's own
    ``u_1^T g v_1`` and ``d^2 s_1[g]`` for ``g`` the mean of the recorded per-sample gradients.
    """
    _, S, t, beta, c, h = _moments(tensors, dtype)
    b = (t * c[..., :, :1]).mean(-2)                      # U^T gbar v_1
    a = (c * beta[..., None]).mean(-2)                    # V^T gbar^T u_1
    qq = (beta * h).mean(-1)                              # ||gbar^T u_1||^2
    return b[..., 0], _d2(S, a[..., None, :], b[..., None, :], qq[..., None])[..., 0]


def basis_noise_terms(W: Tensor, lr: float | Tensor, tensors: Mapping[str, Tensor],
                      *, population: int | None = None) -> dict[str, Tensor]:
    """The gradient-noise terms of :func:`~trajlab.sde.layer_terms` from ``rank1_basis``
    statistics.

    Parameters
    ----------
    W : Tensor (..., m, n)
        Weight before the step (its shape and dtype; the statistics hold the rest).
    lr : float or Tensor (...)
        Learning rate eta.
    tensors : the variables of :class:`~trajlab.sketches.Rank1Basis` with leading ``...``.
    population : dataset size N for batches drawn without replacement (factor (N - B) / N).

    Returns
    -------
    dict of str to Tensor
        ``drift_noise``, ``drift_noise_var``, ``diffusion2``, ``diffusion2_var`` (...),
        ``noise_proj`` (..., B) and ``coverage_u``, ``coverage_v`` (ones), as the noise part of
        :func:`~trajlab.sde.epilogue.layer_epilogue` takes them. ``noise_proj`` does not depend
        on the sign of the singular pair (u_1 and v_1 flip together).

    Raises
    ------
    ValueError
        If the statistics hold fewer than two samples.
    """
    dt = W.dtype
    U, S, t, beta, c, h = _moments(tensors, dt)
    x = tensors["ps_small"].to(dt)                        # (..., B, s)
    ny = tensors["ps_big_sqnorm"].to(dt)                  # ||y_i||^2
    e = tensors["ps_big_sq_basis"].to(dt)                 # sum_q V_qj^2 y_iq^2
    f = tensors["ps_big_sq_cross"].to(dt)                 # sum_q V_q1 V_qj y_iq^2
    B = x.shape[-2]
    fpc, scale = noise_scale(B, population)
    eta = torch.as_tensor(lr, dtype=dt, device=W.device)
    s1 = S[..., 0]
    u1 = U[..., :, 0]

    b = t * c[..., :, :1]
    b = b - b.mean(-2, keepdim=True)                      # U^T Omega_i v_1
    a = c * beta[..., None]
    a = a - a.mean(-2, keepdim=True)                      # V^T Omega_i^T u_1
    qq = beta * beta * ny - 2 * beta * h + (beta * h).mean(-1, keepdim=True)
    proj = b[..., 0]                                      # u_1^T Omega_i v_1
    d2 = _d2(S, a, b, qq)
    drift_noise = 0.5 * eta * scale * d2.sum(-1)
    diffusion2 = eta * scale * (proj * proj).sum(-1)

    # sum_pq H_pq M_pq and sum_pq (u1 v1^T)^2 M_pq with M = sum_i G_i^2 (per-sample part) ...
    x2 = x * x
    w = 1.0 / (s1[..., None] ** 2 - S[..., 1:] ** 2)      # 1 / (s_1^2 - s_j^2), j >= 2
    Ur = U[..., :, 1:]
    ux = x2 @ (u1 * u1)[..., :, None]                     # sum_p u1_p^2 x_ip^2   (..., B, 1)
    colu = s1[..., None] * ((Ur * Ur) @ w[..., :, None])[..., 0]          # s_1 diag(R)
    cx = x2 @ colu[..., :, None]                          # (..., B, 1)
    sw = (S[..., 1:] ** 2 * w)[..., None, :]
    colvy = (ny - e[..., 0] + (e[..., 1:] * sw).sum(-1)) / s1[..., None]
    cross = x2 @ (u1[..., :, None] * Ur)                  # sum_p U_p1 U_pj x_ip^2 (j >= 2)
    hM = (ux[..., 0] * colvy + cx[..., 0] * e[..., 0]
          + 2 * (cross * f[..., 1:] * (S[..., 1:] * w)[..., None, :]).sum(-1)).sum(-1)
    jM = (ux[..., 0] * e[..., 0]).sum(-1)
    # ... less the batch mean's B gbar^2: the same contractions of N = gbar_o^2, per step
    gn = tensors["grad_sq_norm"].to(dt)                   # sum_q N_pq            (..., s)
    gb = tensors["grad_sq_basis"].to(dt)                  # sum_q N_pq V_qj^2     (..., s, s)
    gc = tensors["grad_sq_cross"].to(dt)                  # sum_q N_pq V_q1 V_qj  (..., s, s)
    u2 = u1 * u1
    colvN = (gn - gb[..., 0] + (gb[..., 1:] * sw).sum(-1)) / s1[..., None]
    hN = ((u2 * colvN).sum(-1) + (colu * gb[..., 0]).sum(-1)
          + 2 * (u1[..., :, None] * Ur * gc[..., 1:] * (S[..., 1:] * w)[..., None, :])
          .sum((-2, -1)))
    jN = (u2 * gb[..., 0]).sum(-1)
    var_scale = fpc / (B * (B - 1))
    one = torch.ones_like(s1)
    return {
        "drift_noise": drift_noise,
        "drift_noise_var": 0.5 * eta * var_scale * (hM - B * hN),
        "diffusion2": diffusion2,
        "diffusion2_var": eta * var_scale * (jM - B * jN),
        "noise_proj": proj,
        "coverage_u": one,
        "coverage_v": one.clone(),
    }
