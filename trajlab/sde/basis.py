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
``f_ij = sum_q V_q1 V_qj y_iq^2``, plus the batch gradient's own ``B gbar^2`` part, computed
densely from the stored ``grad``. All of it in the recorder's basis (U, S stored with the step).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from trajlab.sde.layer import noise_scale

__all__ = ["basis_noise_terms"]


def basis_noise_terms(W: Tensor, g: Tensor, lr: float | Tensor, tensors: Mapping[str, Tensor],
                      *, population: int | None = None) -> dict[str, Tensor]:
    """The gradient-noise terms of :func:`~trajlab.sde.layer_terms` from ``rank1_basis``
    statistics.

    Parameters
    ----------
    W : Tensor (..., m, n)
        Weight before the step (the one the recorder's basis was taken of).
    g : Tensor (..., m, n)
        Batch gradient (stored ``grad``): only its elementwise square enters, through the
        variance parts (``diag(Sigma) = (sum_i G_i^2 - B g^2) / (B (B - 1))``).
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
    m, n = W.shape[-2:]
    flip = m > n
    Wo = W.mT if flip else W
    go = (g.mT if flip else g).to(dt)
    U, S = tensors["svd_u"].to(dt), tensors["svd_s"].to(dt)
    x = tensors["ps_small"].to(dt)                        # (..., B, s)
    c = tensors["ps_coords"].to(dt)                       # V^T y_i
    ny = tensors["ps_big_sqnorm"].to(dt)                  # ||y_i||^2
    e = tensors["ps_big_sq_basis"].to(dt)                 # sum_q V_qj^2 y_iq^2
    f = tensors["ps_big_sq_cross"].to(dt)                 # sum_q V_q1 V_qj y_iq^2
    h = tensors["ps_big_mean_dot"].to(dt)                 # y_i . gbar^T u_1
    B = x.shape[-2]
    fpc, scale = noise_scale(B, population)
    eta = torch.as_tensor(lr, dtype=dt, device=W.device)
    s1 = S[..., 0]
    u1 = U[..., :, 0]

    t = x @ U                                             # U^T x_i      (..., B, s)
    beta = t[..., 0]
    b = t * c[..., :, :1]
    b = b - b.mean(-2, keepdim=True)                      # U^T Omega_i v_1
    a = c * beta[..., None]
    a = a - a.mean(-2, keepdim=True)                      # V^T Omega_i^T u_1
    qq = beta * beta * ny - 2 * beta * h + (beta * h).mean(-1, keepdim=True)
    proj = b[..., 0]                                      # u_1^T Omega_i v_1
    sj = S[..., None, 1:]
    den = (s1[..., None, None] ** 2 - sj * sj)
    aj, bj = a[..., 1:], b[..., 1:]
    d2 = (((s1[..., None, None] * (aj * aj + bj * bj) + 2 * sj * aj * bj) / den).sum(-1)
          + (qq - (a * a).sum(-1)) / s1[..., None])
    drift_noise = 0.5 * eta * scale * d2.sum(-1)
    diffusion2 = eta * scale * (proj * proj).sum(-1)

    # sum_pq H_pq M_pq and sum_pq (u1 v1^T)^2 M_pq with M = sum_i G_i^2 (per-sample part) ...
    x2 = x * x
    w = 1.0 / den[..., 0, :]                              # 1 / (s_1^2 - s_j^2), j >= 2
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
    # ... less the batch gradient's B g^2, densely (the resolvent form's Hessian diagonal)
    N = go * go
    v1 = (Wo.mT @ u1[..., :, None])[..., 0] / s1[..., None]
    R = (Ur * w[..., None, :]) @ Ur.mT
    RW = R @ Wo
    v2, u2 = v1 * v1, u1 * u1
    colv = ((1 - v2) + (Wo * RW).sum(-2)) / s1[..., None]
    Nc = N @ torch.stack([colv, v2], -1)                  # (..., s, 2)
    hN = ((u2 * Nc[..., 0]).sum(-1) + (colu * Nc[..., 1]).sum(-1)
          + 2 * (u1 * ((RW * N) @ v1[..., :, None])[..., 0]).sum(-1))
    jN = (u2 * Nc[..., 1]).sum(-1)
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
