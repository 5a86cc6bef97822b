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
    reproduce exactly and the closed form :func:`trajlab.sde.diagonal_layer_terms` builds on;
    a tie for the maximum (e.g. the initial ``gamma = 1``) has gap 0 and is flagged
    ``degenerate`` by the analysis, as sigma_1 is not differentiable there.
    """

    name = "diagonal"
    summary = "exact diagonal (per-sample vectors)"
    exact = True
    implies_grad = True
    batch_var = ("ps_diag", -2)
    diagonal = True

    def variables(self, rank: int) -> dict[str, Var]:
        return {"ps_diag": Var((SAMPLE, OUT), "ps", "per-sample gradient of the diagonal "
                               "(scaled by the batch size): G_i = diag(ps_diag_i)", True)}

    # ------------------------------------------------------------------ recording
    def capture_diagonal(self, values: Tensor, *, basis: tuple[Tensor, Tensor] | None = None,
                         want_per_sample: bool = False):
        """Sketch per-sample diagonals ``values`` (B, d) (``basis`` unused: exact)."""
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

    def sample_gradients(self, tensors):
        return torch.diag_embed(tensors["ps_diag"])

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

