"""Top singular triplets of (batched) matrices, with gap and accuracy reported.

The matrix is ``W`` (..., m, n) with SVD ``W = sum_j s_j u_j v_j^T``, ``s_1 >= s_2 >= ...``
and ``r = min(m, n)`` (notation of MATH.md §2).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from trajlab.spectral._util import default_tol, fix_phase, orthonormalize

__all__ = ["TopSingular", "opnorm_jacobian", "spectral_gap", "subspace_iteration", "top_singular"]

Method = Literal["auto", "svd", "iterative"]

#: ``min(m, n)`` up to which ``method="auto"`` always uses the dense SVD.
AUTO_SVD_MAX = 256


class TopSingular(NamedTuple):
    """Top-k singular triplets of ``W`` (..., m, n) and how far they can be trusted.

    Attributes
    ----------
    S : Tensor (..., k)
        Singular values ``s_1 >= ... >= s_k``.
    U : Tensor (..., m, k)
        Left singular vectors (columns). Sign convention: the largest-magnitude entry of each
        ``u_j`` is positive (first index on ties); ``v_j`` carries the same sign.
    V : Tensor (..., n, k)
        Right singular vectors (columns).
    gap : Tensor (...)
        Relative gap ``(s_1 - s_2) / s_1``; ``s_2 = 0`` when ``min(m, n) == 1`` (gap 1); 0 for the
        zero matrix. For ``method="iterative"`` ``s_2`` is a Ritz value (a lower bound that
        converges with the iteration), so the gap is an estimate: the iteration also runs until
        the residual of that (k+1)-th Ritz pair is ``<= max(tol, gap_tol / 10)``.
    residual : Tensor (...)
        ``max_j max(||W v_j - s_j u_j||, ||W^T u_j - s_j v_j||) / s_1`` over the k columns.
        Vector errors are about ``residual / gap``, value errors about ``residual**2 / gap``.
    degenerate : Tensor (...) bool
        ``gap < gap_tol``: ``s_1`` is (nearly) repeated, so ``u_1, v_1`` and all derivatives of
        ``s_1`` beyond the first are ill-conditioned (see docs/spectral.md).
    n_iter : int
        Iterations used (0 for the dense SVD).
    """

    S: Tensor
    U: Tensor
    V: Tensor
    gap: Tensor
    residual: Tensor
    degenerate: Tensor
    n_iter: int = 0


def spectral_gap(S: Tensor) -> Tensor:
    """Relative gap ``(s_1 - s_2) / s_1`` of descending singular values ``S`` (..., r) -> (...).

    ``s_2`` is taken as 0 when ``r == 1``; the gap of an all-zero ``S`` is 0.
    """
    s1 = S[..., 0]
    s2 = S[..., 1] if S.shape[-1] > 1 else torch.zeros_like(s1)
    safe = torch.where(s1 > 0, s1, torch.ones_like(s1))
    return torch.where(s1 > 0, (s1 - s2) / safe, torch.zeros_like(s1))


def _residual(matmat: Callable[[Tensor], Tensor], rmatmat: Callable[[Tensor], Tensor],
              S: Tensor, U: Tensor, V: Tensor) -> Tensor:
    r1 = torch.linalg.vector_norm(matmat(V) - U * S[..., None, :], dim=-2)
    r2 = torch.linalg.vector_norm(rmatmat(U) - V * S[..., None, :], dim=-2)
    s1 = S[..., 0]
    res = torch.maximum(r1, r2).amax(-1)
    return torch.where(s1 > 0, res / torch.where(s1 > 0, s1, torch.ones_like(s1)),
                       torch.zeros_like(s1))


def subspace_iteration(
    matmat: Callable[[Tensor], Tensor],
    rmatmat: Callable[[Tensor], Tensor],
    V0: Tensor,
    k: int,
    *,
    tol: float,
    max_iter: int,
    gap_tol: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Block power (subspace) iteration on ``A^T A`` with Rayleigh–Ritz.

    Parameters
    ----------
    matmat, rmatmat : callables
        ``X (..., n, p) -> A X (..., m, p)`` and ``Y (..., m, p) -> A^T Y (..., n, p)``.
    V0 : Tensor (..., n, p)
        Starting block, ``p >= k`` (``p > k`` gives a gap estimate and faster convergence).
    k : int
        Number of columns whose residual must reach ``tol``.
    gap_tol : float, optional
        If given and ``p > k``, column ``k + 1`` (whose Ritz value gives the gap) must also reach
        a residual ``<= gap_tol``, so that the gap is not overestimated by an unconverged
        (too small) Ritz value.

    Returns
    -------
    S (..., p), U (..., m, p), V (..., n, p), residual (...), n_iter
        Ritz values/vectors (descending) and the residual of the first k columns relative to s_1.
    """
    V = orthonormalize(V0)
    it = 0
    while True:
        it += 1
        Y = matmat(V)
        Ub, Sb, Vbh = torch.linalg.svd(Y, full_matrices=False)
        Vr = V @ Vbh.mH
        Z = rmatmat(Ub)
        R = Z - Vr * Sb[..., None, :]
        s1 = Sb[..., :1]
        cols = torch.linalg.vector_norm(R, dim=-2)
        cols = torch.where(s1 > 0, cols / torch.where(s1 > 0, s1, torch.ones_like(s1)),
                           torch.zeros_like(cols))
        res = cols[..., :k].amax(-1)
        done = res <= tol
        if gap_tol is not None and cols.shape[-1] > k:
            done = done & (cols[..., k] <= gap_tol)
        if it >= max_iter or bool(done.all()):
            return Sb, Ub, Vr, res, it
        V = orthonormalize(Z)


def _init_block(init, n: int, p: int, batch: torch.Size, like: Tensor, seed: int) -> Tensor:
    gen = torch.Generator(device=like.device).manual_seed(seed)
    V0 = torch.randn(*batch, n, p, generator=gen, dtype=like.dtype, device=like.device)
    if init is not None:
        Vi = init.V if isinstance(init, TopSingular) else init[1]
        Vi = Vi.to(dtype=like.dtype, device=like.device)
        c = min(Vi.shape[-1], p)
        V0 = torch.cat([Vi[..., :c].expand(*batch, n, c), V0[..., c:]], dim=-1)
    return V0


def top_singular(
    W: Tensor,
    k: int = 1,
    *,
    init: TopSingular | tuple[Tensor, Tensor] | None = None,
    method: Method = "auto",
    tol: float | None = None,
    max_iter: int = 100,
    gap_tol: float = 1e-3,
    seed: int = 0,
    warn: bool = True,
) -> TopSingular:
    """Top-k singular values and vectors of ``W`` (..., m, n), with gap and residual.

    Parameters
    ----------
    W : Tensor (..., m, n)
        Real matrix or batch of matrices (float32 or float64, any device).
    k : int
        Number of triplets, ``1 <= k <= min(m, n)``.
    init : TopSingular or (U, V), optional
        Warm start for ``method="iterative"``: a previous result (e.g. of the previous training
        step). Only ``V`` (..., n, k') is used.
    method : {"auto", "svd", "iterative"}
        ``"svd"``: ``torch.linalg.svd`` (exact up to rounding). ``"iterative"``: block power
        iteration on ``W^T W`` with Rayleigh–Ritz on ``min(r, 2k + 3)`` vectors, stopped when
        ``residual <= tol``. ``"auto"``: ``"svd"`` when ``min(m, n) <= 256`` or no ``init`` is
        given; otherwise ``"iterative"``, falling back to ``"svd"`` for any batch that did not
        converge in ``max_iter`` iterations.
    tol : float, optional
        Residual target for ``"iterative"``; default ``10 * eps * sqrt(max(m, n))`` of the dtype
        (about the rounding floor).
    max_iter : int
        Iteration cap for ``"iterative"``. A non-converged result is returned with its residual
        (and a ``RuntimeWarning``) for ``method="iterative"``.
    gap_tol : float
        ``degenerate = gap < gap_tol``.
    seed : int
        Seed of the local generator that fills the starting block's random columns.
    warn : bool
        Whether a non-converged ``"iterative"`` result warns (callers that record the residual
        pass False; ``warnings.catch_warnings`` is not thread-safe).

    Returns
    -------
    TopSingular
        ``S`` (..., k), ``U`` (..., m, k), ``V`` (..., n, k), ``gap``, ``residual``,
        ``degenerate`` (...), ``n_iter``.

    Examples
    --------
    >>> W = torch.diag(torch.tensor([3.0, 1.0]))
    >>> top_singular(W).S
    tensor([3.])
    """
    m, n = W.shape[-2:]
    r = min(m, n)
    if not 1 <= k <= r:
        raise ValueError(f"top_singular: need 1 <= k <= min(m, n) = {r}, got k={k}")
    if method not in ("auto", "svd", "iterative"):
        raise ValueError(f"top_singular: unknown method {method!r}")
    fallback = method == "auto"
    if method == "auto":
        method = "svd" if (r <= AUTO_SVD_MAX or init is None) else "iterative"
    return _top_singular(W, k, init, method, tol, max_iter, gap_tol, seed, fallback, warn)


def _top_singular(W: Tensor, k: int, init, method: str, tol: float | None, max_iter: int,
                  gap_tol: float, seed: int, fallback: bool, warn: bool = True) -> TopSingular:
    m, n = W.shape[-2:]
    r = min(m, n)

    def matmat(X: Tensor) -> Tensor:
        return W @ X

    def rmatmat(Y: Tensor) -> Tensor:
        return (Y.mT @ W).mT  # far faster than W.mT @ Y for column-major Y from LAPACK

    if method == "svd":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        gap = spectral_gap(S)
        U, V = fix_phase(U[..., :k], Vh[..., :k, :].mT)
        S = S[..., :k]
        res = _residual(matmat, rmatmat, S, U, V)
        return TopSingular(S, U, V, gap, res, gap < gap_tol, 0)

    if tol is None:
        tol = default_tol(W.dtype, max(m, n))
    p = min(r, 2 * k + 3)
    V0 = _init_block(init, n, p, W.shape[:-2], W, seed)
    S, U, V, res, it = subspace_iteration(matmat, rmatmat, V0, k, tol=tol, max_iter=max_iter,
                                          gap_tol=max(tol, 0.1 * gap_tol))
    gap = spectral_gap(S)
    U, V = fix_phase(U[..., :k], V[..., :k])
    S = S[..., :k]
    bad = ~(res <= tol)
    if bool(bad.any()):
        if fallback:
            exact = _top_singular(W, k, None, "svd", None, 0, gap_tol, seed, False)
            sel = bad
            S = torch.where(sel[..., None], exact.S, S)
            U = torch.where(sel[..., None, None], exact.U, U)
            V = torch.where(sel[..., None, None], exact.V, V)
            gap = torch.where(sel, exact.gap, gap)
            res = torch.where(sel, exact.residual, res)
        elif warn:
            warnings.warn(
                f"top_singular: iterative method did not reach tol={tol:.3g} in {max_iter} "
                f"iterations (max residual {float(res.max()):.3g}); see result.residual",
                RuntimeWarning, stacklevel=3)
    return TopSingular(S, U, V, gap, res, gap < gap_tol, it)


def opnorm_jacobian(W: Tensor, *, top: TopSingular | None = None) -> Tensor:
    """Gradient of the operator norm, ``d s_1 / d W = u_1 v_1^T``.

    Parameters
    ----------
    W : Tensor (..., m, n)
    top : TopSingular, optional
        Precomputed ``top_singular(W)``; check its ``degenerate`` flag: the Jacobian is only
        defined when ``s_1 > s_2``.

    Returns
    -------
    Tensor (..., m, n)
    """
    if top is None:
        top = top_singular(W)
    return top.U[..., :, :1] @ top.V[..., :, :1].mT
