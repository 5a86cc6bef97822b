"""Hypothesis strategies for spectral property tests (hypothesis is imported lazily here).

Examples
--------
>>> from hypothesis import given
>>> from trajlab.spectral.testing import matrices
>>> @given(matrices(max_side=6))
... def test_scale(W):
...     ...
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["matrices", "well_separated_matrices"]


def _st() -> Any:
    import hypothesis.strategies as st  # lazy: hypothesis is a test-only dependency

    return st


def matrices(*, min_side: int = 1, max_side: int = 8, dtype: torch.dtype = torch.float64,
             rank: int | None = None, scale: float = 1.0) -> Any:
    """Strategy for random real matrices ``(m, n)`` with ``min_side <= m, n <= max_side``.

    Entries are Gaussian from a drawn seed (fast to generate and shrink), multiplied by
    ``scale``; ``rank`` (if given) truncates to a product of ``m x rank`` and ``rank x n`` factors.
    """
    st = _st()

    @st.composite
    def build(draw: Any) -> torch.Tensor:
        m = draw(st.integers(min_side, max_side))
        n = draw(st.integers(min_side, max_side))
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        if rank is None:
            W = torch.randn(m, n, generator=g, dtype=torch.float64)
        else:
            rk = min(rank, m, n)
            W = (torch.randn(m, rk, generator=g, dtype=torch.float64)
                 @ torch.randn(rk, n, generator=g, dtype=torch.float64))
        return (scale * W).to(dtype)

    return build()


def well_separated_matrices(*, min_side: int = 1, max_side: int = 8, min_gap: float = 0.05,
                            dtype: torch.dtype = torch.float64) -> Any:
    """Strategy for matrices whose relative top gap ``(s_1 - s_2)/s_1`` is at least ``min_gap``
    (derivatives of ``s_1`` are well conditioned there)."""
    _st()  # imports hypothesis (a clear error when it is missing)

    def ok(W: torch.Tensor) -> bool:
        s = torch.linalg.svdvals(W.double())
        if s[0] <= 0:
            return False
        return len(s) == 1 or bool((s[0] - s[1]) / s[0] >= min_gap)

    return matrices(min_side=min_side, max_side=max_side, dtype=dtype).filter(ok)
