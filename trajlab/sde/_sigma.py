"""Derivatives of the top singular value from a thin SVD (MATH.md §2), private to trajlab.sde.

Kept here so that the SDE terms depend only on ``torch.linalg.svd``; the same formulas are
offered publicly (with an iterative resolvent variant) by :mod:`trajlab.spectral`.

Notation: ``W`` (..., m, n) with thin SVD ``W = U diag(S) V^T``, ``r = min(m, n)``. A direction
``D`` enters only through ``p = D v_1`` (m) and ``q = D^T u_1`` (n) (sufficiency).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ThinSVD", "thin_svd", "quadform", "hessian_diag", "relative_gap"]


class ThinSVD(NamedTuple):
    """``U`` (..., m, r), ``S`` (..., r) descending, ``V`` (..., n, r)."""

    U: Tensor
    S: Tensor
    V: Tensor


def thin_svd(W: Tensor) -> ThinSVD:
    """Thin SVD of ``W`` (..., m, n) with ``V`` as columns (not ``V^T``)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return ThinSVD(U, S, Vh.mT)


def relative_gap(S: Tensor) -> Tensor:
    """``(s_1 - s_2) / s_1`` of descending ``S`` (..., r) -> (...); ``s_2 = 0`` when r = 1, 0 for
    the zero matrix."""
    s1 = S[..., 0]
    s2 = S[..., 1] if S.shape[-1] > 1 else torch.zeros_like(s1)
    safe = torch.where(s1 > 0, s1, torch.ones_like(s1))
    return torch.where(s1 > 0, (s1 - s2) / safe, torch.zeros_like(s1))


def quadform(svd: ThinSVD, p: Tensor, q: Tensor) -> Tensor:
    """``d^2 s_1[D]`` from ``p = D v_1`` (..., B, m) and ``q = D^T u_1`` (..., B, n) -> (..., B).

    ``sum_{j>=2} [s_1 (a_j^2 + b_j^2) + 2 s_j a_j b_j] / (s_1^2 - s_j^2)`` with
    ``a_j = v_j . q``, ``b_j = u_j . p``, plus ``(||q||^2 - sum_j a_j^2) / s_1`` when n > r and
    ``(||p||^2 - sum_j b_j^2) / s_1`` when m > r (the null-space parts). The columns ``u_1, v_1``
    of ``svd`` must be the ones ``p, q`` were taken with (same sign).
    """
    U, S, V = svd
    m, n, r = U.shape[-2], V.shape[-2], S.shape[-1]
    b = p @ U                                   # (..., B, r)
    a = q @ V
    s1 = S[..., :1]
    s = S[..., 1:]
    den = (s1 - s) * (s1 + s)
    c1 = (s1 / den)[..., None, :]
    c2 = (2 * s / den)[..., None, :]
    aj, bj = a[..., 1:], b[..., 1:]
    val = (c1 * (aj * aj + bj * bj) + c2 * aj * bj).sum(-1)
    inv1 = 1.0 / S[..., :1]                     # (..., 1), broadcasts over B
    if n > r:
        val = val + ((q * q).sum(-1) - (a * a).sum(-1)) * inv1
    if m > r:
        val = val + ((p * p).sum(-1) - (b * b).sum(-1)) * inv1
    return val


def hessian_diag(svd: ThinSVD) -> Tensor:
    """Diagonal of the Hessian of ``s_1``, ``H[p, q] = d^2 s_1[E_pq]`` -> (..., m, n).

    With ``D = E_pq``: ``a_j = u_1[p] V[q, j]`` and ``b_j = v_1[q] U[p, j]``, so
    ``H = u_1^2 (V_2^2 c)^T + (U_2^2 c) v_1^2 + u_1 v_1^T * (U_2 diag(d) V_2^T)`` with
    ``c_j = s_1 / (s_1^2 - s_j^2)``, ``d_j = 2 s_j / (s_1^2 - s_j^2)`` (j >= 2), plus the null-space
    parts ``u_1[p]^2 (1 - ||V[q, :]||^2) / s_1`` and ``v_1[q]^2 (1 - ||U[p, :]||^2) / s_1``.
    """
    U, S, V = svd
    m, n, r = U.shape[-2], V.shape[-2], S.shape[-1]
    u1, v1 = U[..., :, :1], V[..., :, :1]       # (..., m, 1), (..., n, 1)
    s1 = S[..., :1]
    s = S[..., 1:]
    den = (s1 - s) * (s1 + s)
    c = (s1 / den)[..., :, None]                # (..., r-1, 1)
    d = 2 * s / den
    U2, V2 = U[..., 1:], V[..., 1:]
    colv = (V2 * V2) @ c                        # (..., n, 1)
    colu = (U2 * U2) @ c                        # (..., m, 1)
    inv1 = 1.0 / S[..., :1, None]
    if n > r:
        colv = colv + (1 - (V * V).sum(-1, keepdim=True)) * inv1
    if m > r:
        colu = colu + (1 - (U * U).sum(-1, keepdim=True)) * inv1
    cross = (U2 * d[..., None, :]) @ V2.mT
    return (u1 * u1) * colv.mT + colu * (v1 * v1).mT + (u1 @ v1.mT) * cross
