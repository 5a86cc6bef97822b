"""What the SDE terms need from a recorded per-sample sketch (MATH.md §1–§2, sufficiency).

Thin functions over the sketch kinds of :mod:`trajlab.sketches` (each kind owns its adaptor;
``sketch`` is a registered kind or its name): for a layer with weight ``W`` (m, n) and
per-sample gradients ``G_i`` (i < B), e.g.

* ``"rank1"``: ``ps_grad_out`` (..., B, m) and ``ps_input`` (..., B, n) with
  ``G_i = outer(ps_grad_out[i], ps_input[i])`` exactly;
* ``"subspace"``: orthonormal ``basis_u`` U (..., m, k) and ``basis_v`` V (..., n, k),
  ``ps_proj_out`` = ``G_i V`` (..., B, m, k), ``ps_proj_in`` = ``G_i^T U`` (..., B, n, k) and
  ``grad_sq_sum`` = ``sum_i G_i**2`` (..., m, n).

Leading dimensions ``...`` (e.g. a step dimension) are carried through every function.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from trajlab.sketches import SketchKind, SketchName, sketch_kind

__all__ = [
    "noise_diag",
    "per_sample_directions",
    "sketch_batch_size",
    "sketch_coverage",
    "sketch_projected",
]


def _kind(sketch: SketchName | SketchKind) -> SketchKind:
    kind = sketch if isinstance(sketch, SketchKind) else sketch_kind(sketch)
    if not kind.per_sample:
        raise ValueError(f"sketch kind {kind.name!r} holds no per-sample information")
    return kind


def sketch_projected(sketch: SketchName | SketchKind) -> bool:
    """Whether the sketch holds statistics in the recorder's singular basis (its noise terms
    come from :func:`trajlab.sde.basis.basis_noise_terms`, not from directions)."""
    return bool(_kind(sketch).projected)


def sketch_batch_size(sketch: SketchName | SketchKind, tensors: Mapping[str, Tensor]) -> int:
    """Number of samples B held by the sketch."""
    kind = _kind(sketch)
    missing = [k for k in kind.needs() if k not in tensors]
    if missing:
        raise ValueError(f"{kind.name!r} sketch is missing {missing}; it needs "
                         f"{list(kind.needs())}")
    return kind.batch_size(tensors)


def per_sample_directions(
    sketch: SketchName | SketchKind, tensors: Mapping[str, Tensor], u1: Tensor, v1: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-sample projections ``G_i v_1`` and ``G_i^T u_1`` from a sketch.

    Parameters
    ----------
    sketch : SketchName or SketchKind
        A registered kind (``"rank1"``, ``"subspace"``, ...) or its name.
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
    return _kind(sketch).directions(tensors, u1, v1)


def sketch_coverage(
    sketch: SketchName | SketchKind, tensors: Mapping[str, Tensor], u1: Tensor, v1: Tensor
) -> tuple[Tensor, Tensor]:
    """How much of ``u_1``, ``v_1`` the sketch's subspaces hold: ``(||U^T u_1||, ||V^T v_1||)``.

    Both are 1 for an exact sketch (always for ``"rank1"``). For ``"subspace"``, the relative
    error of ``G_i v_1`` from :func:`per_sample_directions` is at most about
    ``sqrt(1 - coverage**2) * ||G_i|| / ||G_i v_1||``.

    Returns
    -------
    coverage_u, coverage_v : Tensor (...)
    """
    return _kind(sketch).coverage(tensors, u1, v1)


def noise_diag(
    sketch: SketchName | SketchKind, tensors: Mapping[str, Tensor], g: Tensor, *,
    batch_size: int | None = None,
) -> Tensor:
    """Diagonal of the one-batch covariance estimate of the batch-mean gradient (MATH.md §1).

    ``Sigma[pq, pq] = (sum_i G_i[p, q]**2 - B g[p, q]**2) / (B (B - 1))``, clipped at 0 against
    rounding. ``g`` must be the batch mean of the ``G_i``. No finite-population correction here
    (:func:`trajlab.sde.layer_terms` applies it).

    Parameters
    ----------
    sketch : SketchName or SketchKind
    tensors : mapping of str to Tensor
        ``"rank1"``: ``sum_i G_i**2 = (delta**2)^T (a**2)``; ``"subspace"``: ``grad_sq_sum``.
    g : Tensor (..., m, n)
        Batch-mean gradient.
    batch_size : int, optional
        B; checked against the sketch when given (needed when the sketch holds no per-sample
        variable to read it from).

    Returns
    -------
    Tensor (..., m, n)

    Raises
    ------
    ValueError
        If ``B < 2`` (the estimate needs two samples).
    """
    kind = _kind(sketch)
    sq = kind.second_moment(tensors)
    key, dim = kind.batch_var
    B = int(tensors[key].shape[dim]) if key in tensors else None
    if B is None and "ps_sqnorm" in tensors:
        B = int(tensors["ps_sqnorm"].shape[-1])
    if B is None:
        if batch_size is None:
            raise ValueError("noise_diag: pass batch_size (the sketch has no per-sample "
                             "variable to read it from)")
        B = batch_size
    if batch_size is not None and batch_size != B:
        raise ValueError(f"noise_diag: batch_size={batch_size} but the sketch holds {B} samples")
    if B < 2:
        raise ValueError(f"noise terms need batch_size >= 2 (got {B}): the covariance of the "
                         "batch gradient cannot be estimated from one sample")
    # (sq - B g^2) / (B (B - 1)) in three passes over (m, n) (this runs for every step)
    return torch.addcmul(sq.to(g.dtype), g, g, value=-B).div_(B * (B - 1)).clamp_min_(0)
