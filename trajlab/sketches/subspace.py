"""Top-k singular-subspace projections of per-sample gradients of weight-shared layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from trajlab.dims import IN, OUT, RANK, SAMPLE
from trajlab.sketches.base import SketchKind, Var, _require


class Subspace(SketchKind):
    """Projections of ``G_i`` onto the top-k singular subspaces (U, V) of W at that step.

    ``G_i V`` and ``G_i^T U`` carry everything the sigma_1..sigma_k dynamics need (MATH.md §2,
    sufficiency); ``ps_sqnorm`` gives the energy the projection misses and ``grad_sq_sum`` the
    diagonal of the gradient-noise covariance. The batch gradient is stored (``grad``).
    """

    name = "subspace"
    summary = "top-k subspace sketch"
    batch_var = ("ps_proj_out", -3)
    needs_basis = True

    def variables(self, rank: int) -> dict[str, Var]:
        return {
            "basis_u": Var((OUT, RANK), "param",
                           "orthonormal top-k left singular vectors U of W used for the sketch"),
            "basis_v": Var((IN, RANK), "param",
                           "orthonormal top-k right singular vectors V of W used for the sketch"),
            "basis_residual": Var((), "float64", "max_j ||W v_j - s_j u_j|| / s_1 of the basis "
                                  "(0 = exact singular vectors)"),
            "ps_proj_out": Var((SAMPLE, OUT, RANK), "ps", "per-sample gradient times V: G_i V",
                               True),
            "ps_proj_in": Var((SAMPLE, IN, RANK), "ps",
                              "per-sample gradient transposed times U: G_i^T U", True),
            "ps_sqnorm": Var((SAMPLE,), "ps", "squared Frobenius norm of each per-sample "
                             "gradient", True),
            "grad_sq_sum": Var((OUT, IN), "param", "sum over samples of the elementwise square "
                               "of the per-sample gradients", True),
        }

    def needs(self) -> tuple[str, ...]:
        return ("basis_u", "basis_v", "ps_proj_out", "ps_proj_in", "grad_sq_sum")

    def capture(self, act, delta, *, basis=None, want_per_sample=False):
        G = torch.bmm(delta, act.transpose(1, 2))  # (B, m, n): as costly as the weight gradient
        return self.capture_dense(G, basis=basis, want_per_sample=want_per_sample)

    def capture_dense(self, G, *, basis=None, want_per_sample=False):
        if basis is None:
            raise ValueError("the subspace sketch needs a basis (U, V)")
        U, V = basis
        sq = G.square()
        tensors = {
            "ps_proj_out": G @ V.to(G.dtype),
            "ps_proj_in": G.transpose(1, 2) @ U.to(G.dtype),
            "ps_sqnorm": sq.sum((1, 2)),
            "grad_sq_sum": sq.sum(0),
            "_mean": G.mean(0),  # not stored: the batch mean, for the gradient checks
        }
        return tensors, (G if want_per_sample else None)

    def mean_gradient(self, tensors):
        return tensors.get("_mean")

    def rescale(self, tensors, c):
        out = dict(tensors)
        for k in ("ps_proj_out", "ps_proj_in", "_mean"):
            if k in out:
                out[k] = out[k] * c
        for k in ("ps_sqnorm", "grad_sq_sum"):
            out[k] = out[k] * (c * c)
        return out

    def concat(self, parts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        n = [self.batch_size(p) for p in parts]
        out = {k: torch.cat([p[k] for p in parts]) for k in ("ps_proj_out", "ps_proj_in",
                                                            "ps_sqnorm")}
        out["grad_sq_sum"] = sum(p["grad_sq_sum"] for p in parts)
        if all("_mean" in p for p in parts):
            out["_mean"] = sum(p["_mean"] * b for p, b in zip(parts, n)) / sum(n)
        return out

    def reconstruct(self, arrays, b):
        po = np.asarray(arrays["ps_proj_out"])[:b]
        pi = np.asarray(arrays["ps_proj_in"])[:b]
        U, V = np.asarray(arrays["basis_u"]), np.asarray(arrays["basis_v"])
        grads = reconstruct_subspace(po, pi, U, V)
        total = np.asarray(arrays["ps_sqnorm"])[:b]
        resid = np.maximum(total - np.einsum("bmn,bmn->b", grads, grads), 0.0)
        return grads, resid

    def directions(self, tensors, u1, v1):
        _require(self, tensors, ("basis_u", "basis_v", "ps_proj_out", "ps_proj_in"))
        U, V = tensors["basis_u"], tensors["basis_v"]
        cv = torch.einsum("...nk,...n->...k", V, v1.to(V.dtype))
        cu = torch.einsum("...mk,...m->...k", U, u1.to(U.dtype))
        Gv = torch.einsum("...bmk,...k->...bm", tensors["ps_proj_out"], cv.to(
            tensors["ps_proj_out"].dtype))
        Gtu = torch.einsum("...bnk,...k->...bn", tensors["ps_proj_in"], cu.to(
            tensors["ps_proj_in"].dtype))
        return Gv, Gtu

    def second_moment(self, tensors):
        _require(self, tensors, ("grad_sq_sum",))
        return tensors["grad_sq_sum"]

    def coverage(self, tensors, u1, v1):
        _require(self, tensors, ("basis_u", "basis_v"))
        U, V = tensors["basis_u"], tensors["basis_v"]
        cu = torch.einsum("...mk,...m->...k", U, u1.to(U.dtype))
        cv = torch.einsum("...nk,...n->...k", V, v1.to(V.dtype))
        return torch.linalg.vector_norm(cu, dim=-1), torch.linalg.vector_norm(cv, dim=-1)


def reconstruct_subspace(proj_out: np.ndarray, proj_in: np.ndarray, U: np.ndarray,
                         V: np.ndarray) -> np.ndarray:
    """Orthogonal projection of G_i onto {U A^T + B V^T}: U U^T G + G V V^T - U U^T G V V^T.

    Parameters
    ----------
    proj_out : (B, m, k) = G_i V.  proj_in : (B, n, k) = G_i^T U.  U : (m, k).  V : (n, k).
    """
    core = np.einsum("mk,bml->bkl", U, proj_out, optimize=True)  # U^T G V, (B, k, k)
    return (
        np.einsum("mk,bnk->bmn", U, proj_in, optimize=True)
        + np.einsum("bmk,nk->bmn", proj_out, V, optimize=True)
        - np.einsum("mk,bkl,nl->bmn", U, core, V, optimize=True)
    )
