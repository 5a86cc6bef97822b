"""One layer's Lipschitz dynamics: Itô terms of ``K = s_1(W)`` at recorded steps (MATH.md §3–§5).

Every function takes arrays with optional leading dimensions ``...`` (e.g. steps) and returns a
dict of arrays of shape ``(...)`` (per-sample outputs ``(..., B)``). Derivatives of ``s_1`` come
from :mod:`trajlab.spectral` (SVD form, one thin SVD of ``W`` per call, reused for every term).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from trajlab.sde.epilogue import flow_gradient, layer_epilogue
from trajlab.sde.sketch import (
    noise_diag,
    per_sample_directions,
    sketch_batch_size,
    sketch_coverage,
    sketch_projected,
)
from trajlab.sketches import SketchKind, SketchName
from trajlab.spectral import hessian_diag, hessian_quadform_proj, spectral_gap

Svd = tuple[Tensor, Tensor, Tensor]

__all__ = [
    "TWO_LEVEL_RADIUS",
    "layer_terms",
    "noise_free_terms",
    "noise_scale",
    "pathwise_increment",
    "second_order_outside",
    "sketch_layer_terms",
]

#: ``|d^2 s_1[dW]| / 2`` over the absolute gap ``s_1 - s_2`` at the two-level model's radius of
#: convergence (:func:`second_order_outside`).
TWO_LEVEL_RADIUS = 0.25

def noise_scale(batch_size: int, population: int | None = None) -> tuple[float, float]:
    """``(fpc, fpc / (B (B - 1)))``: the factors of the one-batch covariance estimate (MATH §1).

    ``fpc = (N - B) / N`` for a batch drawn without replacement from ``population`` N samples
    (MATH.md §1: the batch's 1/(B-1) sample covariance is unbiased for the population covariance
    normalised by N - 1, and Cov(batch mean) = (1 - B/N) S^2 / B), 1 when ``population`` is
    None (independent draws).

    Raises
    ------
    ValueError
        If ``batch_size < 2`` or ``population < batch_size``.
    """
    B = int(batch_size)
    if B < 2:
        raise ValueError(f"noise terms need batch_size >= 2 (got {B}): the covariance of the "
                         "batch gradient cannot be estimated from one sample")
    fpc = 1.0
    if population is not None:
        N = int(population)
        if N < B:
            raise ValueError(f"population={N} is smaller than batch_size={B}")
        fpc = (N - B) / N
    return fpc, fpc / (B * (B - 1))


def _svd(W: Tensor, svd: Svd | None) -> Svd:
    if svd is None:
        return torch.linalg.svd(W, full_matrices=False)
    return svd


def _align(svd: Svd, u1: Tensor, v1: Tensor) -> tuple[Svd, Tensor]:
    """Flip the SVD's first singular pair to the sign of the caller's ``(u1, v1)``."""
    U, S, Vh = svd
    cu = (U[..., :, 0] * u1).sum(-1)
    cv = (Vh[..., 0, :] * v1).sum(-1)
    sign = torch.where(cu + cv < 0, -torch.ones_like(cu), torch.ones_like(cu))
    flip = torch.cat([sign[..., None], torch.ones_like(S[..., 1:])], dim=-1)
    alignment = torch.minimum(cu.abs(), cv.abs())
    return (U * flip[..., None, :], S, Vh * flip[..., :, None]), alignment


def _directional(W: Tensor, svd: Svd, D: Tensor) -> tuple[Tensor, Tensor]:
    """``(d s_1[D], d^2 s_1[D])`` for one direction ``D`` (..., m, n) per matrix."""
    u, v = svd[0][..., :, 0], svd[2][..., 0, :]
    p = (D @ v[..., :, None])[..., 0]             # D v_1      (..., m)
    q = (D.mT @ u[..., :, None])[..., 0]          # D^T u_1    (..., n)
    second = hessian_quadform_proj(W, p[..., None, :], q[..., None, :], svd=svd)[..., 0]
    return (u * p).sum(-1), second


def pathwise_increment(W: Tensor, update: Tensor, *, svd: Svd | None = None) -> Tensor:
    """Second-order change of ``s_1`` along the applied update (MATH.md §5).

    ``d s_1[dW] + 1/2 d^2 s_1[dW]``: a per-step increment (not a rate).

    Parameters
    ----------
    W : Tensor (..., m, n)
        Weight before the step.
    update : Tensor (..., m, n)
        ``W(next) - W``.
    svd : (U, S, Vh), optional
        Thin SVD of ``W`` (``torch.linalg.svd(W, full_matrices=False)``) to reuse.

    Returns
    -------
    Tensor (...)
    """
    d1, d2 = _directional(W, _svd(W, svd), update.to(W.dtype))
    return d1 + 0.5 * d2


def second_order_outside(
    pathwise_increment: Tensor,
    pathwise_first_order: Tensor,
    K: Tensor,
    spectral_gap: Tensor,
    *,
    radius: float = TWO_LEVEL_RADIUS,
) -> Tensor:
    """Steps whose second-order step of ``s_1`` lies outside the perturbation series' validity.

    The second-order increment ``d2 = d^2 s_1[dW] / 2`` (``pathwise_increment -
    pathwise_first_order``) grows like ``c^2 / (s_1 - s_2)`` for a coupling ``c`` of the update
    between the top two singular pairs. In the two-level model (``W = diag(s_1, s_2)``,
    ``dW = [[0, c], [c, 0]]``, exact change ``sqrt(delta^2 / 4 + c^2) - delta / 2`` with
    ``delta = s_1 - s_2``) ``d2 = c^2 / delta`` and the series in ``c`` converges only for
    ``|c| < delta / 2``, i.e. ``|d2| < delta / 4``. Beyond it the step crosses (or comes close
    to) a crossing of ``s_1`` and ``s_2`` and the Taylor terms are not an approximation of the
    step's change at all: e.g. a large SGD step at a small but non-degenerate gap (the
    ``degenerate`` flag only marks ``spectral_gap < gap_tol``). The kernels are exact there
    (they equal finite differences of ``s_1``); it is the expansion that does not apply.

    Parameters
    ----------
    pathwise_increment, pathwise_first_order, K, spectral_gap : Tensor (...)
        The layer terms of the same names (:func:`layer_terms`; analysis variables).
    radius : float
        Threshold on ``|d2| / (s_1 - s_2)`` (default: the two-level radius, 1/4).

    Returns
    -------
    Tensor of bool (...)
        True where ``|d2| > radius (s_1 - s_2)``; False where any input is NaN.

    Examples
    --------
    >>> W = torch.diag(torch.tensor([1.0, 0.9], dtype=torch.float64))
    >>> dW = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    >>> [bool(second_order_outside(pathwise_increment(W, c * dW), torch.zeros(()),
    ...                            torch.ones(()), torch.tensor(0.1))) for c in (0.04, 0.06)]
    [False, True]
    """
    second = (pathwise_increment - pathwise_first_order).abs()
    return second > radius * spectral_gap * K


def layer_terms(
    W: Tensor,
    g: Tensor,
    update: Tensor,
    lr: float | Tensor,
    batch_size: int,
    Gv: Tensor,
    Gtu: Tensor,
    sigma_diag: Tensor,
    *,
    u1: Tensor,
    v1: Tensor,
    grad_full: Tensor | None = None,
    population: int | None = None,
    gap_tol: float = 1e-3,
    svd: Svd | None = None,
) -> dict[str, Tensor]:
    """Drift, diffusion and pathwise terms of ``K = s_1(W)`` for one layer (MATH.md §3–§5).

    Parameters
    ----------
    W : Tensor (..., m, n)
        Weight matrix before the step.
    g : Tensor (..., m, n)
        Batch-mean gradient ``(1/B) sum_i G_i``.
    update : Tensor (..., m, n)
        Update actually applied, ``W(next) - W`` (NaN allowed: only the pathwise terms use it).
    lr : float or Tensor (...)
        Learning rate eta (the SDE time step).
    batch_size : int
        B, the number of per-sample directions (must equal ``Gv.shape[-2]``).
    Gv : Tensor (..., B, m)
        ``G_i v_1`` (from :func:`trajlab.sde.per_sample_directions`).
    Gtu : Tensor (..., B, n)
        ``G_i^T u_1``.
    sigma_diag : Tensor (..., m, n)
        ``diag(Sigma)`` without finite-population correction (:func:`trajlab.sde.noise_diag`).
    u1, v1 : Tensor (..., m), (..., n)
        The top singular pair ``Gv``/``Gtu`` were taken with. Only their joint sign matters
        here: the SVD computed inside is flipped to match it, so any sign convention works.
    grad_full : Tensor (..., m, n), optional
        Full-data gradient for the flow and discretisation terms **(MATH §3 choice)**. Steps
        where it is not finite (e.g. NaN where no probe ran) fall back to ``g``.
    population : int, optional
        Dataset size N for batches drawn without replacement: noise terms are multiplied by
        ``(N - B) / N``.
    gap_tol : float
        ``degenerate = spectral_gap < gap_tol``.
    svd : (U, S, Vh), optional
        Thin SVD of ``W`` (``torch.linalg.svd(W, full_matrices=False)``) to reuse.

    Returns
    -------
    dict of str to Tensor, shapes (...) unless stated
        K : ``s_1``.
        spectral_gap : ``(s_1 - s_2) / s_1``.
        degenerate : bool, ``spectral_gap < gap_tol``; second-order terms are unreliable there
            (they grow like 1 / gap), inf/NaN when ``s_1 = s_2`` exactly.
        alignment : ``min(|u_1^T u1|, |v_1^T v1|)`` of the SVD's pair against the given one;
            below 1 the directions were taken with vectors that are not W's top pair.
        flow_full_gradient : bool, whether ``grad_full`` was used for the flow term.
        drift_flow : ``-u_1^T grad v_1`` (grad = ``grad_full`` or ``g``).
        drift_noise : ``eta / (2 B (B - 1)) sum_i d^2 s_1[Omega_i]`` (times fpc).
        drift_noise_var, drift_noise_cov : ``(eta/2) sum H_pq Sigma_pq`` and the rest.
        drift : ``drift_flow + drift_noise``.
        diffusion2 : ``s^2 = eta / (B (B - 1)) sum_i (u_1^T Omega_i v_1)^2`` (times fpc).
        diffusion2_var, diffusion2_cov : ``eta sum (u_1 v_1^T)^2 Sigma_pq`` and the rest.
        drift_discretization : ``eta / 2 d^2 s_1[grad]``, a rate (per step: times eta, §4a).
        pathwise_increment : ``d s_1[dW] + 1/2 d^2 s_1[dW]`` per step (§5).
        pathwise_first_order : ``d s_1[dW]``.
        drift_optimizer : ``(d s_1[dW] + eta u_1^T g v_1) / eta``, a rate: the first-order drift
            the optimizer adds to plain SGD (0 for SGD, ``-lambda K`` for L2 weight decay
            lambda, more for momentum or Adam); not part of the paper's SGD SDE.
        noise_proj : (..., B), ``c_i = u_1^T Omega_i v_1`` (for the network's full sigma_Z^2).

    Raises
    ------
    ValueError
        ``batch_size < 2``, or shapes that disagree with ``batch_size``.
    """
    fpc, scale = noise_scale(batch_size, population)
    if Gv.shape[-2] != batch_size or Gtu.shape[-2] != batch_size:
        raise ValueError(f"Gv {tuple(Gv.shape)} / Gtu {tuple(Gtu.shape)} do not hold "
                         f"batch_size={batch_size} samples on dim -2")
    dt = W.dtype
    svd, alignment = _align(_svd(W, svd), u1.to(dt), v1.to(dt))
    U, S, Vh = svd
    u, v = U[..., :, 0], Vh[..., 0, :]
    eta = torch.as_tensor(lr, dtype=dt, device=W.device)

    g = g.to(dt)
    grad, used_full = flow_gradient(g, grad_full)
    first, second = _directional(W, svd, grad)

    gv = (g @ v[..., :, None])[..., 0]
    gtu = (g.mT @ u[..., :, None])[..., 0]
    Ov = Gv.to(dt) - gv[..., None, :]                     # Omega_i v_1     (..., B, m)
    Otu = Gtu.to(dt) - gtu[..., None, :]                  # Omega_i^T u_1   (..., B, n)
    c = (Ov * u[..., None, :]).sum(-1)                     # u_1^T Omega_i v_1 (..., B)
    drift_noise = 0.5 * eta * scale * hessian_quadform_proj(W, Ov, Otu, svd=svd).sum(-1)
    diffusion2 = eta * scale * (c * c).sum(-1)

    sd = sigma_diag.to(dt) * fpc
    H = hessian_diag(W, svd=svd)
    drift_noise_var = 0.5 * eta * (H * sd).sum((-2, -1))
    J2 = (u * u)[..., :, None] * (v * v)[..., None, :]
    diffusion2_var = eta * (J2 * sd).sum((-2, -1))

    p1, p2 = _directional(W, svd, update.to(dt))
    plain = -eta * (u[..., None, :] @ g @ v[..., :, None])[..., 0, 0]
    return layer_epilogue(
        K=S[..., 0], gap=spectral_gap(S), gap_tol=gap_tol, used_full=used_full, flow=first,
        disc_raw=0.5 * eta * second, p1=p1, p2=p2, plain=plain, eta=eta,
        noise={"drift_noise": drift_noise, "drift_noise_var": drift_noise_var,
               "diffusion2": diffusion2, "diffusion2_var": diffusion2_var, "noise_proj": c},
        extra={"alignment": alignment})


def noise_free_terms(
    W: Tensor,
    g: Tensor | None,
    update: Tensor,
    lr: float | Tensor,
    *,
    grad_full: Tensor | None = None,
    gap_tol: float = 1e-3,
    svd: Svd | None = None,
    noise: Mapping[str, Tensor] | None = None,
    grad_terms: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The terms of :func:`layer_terms` that need no gradient-noise estimate.

    For steps with one sample or runs recorded without per-sample information: ``K``,
    ``spectral_gap``, ``degenerate``, ``flow_full_gradient``, ``drift_flow``,
    ``pathwise_increment``, ``pathwise_first_order``, ``drift_optimizer`` and, where the
    full-data gradient is given, ``drift_discretization`` (elsewhere NaN: the batch gradient's
    bias cannot be removed without the noise estimate). Shapes as in :func:`layer_terms`.
    ``svd``: the thin SVD of ``W`` to reuse; ``noise``: noise terms computed elsewhere
    (:func:`trajlab.sde.basis.basis_noise_terms`), completed as :func:`layer_terms` does;
    ``g`` None with ``grad_terms`` = ``(u_1^T g v_1, d^2 s_1[g])`` of the batch gradient
    (:func:`trajlab.sde.basis.basis_gradient_terms`) where only those are known.
    """
    dt = W.dtype
    svd = _svd(W, svd)
    U, S, Vh = svd
    u, v = U[..., :, 0], Vh[..., 0, :]
    eta = torch.as_tensor(lr, dtype=dt, device=W.device)
    p1, p2 = _directional(W, svd, update.to(dt))
    if g is None:
        if grad_terms is None:
            raise ValueError("noise_free_terms: pass g or grad_terms")
        gv, gsecond = (x.to(dt) for x in grad_terms)
        used_full = torch.zeros(gv.shape, dtype=torch.bool, device=W.device)
        first, second = gv, gsecond
        if grad_full is not None:
            used_full = torch.isfinite(grad_full).all(-1).all(-1)
            f1, f2 = _directional(W, svd, torch.nan_to_num(grad_full.to(dt)))
            first, second = torch.where(used_full, f1, gv), torch.where(used_full, f2, gsecond)
        plain = -eta * gv
    else:
        g = g.to(dt)
        grad, used_full = flow_gradient(g, grad_full)
        first, second = _directional(W, svd, grad)
        plain = -eta * (u[..., None, :] @ g @ v[..., :, None])[..., 0, 0]
    return layer_epilogue(K=S[..., 0], gap=spectral_gap(S), gap_tol=gap_tol,
                          used_full=used_full, flow=first, disc_raw=0.5 * eta * second, p1=p1,
                          p2=p2, plain=plain, eta=eta, noise=noise)


def sketch_layer_terms(
    W: Tensor,
    g: Tensor | None,
    update: Tensor,
    lr: float | Tensor,
    sketch: SketchName | SketchKind,
    tensors: Mapping[str, Tensor],
    *,
    grad_full: Tensor | None = None,
    population: int | None = None,
    gap_tol: float = 1e-3,
) -> dict[str, Tensor]:
    """:func:`layer_terms` straight from a recorded sketch (one SVD of ``W``, reused).

    Parameters are those of :func:`layer_terms`; ``sketch`` and ``tensors`` as in
    :func:`trajlab.sde.per_sample_directions`. B is read from the sketch. For a ``projected``
    sketch (``rank1_basis``) ``g`` may be None: the batch gradient's terms then come from the
    statistics (:func:`trajlab.sde.basis.basis_gradient_terms`).

    Returns
    -------
    dict of str to Tensor
        The keys of :func:`layer_terms` plus ``coverage_u`` and ``coverage_v``
        (:func:`trajlab.sde.sketch_coverage`; 1 = the sketch holds ``u_1``, ``v_1`` exactly).

    Examples
    --------
    >>> W = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    >>> delta = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    >>> a = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    >>> g = delta.mT @ a / 2                       # batch mean of outer(delta_i, a_i): zero
    >>> out = sketch_layer_terms(W, g, -0.1 * g, 0.1, "rank1",
    ...                          {"ps_grad_out": delta, "ps_input": a})
    >>> float(out["K"]), float(out["diffusion2"])
    (2.0, 0.0)
    >>> round(float(out["drift_noise"]), 6)     # 0.1/(2*2) * 2 * s1/(s1^2 - s2^2)
    0.033333
    """
    svd = torch.linalg.svd(W, full_matrices=False)
    if sketch_projected(sketch):  # statistics in the recorder's singular basis (sde/basis.py)
        from trajlab.sde.basis import basis_gradient_terms, basis_noise_terms

        noise = basis_noise_terms(W, lr, tensors, population=population)
        return noise_free_terms(W, g, update, lr, grad_full=grad_full, gap_tol=gap_tol,
                                svd=svd, noise=noise,
                                grad_terms=basis_gradient_terms(tensors, W.dtype))
    B = sketch_batch_size(sketch, tensors)
    u1, v1 = svd[0][..., :, 0], svd[2][..., 0, :]
    Gv, Gtu = per_sample_directions(sketch, tensors, u1, v1)
    sd = noise_diag(sketch, tensors, g, batch_size=B)
    out = layer_terms(W, g, update, lr, B, Gv, Gtu, sd, u1=u1, v1=v1, grad_full=grad_full,
                      population=population, gap_tol=gap_tol, svd=svd)
    out["coverage_u"], out["coverage_v"] = sketch_coverage(sketch, tensors, u1, v1)
    return out
