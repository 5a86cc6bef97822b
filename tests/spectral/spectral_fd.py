"""Fourth-order central finite differences (float64)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def d1(f: Callable[[Tensor], Tensor], X: Tensor, D: Tensor, h: float = 1e-3) -> Tensor:
    """First directional derivative, error O(h^4)."""
    return (-f(X + 2 * h * D) + 8 * f(X + h * D) - 8 * f(X - h * D) + f(X - 2 * h * D)) / (12 * h)


def d2(f: Callable[[Tensor], Tensor], X: Tensor, D: Tensor, h: float = 1e-3) -> Tensor:
    """Second directional derivative, error O(h^4)."""
    return (-f(X + 2 * h * D) + 16 * f(X + h * D) - 30 * f(X) + 16 * f(X - h * D)
            - f(X - 2 * h * D)) / (12 * h * h)


def sigma1(W: Tensor) -> Tensor:
    return torch.linalg.svdvals(W)[..., 0]


def rel(a: Tensor, b: Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())
