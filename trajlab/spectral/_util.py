"""Small helpers shared by the spectral kernels (private)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["default_tol", "fix_phase", "orthonormalize", "real_dtype"]


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype that goes with ``dtype`` (``complex128 -> float64``)."""
    return torch.empty((), dtype=dtype).real.dtype


def default_tol(dtype: torch.dtype, size: int, factor: float = 10.0) -> float:
    """``factor * eps * sqrt(size)``: the rounding floor of a residual of a ``size``-long matvec."""
    eps = torch.finfo(real_dtype(dtype)).eps
    return factor * eps * max(size, 1) ** 0.5


def fix_phase(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Make the largest-magnitude entry of every column of ``U`` real and positive.

    ``U`` (..., m, k) and ``V`` (..., n, k) are multiplied by the same unit scalar per column, so
    ``W v_j = s_j u_j`` is preserved. For real inputs this is a sign flip. Ties in magnitude are
    broken by the first index (``argmax``).
    """
    idx = U.abs().argmax(dim=-2, keepdim=True)
    top = U.gather(-2, idx)
    mag = top.abs()
    phase = torch.where(mag > 0, top / torch.where(mag > 0, mag, torch.ones_like(mag)),
                        torch.ones_like(top))
    phase = phase.conj()
    return U * phase, V * phase


def orthonormalize(X: Tensor) -> Tensor:
    """Orthonormal basis of the columns of ``X`` (..., n, p) by reduced QR."""
    return torch.linalg.qr(X, mode="reduced").Q
