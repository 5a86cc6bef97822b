"""The second-order validity flag (:func:`trajlab.sde.layer.second_order_outside`) against the
closed-form two-level model and exact singular values of the stepped matrix (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from trajlab.sde.layer import (
    TWO_LEVEL_RADIUS,
    layer_terms,
    pathwise_increment,
    second_order_outside,
)

F64 = torch.float64


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]


def _embedded(c: float, *, antisymmetric: bool = False, seed: int = 0):
    """``W = U diag(1, 0.9, 0.5, 0.2) V^T`` (m=4, n=6) and an update coupling only the top two
    pairs by ``c``: ``U [[0, c], [+-c, 0]] V^T`` (symmetric: the crossing direction)."""
    s = torch.tensor([1.0, 0.9, 0.5, 0.2], dtype=F64)
    U, V = _orthogonal(4, seed), _orthogonal(6, seed + 1)[:, :4]
    C = torch.zeros(4, 4, dtype=F64)
    C[0, 1], C[1, 0] = c, (-c if antisymmetric else c)
    return U @ torch.diag(s) @ V.T, U @ C @ V.T


def _flag(W: torch.Tensor, dW: torch.Tensor) -> tuple[bool, float, float]:
    """(flag, Taylor increment, exact change of s_1) with the kernel's own terms."""
    S = torch.linalg.svdvals(W)
    svd = torch.linalg.svd(W, full_matrices=False)
    inc = pathwise_increment(W, dW, svd=svd)
    first = (svd[0][:, 0] @ dW @ svd[2][0, :])
    flag = second_order_outside(inc, first, S[0], (S[0] - S[1]) / S[0])
    exact = torch.linalg.svdvals(W + dW)[0] - S[0]
    return bool(flag), float(inc), float(exact)


@pytest.mark.parametrize("c", [0.01, 0.03, 0.045, 0.055, 0.08, 0.2])
def test_two_level_radius(c: float) -> None:
    """Second-order term c^2 / delta in closed form; flagged exactly beyond |c| = delta / 2."""
    delta = 0.1
    W, dW = _embedded(c)
    flag, inc, exact = _flag(W, dW)
    assert inc == pytest.approx(c * c / delta, rel=1e-9)
    # the top two eigenvalues of [[1, c], [c, 0.9]] (closed form) are the singular values
    assert exact == pytest.approx(math.sqrt(delta**2 / 4 + c * c) - delta / 2, rel=1e-9)
    assert flag == (c > delta / 2)


def test_flagged_steps_are_where_the_expansion_fails() -> None:
    """Inside the radius the Taylor error is a small fraction of the change; far outside it the
    second-order step overshoots the exact change by more than the change itself."""
    W, dW = _embedded(0.02)
    flag, inc, exact = _flag(W, dW)
    assert not flag and abs(inc - exact) < 0.05 * exact
    W, dW = _embedded(0.3)
    flag, inc, exact = _flag(W, dW)
    assert flag and inc - exact > exact


def test_benign_direction_not_flagged() -> None:
    """An antisymmetric coupling of the same size moves s_1 by O(c^2 / (s_1 + s_2)): no
    near-singular term, no flag, and the second-order step stays accurate (not a test of
    ||dW|| / gap, which is the same as in the crossing direction)."""
    W, dW = _embedded(0.08, antisymmetric=True)
    flag, inc, exact = _flag(W, dW)
    assert not flag
    assert abs(inc - exact) < 0.01 * abs(exact)


def test_layer_terms_keys_and_edge_values() -> None:
    """Works on layer_terms' outputs; NaN inputs give False, a zero gap with a second-order
    term gives True."""
    W, dW = _embedded(0.08)
    g = -dW / 0.05
    B = 2
    S = torch.linalg.svd(W, full_matrices=False)
    u, v = S[0][:, 0], S[2][0, :]
    out = layer_terms(W, g, dW, 0.05, B, torch.stack([g @ v] * B), torch.stack([g.T @ u] * B),
                      torch.zeros_like(W), u1=u, v1=v)
    assert bool(second_order_outside(out["pathwise_increment"], out["pathwise_first_order"],
                                     out["K"], out["spectral_gap"]))
    nan = torch.tensor(float("nan"), dtype=F64)
    one = torch.ones((), dtype=F64)
    assert not bool(second_order_outside(nan, one, one, one))
    assert bool(second_order_outside(one, 0 * one, one, 0 * one))
    assert TWO_LEVEL_RADIUS == 0.25
