"""Every layer term of many steps at once, without a full SVD (MATH.md §2–§5, resolvent form).

:func:`~trajlab.sde.sketch_layer_terms` takes one thin SVD of ``W`` per step; for a 512 x 784
layer that SVD alone is ~70% of the cost. The terms need far less: ``s_1, u_1, v_1``, ``s_2``
(for the gap) and the deflated resolvent on the smaller side. With ``W`` (m, n), m <= n (else
everything is transposed: ``s_1`` and its derivatives are invariant under ``W -> W^T``),
``G = W W^T`` and ``R = (s_1^2 I - G)^+ = sum_{j>=2} u_j u_j^T / (s_1^2 - s_j^2)`` (m x m):

* second derivative along ``D`` from ``p = D v_1``, ``q = D^T u_1`` (the SVD form of
  :func:`trajlab.spectral.hessian_quadform_proj` with ``s_j v_j = W^T u_j`` substituted)::

      d2 s_1[D] = (z'^T R z' + ||q||^2 - (q.v_1)^2) / s_1,   z = s_1 p + W q,  z' = z - (z.u_1) u_1

* Hessian diagonal (:func:`trajlab.spectral.hessian_diag`), only through ``sum(H * Sigma)``::

      colu = s_1 diag(R),  colv = ((1 - v_1^2) + diag(W^T R W)) / s_1,  cross = 2 R W

``(s_1^2, u_1, s_2^2)`` and ``R`` come from the eigendecomposition of ``G`` for small m, and
for larger m from LAPACK's MRRR solver for the top two eigenpairs only (``scipy``, CPU) and the
Cholesky factor of ``A = s_1^2 I - G + s_1^2 u_1 u_1^T`` (``R = P A^{-1} P``,
``P = I - u_1 u_1^T``, applied as a rank-2 update). Cost per step: two ``m^2 n`` products
(``G``, ``R W``), ``O(m^3)`` for the spectrum, ``O(B m n)`` for B per-sample directions, against
a full SVD (``O(m^2 n)`` with a large constant) plus the same in the SVD form.

Accuracy. Like the SVD form, errors grow as ``eps / gap`` (relative gap ``(s_1 - s_2)/s_1``);
the squared singular values of ``G`` add nothing worse than that for the gap-dependent terms.
Steps whose gap is below ``min_gap`` (or twice ``gap_tol``, so the ``degenerate`` flag cannot
differ), whose ``s_2 / s_1 < 1e-4`` (``s_2`` is then not resolved by ``G``), or whose
factorisation fails are computed with the SVD form instead, one step per call, so degenerate
steps give exactly what :func:`~trajlab.sde.sketch_layer_terms` gives for that step. Against
the SVD form in float64 every term agrees within ~1e-13 of its scale on the benchmark runs
(benchmarks/analysis.py); the tests hold it to 1e-10 on recorded runs and 1e-12 on random
layers (tests/analysis/test_analysis_vectorised.py).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import Tensor

from trajlab.sde.basis import basis_gradient_terms, basis_noise_terms
from trajlab.sde.epilogue import layer_epilogue
from trajlab.sde.layer import noise_free_terms, noise_scale, sketch_layer_terms
from trajlab.sde.sketch import (
    noise_diag,
    per_sample_directions,
    sketch_batch_size,
    sketch_coverage,
    sketch_projected,
)
from trajlab.sketches import SketchKind, SketchName

__all__ = ["MIN_GAP", "resolvent_layer_terms"]

#: Default smallest relative spectral gap computed in the resolvent form (SVD form below it).
MIN_GAP = 1e-3
#: Smaller side from which the top pair comes from MRRR (scipy) instead of a full ``eigh``.
MRRR_MIN = 96
#: Steps with ``s_2 / s_1`` below this use the SVD form (``s_2^2`` is lost in ``G``'s rounding).
_MIN_S2_RATIO = 1e-4


# ----------------------------------------------------------------------------- spectrum
def _top2_mrrr(G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Top two eigenvalues and the top eigenvector of symmetric ``G`` (T, m, m), m >= 2.

    scipy's LAPACK runs with as many threads as torch's intra-op pool (``threadpoolctl``), so
    the analysis's one-thread-per-node discipline covers it too.
    """
    T, m = G.shape[0], G.shape[-1]
    lam = torch.empty(T, 2, dtype=G.dtype)
    u = torch.empty(T, m, dtype=G.dtype)
    Gn = G.numpy()
    with _blas_controller().limit(limits=torch.get_num_threads(), user_api="blas"):
        _mrrr_loop(Gn, lam, u)
    return lam[:, 0], lam[:, 1], u


@functools.cache
def _blas_controller():
    """The BLAS libraries loaded once scipy.linalg is (found once: a scan costs ~2 ms)."""
    import scipy.linalg  # noqa: F401 - load its LAPACK before the scan
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _mrrr_loop(Gn, lam: Tensor, u: Tensor) -> None:
    import numpy as np
    import scipy.linalg

    m = Gn.shape[-1]
    for t in range(Gn.shape[0]):
        if not np.isfinite(Gn[t]).all():
            lam[t] = float("nan")
            u[t] = float("nan")
            continue
        w, V = scipy.linalg.eigh(Gn[t], subset_by_index=[m - 2, m - 1], driver="evr",
                                 check_finite=False)
        lam[t] = torch.from_numpy(w[::-1].copy())
        u[t] = torch.from_numpy(V[:, 1])


def _spectrum(W: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(s1, s2, u1, v1, R, ok)`` of ``W`` (T, m, n), m <= n; ``ok`` is False where the
    resolvent form does not apply (the caller uses the SVD form there)."""
    m = W.shape[-2]
    dt = W.dtype
    G = W @ W.mT
    eye = torch.eye(m, dtype=dt, device=W.device)
    if m >= max(MRRR_MIN, 2) and W.device.type == "cpu":
        lam1, lam2, u1 = _top2_mrrr(G)
        l1 = lam1[:, None, None]
        u = u1[:, :, None]
        A = torch.baddbmm(l1 * eye - G, l1 * u, u.mT)  # eigenvalues l1 - l_j (j >= 2), l1
        L, info = torch.linalg.cholesky_ex(torch.nan_to_num(A))
        ok = info == 0
        if not bool(ok.all()):
            L = torch.where(ok[:, None, None], L, eye)
        Ainv = torch.cholesky_inverse(L)
        # R = P A^{-1} P, P = I - u1 u1^T, as a rank-2 update (exact deflation):
        # R = A^{-1} - u y^T - y u^T with y = A^{-1} u - (u^T A^{-1} u / 2) u
        w = Ainv @ u
        y = w - 0.5 * (u * w).sum(-2, keepdim=True) * u
        R = torch.baddbmm(Ainv, torch.cat([u, y], -1), torch.cat([y, u], -1).mT, alpha=-1)
    else:
        finite = torch.isfinite(G).all(-1).all(-1)
        lam, U = torch.linalg.eigh(torch.where(finite[:, None, None], G, eye))
        lam, U = lam.flip(-1), U.flip(-1)
        lam1, u1 = lam[:, 0], U[:, :, 0]
        lam2 = lam[:, 1] if m > 1 else torch.zeros_like(lam1)
        den = lam1[:, None] - lam[:, 1:]
        ok = finite & (den > 0).all(-1)
        Ur = U[:, :, 1:]
        R = (Ur / torch.where(den > 0, den, torch.ones_like(den))[:, None, :]) @ Ur.mT
    s1 = lam1.clamp_min(0).sqrt()
    s2 = lam2.clamp_min(0).sqrt()
    ok = ok & (s1 > 0) & torch.isfinite(s1)
    if m > 1:
        ok = ok & (s2 >= _MIN_S2_RATIO * s1)
    safe = torch.where(ok, s1, torch.ones_like(s1))
    v1 = (W.mT @ u1[:, :, None])[:, :, 0] / safe[:, None]
    return s1, s2, u1, v1, R, ok


def _second(W: Tensor, s1: Tensor, u1: Tensor, v1: Tensor, R: Tensor, P: Tensor, Q: Tensor
            ) -> Tensor:
    """``d2 s_1`` along directions given by ``P = D v_1`` (T, k, m), ``Q = D^T u_1`` (T, k, n)."""
    u, v = u1[:, :, None], v1[:, :, None]
    z = torch.baddbmm(s1[:, None, None] * P, Q, W.mT)          # s_1 p + W q
    z = torch.baddbmm(z, z @ u, u.mT, alpha=-1)                 # deflated against u_1
    zRz = ((z @ R) * z).sum(-1)
    qv = (Q @ v)[:, :, 0]
    qq = torch.linalg.vector_norm(Q, dim=-1) ** 2 - qv * qv     # ||q - (q.v_1) v_1||^2
    return (zRz + qq) / s1[:, None]


def _project(D: Tensor, u1: Tensor, v1: Tensor) -> tuple[Tensor, Tensor]:
    """``(D v_1, D^T u_1)`` of one direction per step, as (T, 1, m), (T, 1, n)."""
    return (D @ v1[:, :, None]).mT, (D.mT @ u1[:, :, None]).mT


# ----------------------------------------------------------------------------- terms
def resolvent_layer_terms(
    W: Tensor,
    g: Tensor | None,
    update: Tensor,
    lr: Tensor,
    *,
    sketch: SketchName | SketchKind | None = None,
    tensors: Mapping[str, Tensor] | None = None,
    grad_full: Tensor | None = None,
    population: int | None = None,
    gap_tol: float = 1e-3,
    min_gap: float = MIN_GAP,
    grad_stats: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The terms of :func:`~trajlab.sde.sketch_layer_terms` (with ``sketch``) or of
    :func:`~trajlab.sde.noise_free_terms` (without), for T steps at once.

    Parameters
    ----------
    W, g, update : Tensor (T, m, n)
        Weights, batch gradients and applied updates of T steps (one leading dimension).
    lr : Tensor (T,)
        Learning rates.
    sketch, tensors : the recorded per-sample sketch (every step with the same batch size B),
        as for :func:`~trajlab.sde.sketch_layer_terms`; None for the noise-free terms.
    grad_full, population, gap_tol : as for :func:`~trajlab.sde.layer_terms`.
    min_gap : steps with a relative spectral gap below ``max(min_gap, 2 * gap_tol)`` are
        computed with the SVD form.
    grad_stats : with ``g`` None: the ``rank1_basis`` statistics of the T steps, which give
        the batch gradient's terms (:func:`trajlab.sde.basis.basis_gradient_terms`), also on
        steps computed without noise terms.

    Returns
    -------
    dict of str to Tensor
        The keys of :func:`~trajlab.sde.sketch_layer_terms` (less ``alignment``) or of
        :func:`~trajlab.sde.noise_free_terms`; shapes (T,), ``noise_proj`` (T, B).
    """
    if W.dim() != 3:
        raise ValueError(f"W must be (T, m, n), got shape {tuple(W.shape)}")
    dt = W.dtype
    T, m, n = W.shape
    eta = torch.as_tensor(lr, dtype=dt, device=W.device).expand(T)
    flip = m > n  # work on W^T: m <= n in the "oriented" frame (suffix o)

    def orient(X: Tensor) -> Tensor:
        return X.mT if flip else X

    Wo = orient(W)
    s1, s2, uo, vo, R, ok = _spectrum(Wo)
    gap = torch.where(s1 > 0, (s1 - s2) / torch.where(s1 > 0, s1, torch.ones_like(s1)),
                      torch.zeros_like(s1))
    ok = ok & (gap >= max(min_gap, 2 * gap_tol))
    if g is None:  # the batch gradient's terms from rank1_basis statistics (sde/basis.py)
        first, second, used_full = _stat_gradient(Wo, orient, s1, uo, vo, R, grad_stats,
                                                  grad_full)
        Pg = Qg = None
        plain = -eta * basis_gradient_terms(grad_stats, dt)[0]
    else:
        g = g.to(dt)
        Pg, Qg = _project(orient(g), uo, vo)               # g v_1, g^T u_1 (oriented)
        first, second, used_full = _dense_gradient(Wo, orient, s1, uo, vo, R, Pg, Qg,
                                                   grad_full)
        plain = -eta * (Pg[:, 0] * uo).sum(-1)
    Pu, Qu = _project(orient(update.to(dt)), uo, vo)
    p1 = (Pu[:, 0] * uo).sum(-1)
    p2 = _second(Wo, s1, uo, vo, R, Pu, Qu)[:, 0]
    noise = None
    if sketch is not None:
        noise = _noise_terms(Wo, flip, s1, uo, vo, R, g, Pg, Qg, eta, sketch, tensors,
                             population)
    out = layer_epilogue(K=s1, gap=gap, gap_tol=gap_tol, used_full=used_full, flow=first,
                         disc_raw=0.5 * eta * second, p1=p1, p2=p2, plain=plain, eta=eta,
                         noise=noise)
    if not bool(ok.all()):
        _svd_rows(out, ~ok, W, g, update, eta, sketch, tensors, grad_full, population, gap_tol,
                  grad_stats)
    return out


def _stat_gradient(Wo, orient, s1, uo, vo, R, stats, grad_full
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``(d s_1[grad], d^2 s_1[grad], used_full)`` with the batch gradient's from statistics
    and the full-data gradient's (where finite) from the dense matrices."""
    if stats is None:
        raise ValueError("resolvent_layer_terms: pass g or grad_stats")
    first, second = basis_gradient_terms(stats, Wo.dtype)
    if grad_full is None:
        return first, second, torch.zeros(first.shape, dtype=torch.bool, device=Wo.device)
    grad_full = grad_full.to(Wo.dtype)
    used_full = torch.isfinite(grad_full).all(-1).all(-1)
    Pf, Qf = _project(orient(torch.nan_to_num(grad_full)), uo, vo)
    f1 = (Pf[:, 0] * uo).sum(-1)
    f2 = _second(Wo, s1, uo, vo, R, Pf, Qf)[:, 0]
    return torch.where(used_full, f1, first), torch.where(used_full, f2, second), used_full


def _dense_gradient(Wo, orient, s1, uo, vo, R, Pg, Qg, grad_full
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """``(d s_1[grad], d^2 s_1[grad], used_full)`` from the dense batch gradient's projections
    ``Pg``, ``Qg`` and the full-data gradient where it is finite."""
    T = Pg.shape[0]
    dt = Wo.dtype
    if grad_full is None:
        used_full = torch.zeros(T, dtype=torch.bool, device=Wo.device)
        Pd, Qd = Pg, Qg
    else:
        grad_full = grad_full.to(dt)
        used_full = torch.isfinite(grad_full).all(-1).all(-1)
        Pf, Qf = _project(orient(grad_full), uo, vo)
        Pd = torch.where(used_full[:, None, None], Pf, Pg)
        Qd = torch.where(used_full[:, None, None], Qf, Qg)
    first = (Pd[:, 0] * uo).sum(-1)
    second = _second(Wo, s1, uo, vo, R, Pd, Qd)[:, 0]
    return first, second, used_full


def _noise_terms(Wo, flip, s1, uo, vo, R, g, Pg, Qg, eta, sketch, tensors, population
                 ) -> dict[str, Tensor]:
    """Gradient-noise terms (MATH.md §3) in the oriented frame, for
    :func:`~trajlab.sde.epilogue.layer_epilogue`; ``Pg``, ``Qg``: the batch gradient's
    projections."""
    dt = Wo.dtype
    if sketch_projected(sketch):  # statistics in the recorder's singular basis (sde/basis.py)
        return basis_noise_terms(Wo, eta, tensors, population=population)
    B = sketch_batch_size(sketch, tensors)
    fpc, scale = noise_scale(B, population)
    u1, v1 = (vo, uo) if flip else (uo, vo)
    Gv, Gtu = per_sample_directions(sketch, tensors, u1, v1)
    Ps, Qs = (Gtu, Gv) if flip else (Gv, Gtu)              # per-sample G_i v_1, G_i^T u_1
    Po = Ps.to(dt) - Pg                                    # Omega_i v_1 (oriented) (T, B, m)
    Qo = Qs.to(dt) - Qg
    c = (Po @ uo[:, :, None])[:, :, 0]                     # u_1^T Omega_i v_1 (T, B)
    drift_noise = 0.5 * eta * scale * _second(Wo, s1, uo, vo, R, Po, Qo).sum(-1)
    diffusion2 = eta * scale * (c * c).sum(-1)
    # sum(H * diag(Sigma)): H = u1^2 colv^T + colu v1^2^T + 2 (u1 v1^T) * (R W)
    sd = noise_diag(sketch, tensors, g, batch_size=B).to(dt)
    sdo = sd.mT if flip else sd
    RW = R @ Wo
    u2, v2 = uo * uo, vo * vo
    colu = s1[:, None] * torch.diagonal(R, dim1=-2, dim2=-1)
    colv = ((1 - v2) + (Wo * RW).sum(-2)) / s1[:, None]
    sdc = sdo @ torch.stack([colv, v2], -1)                # (T, m, 2)
    hsd = ((u2 * sdc[:, :, 0]).sum(-1) + (colu * sdc[:, :, 1]).sum(-1)
           + 2 * (uo * ((RW * sdo) @ vo[:, :, None])[:, :, 0]).sum(-1))
    cov_u, cov_v = sketch_coverage(sketch, tensors, u1, v1)
    drift_noise_var = 0.5 * eta * fpc * hsd
    diffusion2_var = eta * fpc * (u2 * sdc[:, :, 1]).sum(-1)
    return {
        "drift_noise": drift_noise,
        "drift_noise_var": drift_noise_var,
        "diffusion2": diffusion2,
        "diffusion2_var": diffusion2_var,
        "noise_proj": c,
        "coverage_u": cov_u.to(dt),
        "coverage_v": cov_v.to(dt),
    }


def _svd_rows(out: dict[str, Tensor], rows: Tensor, W, g, update, eta, sketch, tensors,
              grad_full, population, gap_tol, grad_stats=None) -> None:
    """Recompute ``rows`` (bool (T,)) with the SVD form, one step per call, in place.

    One call per step, as :func:`~trajlab.sde.sketch_layer_terms` is called for a single
    step: at a (nearly) repeated ``s_1`` the singular pair, and every term that depends on it,
    is whatever that SVD call returns, so the same call is made. These steps are rare.
    """
    for i in torch.nonzero(rows).flatten().tolist():
        full = None
        if grad_full is not None and bool(torch.isfinite(grad_full[i]).all()):
            full = grad_full[i]
        gi = None if g is None else g[i]
        if sketch is None:
            terms = None if grad_stats is None else basis_gradient_terms(
                {k: v[i] for k, v in grad_stats.items()}, W.dtype)
            ref = noise_free_terms(W[i], gi, update[i], float(eta[i]), grad_full=full,
                                   gap_tol=gap_tol, grad_terms=terms)
        else:
            ref = sketch_layer_terms(W[i], gi, update[i], float(eta[i]), sketch,
                                     {k: v[i] for k, v in tensors.items()}, grad_full=full,
                                     population=population, gap_tol=gap_tol)
        for k, v in out.items():
            v[i] = ref[k].to(v.dtype)
