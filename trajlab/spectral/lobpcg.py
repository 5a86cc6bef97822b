"""Top singular triplet of a linear operator by block LOBPCG on ``A^T A``.

The operator ``A`` (m x n) is known only through batched products on blocks of row vectors:
``forward(X (p, n)) -> (p, m)`` and its exact adjoint ``adjoint(Y (p, m)) -> (p, n)``. One
iteration applies ``A^T A`` once to a block of ``p`` vectors (one batched call of each), then does
Rayleigh–Ritz on the ``3p``-dimensional space ``[X, W, P]`` (current Ritz block, residuals,
previous search directions) — Knyazev's locally optimal block preconditioned conjugate gradient,
without preconditioner, with the orthonormal-basis update of Duersch, Shao, Yang & Gu (2018) for
``P`` (``P`` and ``A^T A P`` are orthonormal combinations of the basis, so nothing is amplified).
Only the top pair has to converge fully; the other rows are helpers (they hold the near-degenerate
partners of the top pair) and are soft-locked once they reach ``second_tol``.

Convergence is measured on the top pair only, as a residual relative to sigma_1:
``res = ||A^T u - s v|| / s`` with ``s = ||A v||`` and ``u = A v / s`` (so ``A v = s u`` exactly),
which equals ``||A^T A v - s^2 v|| / s^2``. The returned residual is always recomputed from fresh
products, never taken from the recurrences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["OperatorTop", "lobpcg_top"]

RowOperator = Callable[[Tensor], Tensor]


class OperatorTop(NamedTuple):
    """Result of :func:`lobpcg_top`.

    Attributes
    ----------
    sigma : Tensor (p,)
        Ritz singular values, descending. ``sigma[0] = ||A V[0]||``; the others are lower
        bounds of ``s_2, s_3, ...`` (Cauchy interlacing), accurate once their residuals are small.
    u : Tensor (m,)
        ``A V[0] / sigma[0]``.
    V : Tensor (p, n)
        Orthonormal Ritz vectors (rows), ``V[0]`` the top right singular vector; pass back as
        ``V0`` to warm start the next, nearby operator.
    residual : Tensor ()
        ``||A^T u - sigma[0] V[0]|| / sigma[0]`` from fresh products (0 for a zero operator).
    residuals : Tensor (p,)
        Residual of every Ritz pair from the last iteration's recurrences (relative to sigma_1).
    n_iter : int
        Iterations (each one block product with ``A^T A``).
    converged : bool
        ``residual <= tol`` (and the second pair's condition when asked for).
    """

    sigma: Tensor
    u: Tensor
    V: Tensor
    residual: Tensor
    residuals: Tensor
    n_iter: int
    converged: bool


def _orthonormal_rows(W: Tensor, B: Tensor | None, drop: float = 1e-10) -> Tensor:
    """Rows of ``W`` made orthonormal and orthogonal to the orthonormal rows of ``B``.

    Rows are normalised first (residual rows differ in size by many orders), projected out of
    ``B`` twice (classical Gram–Schmidt, repeated) and orthonormalised by QR; rows that are
    (numerically) in the span of ``B`` or of the rows before them are dropped.
    """
    nrm = torch.linalg.vector_norm(W, dim=1, keepdim=True)
    if not bool((nrm > 0).all()):
        W, nrm = W[nrm[:, 0] > 0], nrm[nrm[:, 0] > 0]
    W = W / nrm
    if B is not None and B.shape[0]:
        for _ in range(2):
            W = torch.addmm(W, W @ B.mT, B, alpha=-1)
    if W.shape[0] == 1:  # the common case once the helper rows are soft-locked
        nrm = torch.linalg.vector_norm(W)
        return W / nrm if bool(nrm > drop) else W[:0]
    Q, R = torch.linalg.qr(W.mT)
    keep = R.diagonal().abs() > drop
    return Q.mT if bool(keep.all()) else Q[:, keep].mT


def _top_eig(G: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """Top ``p`` eigenpairs of the symmetric ``G`` (descending)."""
    evals, evecs = torch.linalg.eigh((G + G.mT) * 0.5)
    return evals.flip(0)[:p], evecs.flip(1)[:, :p]


def _fresh(forward: RowOperator, adjoint: RowOperator, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, u, residual)`` of the unit vector ``v`` from fresh products."""
    av = forward(v[None])[0]
    s = torch.linalg.vector_norm(av)
    if not bool(s > 0):
        return s, torch.zeros_like(av), s.new_zeros(())
    u = av / s
    r = torch.linalg.vector_norm(adjoint(u[None])[0] - s * v) / s
    return s, u, r


def lobpcg_top(
    forward: RowOperator,
    adjoint: RowOperator,
    V0: Tensor,
    *,
    tol: float,
    max_iter: int,
    second_tol: float | None = None,
) -> OperatorTop:
    """Top singular value and vectors of ``A`` by block LOBPCG on ``A^T A``.

    Parameters
    ----------
    forward, adjoint : callables
        ``X (p, n) -> A X`` row-wise ``(p, m)`` and ``Y (p, m) -> A^T Y`` row-wise ``(p, n)``.
    V0 : Tensor (p, n)
        Starting block (any rank; dependent rows are dropped). A previous result's ``V`` is a
        warm start. ``p >= 2`` copes with the near-degenerate top pairs that real convolution
        operators have (``e^{+i w x}`` and ``e^{-i w x}`` envelopes split only by the boundary).
    tol : float
        Target of the fresh relative residual of the top pair.
    max_iter : int
        Iteration cap. The result says whether it converged; this function does not warn.
    second_tol : float, optional
        If given, the second Ritz pair (whose value gives the gap) must also reach a residual
        ``<= second_tol`` (relative to sigma_1), so that the gap is not overstated by an
        unconverged Ritz value. Rows other than the top one stop adding search directions once
        below ``max(tol, second_tol)`` (soft locking): they stay in the Rayleigh-Ritz basis, and
        an iteration then costs one product instead of ``p``.

    Returns
    -------
    OperatorTop
    """
    X = _orthonormal_rows(V0, None)
    p, n = X.shape
    if p == 0:
        raise ValueError("lobpcg_top: the starting block is zero")
    # The basis lives in one (3p, n) buffer, rows [X; P; W], so that [X; P] is one contiguous
    # block for the projections and the Rayleigh-Ritz Gram matrix is one product.
    Q, Q2 = X.new_empty(3 * p, n), X.new_empty(3 * p, n)  # double-buffered
    MQ, MQ2 = X.new_empty(3 * p, n), X.new_empty(3 * p, n)
    Q[:p] = X
    MQ[:p] = adjoint(forward(X))
    theta, C = _top_eig(Q[:p] @ MQ[:p].mT, p)
    Q[:p], MQ[:p] = C.mT @ Q[:p], C.mT @ MQ[:p]
    k = p  # rows of [X; P] in use
    Gk = torch.diag(theta)  # [X; P] (A^T A) [X; P]^T, carried by the small recurrences
    it = 0
    while True:
        X, MX = Q[:p], MQ[:p]
        R = torch.addcmul(MX, theta[:, None], X, value=-1)
        scale = theta[0] if bool(theta[0] > 0) else theta.new_ones(())
        res_rows = torch.linalg.vector_norm(R, dim=1) / scale
        done = bool(res_rows[0] <= tol)
        if done and second_tol is not None and p > 1:
            done = bool(res_rows[1] <= max(tol, second_tol))
        if done or it >= max_iter:
            s, u, res = _fresh(forward, adjoint, X[0])
            ok = bool(res <= tol) and done
            if ok or it >= max_iter:
                sig = torch.cat([s[None], theta[1:].clamp_min(0).sqrt()])
                return OperatorTop(sig, u, X.clone(), res, res_rows, it, ok)
            # the recurrences drifted: restart them from fresh products (counts as an iteration)
            it += 1
            MQ[:p] = adjoint(forward(X))
            theta, C = _top_eig(X @ MQ[:p].mT, p)
            Q[:p], MQ[:p] = C.mT @ X, C.mT @ MQ[:p]
            k, Gk = p, torch.diag(theta)
            continue
        it += 1
        # soft locking: rows below the second pair's target add no search direction
        active = res_rows > max(tol, second_tol if second_tol is not None else tol)
        active[0] = True
        W = _orthonormal_rows(R if bool(active.all()) else R[active], Q[:k])
        w = W.shape[0]
        if w == 0:  # [X, P] spans an invariant subspace: nothing left to add
            it = max_iter
            continue
        q = k + w
        Q[k:q] = W
        MQ[k:q] = adjoint(forward(Q[k:q]))  # the contiguous copy
        # Rayleigh-Ritz Gram matrix: only the new rows need products with the basis
        G = Q.new_empty(q, q)
        G[:k, :k] = Gk
        G[k:] = Q[k:q] @ MQ[:q].mT
        G[:k, k:] = G[k:, :k].mT
        theta, C = _top_eig(G, p)
        # next search directions: the part of the new block outside the old X, orthonormal in
        # the coefficient space (Duersch et al. 2018), so P and A^T A P need no normalisation
        E = torch.zeros_like(C)
        E[p:] = C[p:]
        Zf, Rz = torch.linalg.qr(torch.cat([C, E], dim=1))
        keep = Rz.diagonal()[p:].abs() > 1e-14 * torch.linalg.matrix_norm(E).clamp_min(1e-300)
        Z = Zf[:, p:][:, keep]
        CZ = torch.cat([C, Z], dim=1)  # (q, p + z)
        k = CZ.shape[1]
        # C^T G Z = 0 (eigenvectors, Z orthogonal to C): the new Gram is block diagonal
        Gk = torch.block_diag(torch.diag(theta), Z.mT @ ((G + G.mT) * 0.5) @ Z)
        torch.matmul(CZ.mT, Q[:q], out=Q2[:k])
        torch.matmul(CZ.mT, MQ[:q], out=MQ2[:k])
        Q, Q2, MQ, MQ2 = Q2, Q, MQ2, MQ
