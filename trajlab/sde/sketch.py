"""What the SDE terms need from a recorded per-sample sketch (MATH.md §1–§2, sufficiency).

Two sketch kinds (``trajlab.store.schema.SKETCH_VARS``), for a layer with weight ``W`` (m, n) and
per-sample gradients ``G_i`` (i < B):

* ``"rank1"``: ``ps_grad_out`` (..., B, m) and ``ps_input`` (..., B, n) with
  ``G_i = outer(ps_grad_out[i], ps_input[i])`` exactly.
* ``"subspace"``: orthonormal ``basis_u`` U (..., m, k) and ``basis_v`` V (..., n, k),
  ``ps_proj_out`` = ``G_i V`` (..., B, m, k), ``ps_proj_in`` = ``G_i^T U`` (..., B, n, k) and
  ``grad_sq_sum`` = ``sum_i G_i**2`` (..., m, n).

Leading dimensions ``...`` (e.g. a step dimension) are carried through every function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "SketchKind",
    "noise_diag",
    "per_sample_directions",
    "sketch_batch_size",
    "sketch_coverage",
]

SketchKind = Literal["rank1", "subspace"]

_NEEDS: dict[str, tuple[str, ...]] = {
    "rank1": ("ps_grad_out", "ps_input"),
    "subspace": ("basis_u", "basis_v", "ps_proj_out", "ps_proj_in", "grad_sq_sum"),
}


def _check(sketch: str, tensors: Mapping[str, Tensor], needs: tuple[str, ...] | None = None):
    if sketch not in _NEEDS:
        raise ValueError(f"unknown sketch kind {sketch!r}; expected 'rank1' or 'subspace'")
    missing = [k for k in (needs or _NEEDS[sketch]) if k not in tensors]
    if missing:
        raise ValueError(f"{sketch!r} sketch is missing {missing}; it needs {list(_NEEDS[sketch])}")


def sketch_batch_size(sketch: SketchKind, tensors: Mapping[str, Tensor]) -> int:
    """Number of samples B held by the sketch."""
    _check(sketch, tensors)
    key = "ps_grad_out" if sketch == "rank1" else "ps_proj_out"
    return int(tensors[key].shape[-2 if sketch == "rank1" else -3])


def per_sample_directions(
    sketch: SketchKind, tensors: Mapping[str, Tensor], u1: Tensor, v1: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-sample projections ``G_i v_1`` and ``G_i^T u_1`` from a sketch.

    Parameters
    ----------
    sketch : {"rank1", "subspace"}
    tensors : mapping of str to Tensor
        The sketch's variables (see module docstring).
    u1 : Tensor (..., m)
        Top left singular vector of ``W``.
    v1 : Tensor (..., n)
        Top right singular vector of ``W`` (same sign convention as ``u1``: ``W v1 = s1 u1``).

    Returns
    -------
    Gv : Tensor (..., B, m)
        ``G_i v_1``.
    Gtu : Tensor (..., B, n)
        ``G_i^T u_1``.

    Notes
    -----
    Exact for ``"rank1"``. For ``"subspace"`` the result is ``G_i V V^T v_1`` and
    ``G_i^T U U^T u_1``: exact when ``v_1`` lies in span V and ``u_1`` in span U (the recorder's
    bases are W's top-k singular vectors); :func:`sketch_coverage` measures how far that holds.
    """
    _check(sketch, tensors)
    if sketch == "rank1":
        d, a = tensors["ps_grad_out"], tensors["ps_input"]
        av = torch.einsum("...bn,...n->...b", a, v1.to(a.dtype))
        du = torch.einsum("...bm,...m->...b", d, u1.to(d.dtype))
        return d * av[..., None], a * du[..., None]
    U, V = tensors["basis_u"], tensors["basis_v"]
    cv = torch.einsum("...nk,...n->...k", V, v1.to(V.dtype))
    cu = torch.einsum("...mk,...m->...k", U, u1.to(U.dtype))
    Gv = torch.einsum("...bmk,...k->...bm", tensors["ps_proj_out"], cv)
    Gtu = torch.einsum("...bnk,...k->...bn", tensors["ps_proj_in"], cu)
    return Gv, Gtu


def sketch_coverage(
    sketch: SketchKind, tensors: Mapping[str, Tensor], u1: Tensor, v1: Tensor
) -> tuple[Tensor, Tensor]:
    """How much of ``u_1``, ``v_1`` the sketch's subspaces hold: ``(||U^T u_1||, ||V^T v_1||)``.

    Both are 1 for an exact sketch (always for ``"rank1"``). For ``"subspace"``, the relative
    error of ``G_i v_1`` from :func:`per_sample_directions` is at most about
    ``sqrt(1 - coverage**2) * ||G_i|| / ||G_i v_1||``.

    Returns
    -------
    coverage_u, coverage_v : Tensor (...)
    """
    _check(sketch, tensors)
    if sketch == "rank1":
        one = torch.ones(u1.shape[:-1], dtype=u1.dtype, device=u1.device)
        return one, one.clone()
    U, V = tensors["basis_u"], tensors["basis_v"]
    cu = torch.einsum("...mk,...m->...k", U, u1.to(U.dtype))
    cv = torch.einsum("...nk,...n->...k", V, v1.to(V.dtype))
    return torch.linalg.vector_norm(cu, dim=-1), torch.linalg.vector_norm(cv, dim=-1)


def noise_diag(
    sketch: SketchKind, tensors: Mapping[str, Tensor], g: Tensor, *, batch_size: int | None = None
) -> Tensor:
    """Diagonal of the one-batch covariance estimate of the batch-mean gradient (MATH.md §1).

    ``Sigma[pq, pq] = (sum_i G_i[p, q]**2 - B g[p, q]**2) / (B (B - 1))``, clipped at 0 against
    rounding. ``g`` must be the batch mean of the ``G_i``. No finite-population correction here
    (:func:`trajlab.sde.layer_terms` applies it).

    Parameters
    ----------
    sketch : {"rank1", "subspace"}
    tensors : mapping of str to Tensor
        ``"rank1"``: ``sum_i G_i**2 = (delta**2)^T (a**2)``; ``"subspace"``: ``grad_sq_sum``.
    g : Tensor (..., m, n)
        Batch-mean gradient.
    batch_size : int, optional
        B; checked against the sketch when given.

    Returns
    -------
    Tensor (..., m, n)

    Raises
    ------
    ValueError
        If ``B < 2`` (the estimate needs two samples).
    """
    if sketch == "rank1":
        _check(sketch, tensors)
        d, a = tensors["ps_grad_out"], tensors["ps_input"]
        B = d.shape[-2]
        sq = torch.einsum("...bm,...bn->...mn", d * d, a * a)
    else:
        _check(sketch, tensors, ("grad_sq_sum",))
        sq = tensors["grad_sq_sum"]
        B = None
        for key, dim in (("ps_proj_out", -3), ("ps_sqnorm", -1)):
            if key in tensors:
                B = int(tensors[key].shape[dim])
                break
        if B is None:
            if batch_size is None:
                raise ValueError("noise_diag: pass batch_size (the subspace sketch has no "
                                 "per-sample variable to read it from)")
            B = batch_size
    if batch_size is not None and batch_size != B:
        raise ValueError(f"noise_diag: batch_size={batch_size} but the sketch holds {B} samples")
    if B < 2:
        raise ValueError(f"noise terms need batch_size >= 2 (got {B}): the covariance of the "
                         "batch gradient cannot be estimated from one sample")
    sq = sq.to(g.dtype)
    return ((sq - B * g * g) / (B * (B - 1))).clamp_min(0)
