"""Exact per-sample gradients of a diagonal matrix (normalisation scales): ``G_i = diag(g_i)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from trajlab.dims import OUT, SAMPLE
from trajlab.sketches.base import SketchKind, Var, _require


#: Module types recorded as ``diag(weight)`` by the built-in rules (normalisation scales):
#: their matrices are not weight-matrix parameters (coverage counts), also in stores recorded
#: with ``per_sample=False``, whose layers carry the sketch kind ``"none"``.
DIAGONAL_MODULES = frozenset({"LayerNorm", "GroupNorm", "RMSNorm"})


class DiagonalSketch(SketchKind):
    """``ps_diag`` (B, d): the diagonal of each per-sample gradient of ``W = diag(gamma)``.

    Exact, d numbers per sample, and the batch mean is the batch gradient (``grad`` is not
    stored). The analysis adaptor works on the vectors: with ``W = diag(gamma)`` and a unique
    ``j* = argmax |gamma_j|`` the top pair is ``u_1 = sign(gamma_j*) e_j*``, ``v_1 = e_j*``, so
    ``G_i v_1 = g_i * v_1`` and ``G_i^T u_1 = g_i * u_1`` (elementwise), giving
    ``d sigma_1[G_i] = sign(gamma_j*) g_ij*``. Diagonal directions have no second-order term
    (every ``a_j = u_1^T D v_j`` and ``b_j`` vanishes for ``j > 1``), which the SVD kernels
    reproduce exactly; a tie for the maximum (e.g. the initial ``gamma = 1``) has gap 0 and is
    flagged ``degenerate`` by the analysis, as sigma_1 is not differentiable there.
    """

    name = "diagonal"
    summary = "exact diagonal (per-sample vectors)"
    exact = True
    implies_grad = True
    batch_var = ("ps_diag", -2)

    def variables(self, rank: int) -> dict[str, Var]:
        return {"ps_diag": Var((SAMPLE, OUT), "ps", "per-sample gradient of the diagonal "
                               "(scaled by the batch size): G_i = diag(ps_diag_i)", True)}

    # ------------------------------------------------------------------ recording
    def capture_diagonal(self, values: Tensor, *, want_per_sample: bool = False):
        """Sketch per-sample diagonals ``values`` (B, d)."""
        ps = torch.diag_embed(values) if want_per_sample else None
        return {"ps_diag": values}, ps

    def capture_dense(self, G, *, basis=None, want_per_sample=False):
        return self.capture_diagonal(torch.diagonal(G, dim1=-2, dim2=-1),
                                     want_per_sample=want_per_sample)

    def capture(self, act, delta, *, basis=None, want_per_sample=False):
        return self.capture_dense(torch.bmm(delta, act.transpose(1, 2)),
                                  want_per_sample=want_per_sample)

    def mean_gradient(self, tensors):
        return torch.diag_embed(tensors["ps_diag"].mean(-2))

    def mean_gradient_times(self, tensors, r):
        mean = tensors["ps_diag"].mean(-2)
        return mean[..., :, None] * r.to(mean.dtype)

    def sample_gradient(self, tensors, i):
        return torch.diag(tensors["ps_diag"][i])

    def rescale(self, tensors, c):
        return {**tensors, "ps_diag": tensors["ps_diag"] * c}

    def concat(self, parts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        return {"ps_diag": torch.cat([p["ps_diag"] for p in parts])}

    # ------------------------------------------------------------------ reading
    def implied_grad(self, arrays, batch):
        d = np.asarray(arrays["ps_diag"])
        s = np.nan_to_num(d.astype(np.float64)).sum(-2)
        mean = s / np.maximum(np.asarray(batch), 1)[:, None]
        out = np.zeros((*mean.shape, mean.shape[-1]), dtype=d.dtype)
        j = np.arange(mean.shape[-1])
        out[..., j, j] = mean
        return out

    def reconstruct(self, arrays, b):
        d = np.asarray(arrays["ps_diag"])[:b]
        out = np.zeros((*d.shape, d.shape[-1]), dtype=d.dtype)
        j = np.arange(d.shape[-1])
        out[:, j, j] = d
        return out, np.zeros(b, dtype=d.dtype)

    # ------------------------------------------------------------------ analysis
    def directions(self, tensors, u1, v1):
        _require(self, tensors, ("ps_diag",))
        g = tensors["ps_diag"]
        return g * v1.to(g.dtype)[..., None, :], g * u1.to(g.dtype)[..., None, :]

    def second_moment(self, tensors):
        _require(self, tensors, ("ps_diag",))
        g = tensors["ps_diag"]
        return torch.diag_embed((g * g).sum(-2))


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
    ``diag(gamma)`` at every step whose maximum is unique (tests/test_rules_kinds.py), without
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

    if grad_full is None:
        used_full = torch.zeros(T, dtype=torch.bool, device=gamma.device)
        grad = g
    else:
        used_full = torch.isfinite(grad_full).all(-1)
        grad = torch.where(used_full[:, None], grad_full.to(dt), g.to(dt))
    p1 = s * at(update)
    plain = -eta * s * at(g)
    safe_eta = torch.where(eta == 0, torch.ones_like(eta), eta)
    zero = torch.zeros_like(K)
    out = {
        "K": K,
        "spectral_gap": gap,
        "degenerate": gap < gap_tol,
        "flow_full_gradient": used_full,
        "drift_flow": -s * at(grad),
        "pathwise_increment": p1,
        "pathwise_first_order": p1,
        "drift_optimizer": torch.where(eta == 0, zero, (p1 - plain) / safe_eta),
    }
    if ps_diag is None:
        out["drift_discretization"] = torch.where(used_full, zero, torch.full_like(K, torch.nan))
        return out
    from trajlab.sde.layer import noise_scale  # (trajlab.sde imports the sketch kinds)

    B = ps_diag.shape[-2]
    fpc, scale = noise_scale(B, population)
    per_sample = ps_diag.to(dt).gather(-1, j[:, None, :].expand(T, B, 1))[..., 0]  # (T, B)
    c = s[:, None] * (per_sample - at(g)[:, None])
    diffusion2 = eta * scale * (c * c).sum(-1)
    second_moment = (ps_diag.to(dt) ** 2).sum(-2).gather(-1, j)[:, 0]
    sigma_jj = ((second_moment - B * at(g) ** 2) / (B * (B - 1))).clamp_min(0) * fpc
    diffusion2_var = eta * sigma_jj
    one = torch.ones_like(K)
    out.update({
        "drift_noise": zero,
        "drift_noise_var": zero.clone(),
        "drift_noise_cov": zero.clone(),
        "diffusion2": diffusion2,
        "diffusion2_var": diffusion2_var,
        "diffusion2_cov": diffusion2 - diffusion2_var,
        "noise_proj": c,
        "coverage_u": one,
        "coverage_v": one.clone(),
        "drift": out["drift_flow"],
        "drift_discretization": zero.clone(),
    })
    return out
