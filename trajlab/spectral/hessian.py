"""Second derivatives of the top singular value ``s_1(W)`` (MATH.md §2).

Directions ``D`` enter only through the projections ``p = D v_1`` (m) and ``q = D^T u_1`` (n)
("sufficiency"), so every function reduces to a kernel on ``(p, q)``:

* SVD form: ``sum_j [s_1(a_j^2 + b_j^2) + 2 s_j a_j b_j] / (s_1^2 - s_j^2)`` plus the two
  null-space terms, with ``a = V^T q``, ``b = U^T p``.
* Resolvent form: ``w^T (s_1 I - S)^+ w`` with the dilation ``S = [[0, W], [W^T, 0]]`` and
  ``w = [p; q]`` deflated against ``x_1 = [u_1; v_1]/sqrt 2``. Eliminating the first block gives
  ``(||p'||^2 + r^T (s_1^2 I - W^T W)^+ r) / s_1`` with ``r = s_1 q' + W^T p'``, solved by batched
  conjugate gradients on the smaller side, deflated against ``v_1``.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

from trajlab.spectral._util import real_dtype
from trajlab.spectral.singular import AUTO_SVD_MAX, TopSingular, _top_singular, top_singular

__all__ = ["hessian_diag", "hessian_quadform", "hessian_quadform_proj"]

Method = Literal["auto", "svd", "resolvent"]
Svd = tuple[Tensor, Tensor, Tensor]


def _choose(method: str, W: Tensor) -> str:
    if method not in ("auto", "svd", "resolvent"):
        raise ValueError(f"unknown method {method!r}; expected 'auto', 'svd' or 'resolvent'")
    if method == "auto":
        return "svd" if min(W.shape[-2:]) <= AUTO_SVD_MAX else "resolvent"
    return method


def quadform_from_svd(S: Tensor, U: Tensor, V: Tensor, p: Tensor, q: Tensor,
                      m: int, n: int) -> Tensor:
    """SVD-form kernel. ``S`` (..., r), ``U`` (..., m, r), ``V`` (..., n, r) thin SVD (real or
    complex), ``p`` (..., B, m), ``q`` (..., B, n) -> (..., B).

    For complex matrices (``s_1`` of ``M + eps E``) this is the Hermitian-dilation form with
    ``a_j = u_1^H E v_j``, ``b_j = u_j^H E v_1`` and the extra term ``Im(u_1^H E v_1)^2 / s_1``.
    """
    r = S.shape[-1]
    beta = p @ U.conj()                    # (..., B, r): u_j^H p = b_j
    alpha = q @ V.conj()                   # (..., B, r): v_j^H q = conj(a_j)
    s1 = S[..., :1]                        # (..., 1)
    s = S[..., 1:]
    den = (s1 - s) * (s1 + s)
    c1 = (s1 / den)[..., None, :]
    c2 = (2 * s / den)[..., None, :]
    a, b = alpha[..., 1:], beta[..., 1:]
    val = (c1 * (a.abs() ** 2 + b.abs() ** 2)).sum(-1) + (c2 * (a.conj() * b).real).sum(-1)
    inv1 = 1.0 / S[..., None, 0]
    if n > r:
        val = val + (torch.linalg.vector_norm(q, dim=-1) ** 2
                     - (alpha.abs() ** 2).sum(-1)) * inv1
    if m > r:
        val = val + (torch.linalg.vector_norm(p, dim=-1) ** 2
                     - (beta.abs() ** 2).sum(-1)) * inv1
    if beta.is_complex():
        val = val + beta[..., 0].imag ** 2 * inv1
    return val


def _quadform_resolvent(W: Tensor, s1: Tensor, s2: Tensor, u1: Tensor, v1: Tensor,
                        p: Tensor, q: Tensor, tol: float, max_iter: int) -> Tensor:
    """Resolvent-form kernel (real ``W`` (..., m, n)); returns (..., B)."""
    m, n = W.shape[-2:]
    if m < n:  # work on the smaller side: Gram matrix of size min(m, n)
        W, u1, v1, p, q = W.mT, v1, u1, q, p
    c = 0.5 * ((p * u1[..., None, :]).sum(-1) + (q * v1[..., None, :]).sum(-1))  # (..., B)
    pp = p - c[..., None] * u1[..., None, :]
    qq = q - c[..., None] * v1[..., None, :]
    s1sq = s1 * s1
    s1c = s1sq[..., None, None]
    v1r = v1[..., None, :]                              # (..., 1, n)

    def proj(X: Tensor) -> Tensor:  # remove the v_1 component of every row of X (..., B, n)
        return X - (X * v1r).sum(-1, keepdim=True) * v1r

    def op(X: Tensor) -> Tensor:  # rows of (s_1^2 I - W^T W) X^T, deflated
        return proj(s1c * X - (X @ W.mT) @ W)

    rhs = proj(s1[..., None, None] * qq + pp @ W)       # (..., B, n)
    x = torch.zeros_like(rhs)
    res = rhs.clone()
    d = res.clone()
    rr = (res * res).sum(-1, keepdim=True)             # (..., B, 1)
    rr0 = rr.clone()
    gap2 = (s1sq - s2 * s2).clamp_min(torch.finfo(s1.dtype).tiny)
    kappa = (s1sq / gap2)[..., None, None]
    thresh = rr0 * (tol / kappa)                       # ||res||^2 <= tol/kappa ||r0||^2
    it = 0
    converged = bool((rr <= thresh).all())
    while not converged and it < max_iter:
        it += 1
        Ad = op(d)
        dAd = (d * Ad).sum(-1, keepdim=True)
        active = rr > 0
        alpha = torch.where(active, rr / torch.where(active, dAd, torch.ones_like(dAd)),
                            torch.zeros_like(rr))
        x = x + alpha * d
        res = res - alpha * Ad
        rr_new = (res * res).sum(-1, keepdim=True)
        beta = torch.where(active, rr_new / torch.where(active, rr, torch.ones_like(rr)),
                           torch.zeros_like(rr))
        d = res + beta * d
        rr = rr_new
        converged = bool((rr <= thresh).all())
    if not converged:
        worst = float(((rr / rr0.clamp_min(torch.finfo(rr.dtype).tiny)) * kappa).max())
        warnings.warn(f"hessian_quadform: CG stopped after {max_iter} iterations with relative "
                      f"error bound {worst:.3g} > tol={tol:.3g}", RuntimeWarning, stacklevel=3)
    quad = (rhs * x).sum(-1)                            # (..., B)
    return ((pp * pp).sum(-1) + quad) / s1[..., None]


def _default_cg_tol(dtype: torch.dtype) -> float:
    return torch.finfo(real_dtype(dtype)).eps ** (2.0 / 3.0)


def _top_for_resolvent(W: Tensor, top: TopSingular | None) -> TopSingular:
    if top is not None:
        return top
    if min(W.shape[-2:]) <= AUTO_SVD_MAX:
        return top_singular(W, method="svd")
    # cold start: iterative with dense fallback for whatever did not converge
    return _top_singular(W, 1, None, "iterative", None, 300, 1e-3, 0, True)


def _s2(top: TopSingular, W: Tensor) -> Tensor:
    # The gap is always available (Ritz value for iterative results).
    return top.S[..., 0] * (1 - top.gap)


def hessian_quadform_proj(
    W: Tensor,
    Dv: Tensor,
    Dtu: Tensor,
    *,
    method: Method = "auto",
    svd: Svd | None = None,
    top: TopSingular | None = None,
    tol: float | None = None,
    max_iter: int = 1000,
) -> Tensor:
    """``d^2 s_1[D]`` from the projections ``Dv = D v_1`` and ``Dtu = D^T u_1`` only.

    Parameters
    ----------
    W : Tensor (..., m, n)
    Dv : Tensor (..., B, m)
        ``D_b v_1`` for B directions.
    Dtu : Tensor (..., B, n)
        ``D_b^T u_1``.
    method : {"auto", "svd", "resolvent"}
        ``"auto"``: ``"svd"`` if ``min(m, n) <= 256`` or ``svd`` is given, else ``"resolvent"``.
    svd : (U, S, Vh), optional
        Thin SVD of ``W`` (``torch.linalg.svd(W, full_matrices=False)``) to reuse across calls.
        Its ``u_1, v_1`` must be the ones the projections were taken with (same signs).
    top : TopSingular, optional
        Precomputed top triplet for ``"resolvent"`` (it needs ``s_1, u_1, v_1`` and the gap).
    tol : float, optional
        Relative accuracy target of the resolvent (CG) solve; default ``eps**(2/3)``
        (3.7e-11 in float64, 2.4e-5 in float32).
    max_iter : int
        CG iteration cap (a ``RuntimeWarning`` is issued if reached).

    Returns
    -------
    Tensor (..., B)
        Second directional derivatives. Infinite or huge when ``s_1`` is (nearly) repeated:
        check ``top_singular(W).degenerate`` / ``gap``.
    """
    m, n = W.shape[-2:]
    if method == "auto" and svd is not None:
        method = "svd"
    method = _choose(method, W)
    if method == "svd":
        if svd is None:
            svd = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = svd
        return quadform_from_svd(S, U, Vh.mH, Dv, Dtu, m, n)
    top = _top_for_resolvent(W, top)
    if tol is None:
        tol = _default_cg_tol(W.dtype)
    return _quadform_resolvent(W, top.S[..., 0], _s2(top, W), top.U[..., 0], top.V[..., 0],
                               Dv, Dtu, tol, max_iter)


def hessian_quadform(
    W: Tensor,
    D: Tensor,
    *,
    method: Method = "auto",
    tol: float | None = None,
    top: TopSingular | None = None,
    max_iter: int = 1000,
) -> Tensor:
    """Second directional derivative ``d^2 s_1[D] = d^2/de^2 s_1(W + e D)|_{e=0}``.

    Parameters
    ----------
    W : Tensor (..., m, n)
    D : Tensor (..., B, m, n)
        B directions per matrix.
    method : {"auto", "svd", "resolvent"}
        ``"svd"``: closed form from the thin SVD (MATH.md §2). ``"resolvent"``: deflated CG on
        ``s_1^2 I - W^T W`` (or ``W W^T``, the smaller), cost ``O(iters * B * m * n)`` with
        ``iters ~ sqrt(1 / gap)``. ``"auto"``: ``"svd"`` when ``min(m, n) <= 256``.
    tol : float, optional
        Relative accuracy of the resolvent solve (default ``eps**(2/3)``).
    top : TopSingular, optional
        Precomputed ``top_singular(W)`` for the resolvent form; without it the top triplet is
        computed (iteratively for large matrices).
    max_iter : int
        CG iteration cap.

    Returns
    -------
    Tensor (..., B)
        Non-negative (``s_1`` is convex). Ill-defined when ``s_1 = s_2``: pair the result with
        ``top_singular(W).gap`` / ``.degenerate``.

    Examples
    --------
    >>> W = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    >>> D = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    >>> hessian_quadform(W, D)   # s_1 / (s_1^2 - s_2^2) = 2/3
    tensor([0.6667], dtype=torch.float64)
    """
    m, n = W.shape[-2:]
    method = _choose(method, W)
    if method == "svd":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        u1, v1 = U[..., 0], Vh[..., 0, :]
        p = torch.einsum("...bmn,...n->...bm", D, v1)
        q = torch.einsum("...bmn,...m->...bn", D, u1)
        return quadform_from_svd(S, U, Vh.mH, p, q, m, n)
    top = _top_for_resolvent(W, top)
    u1, v1 = top.U[..., 0], top.V[..., 0]
    p = torch.einsum("...bmn,...n->...bm", D, v1)
    q = torch.einsum("...bmn,...m->...bn", D, u1)
    if tol is None:
        tol = _default_cg_tol(W.dtype)
    return _quadform_resolvent(W, top.S[..., 0], _s2(top, W), u1, v1, p, q, tol, max_iter)


def hessian_diag(W: Tensor, *, svd: Svd | None = None) -> Tensor:
    """Diagonal of the Hessian of ``s_1``: ``H[p, q] = d^2 s_1[E_pq]`` (MATH.md §2).

    With ``D = E_pq``: ``a_j = u_1[p] V[q, j]``, ``b_j = v_1[q] U[p, j]``, so the whole diagonal
    is three matrix products,
    ``u_1[p]^2 (V^2 c)[q] + v_1[q]^2 (U^2 c)[p] + u_1[p] v_1[q] (U diag(d) V^T)[p, q]``
    with ``c_j = s_1/(s_1^2 - s_j^2)``, ``d_j = 2 s_j/(s_1^2 - s_j^2)`` (j >= 2) and the null-space
    parts from the unit row norms of the full orthogonal factors.

    Parameters
    ----------
    W : Tensor (..., m, n)
    svd : (U, S, Vh), optional
        Thin SVD of ``W`` to reuse.

    Returns
    -------
    Tensor (..., m, n)
    """
    m, n = W.shape[-2:]
    r = min(m, n)
    if svd is None:
        svd = torch.linalg.svd(W, full_matrices=False)
    U, S, Vh = svd
    V = Vh.mT
    u1, v1 = U[..., 0], V[..., 0]
    s1 = S[..., :1]
    s = S[..., 1:]
    den = (s1 - s) * (s1 + s)
    c = s1 / den                                          # (..., r-1)
    dd = 2 * s / den
    Ur, Vr = U[..., 1:], V[..., 1:]
    colv = (Vr * Vr) @ c[..., :, None]                    # (..., n, 1)
    colu = (Ur * Ur) @ c[..., :, None]                    # (..., m, 1)
    inv1 = 1.0 / S[..., 0, None, None]
    if n > r:
        colv = colv + (1 - (V * V).sum(-1, keepdim=True)) * inv1
    if m > r:
        colu = colu + (1 - (U * U).sum(-1, keepdim=True)) * inv1
    cross = (Ur * dd[..., None, :]) @ Vr.mT               # (..., m, n)
    u1c, v1r = u1[..., :, None], v1[..., None, :]
    return u1c * u1c * colv.mT + colu * v1r * v1r + u1c * v1r * cross


