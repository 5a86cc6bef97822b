"""top_singular, spectral_gap and opnorm_jacobian."""

import pytest
import torch
from spectral_fd import d1, rel, sigma1

from trajlab.spectral import TopSingular, opnorm_jacobian, spectral_gap, top_singular

f64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spiked(m: int, n: int, seed: int = 0, dtype=f64) -> torch.Tensor:
    """Noise plus a few strong directions: a well-separated top singular value."""
    g = _gen(seed)
    W = torch.randn(m, n, generator=g, dtype=f64) / max(m, n) ** 0.5
    for s in (4.0, 3.0, 2.5):
        a = torch.randn(m, 1, generator=g, dtype=f64)
        b = torch.randn(1, n, generator=g, dtype=f64)
        W += s * (a / a.norm()) @ (b / b.norm())
    return W.to(dtype)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (1, 4), (4, 1), (3, 7, 4)])
def test_svd_result_is_a_singular_triplet(shape):
    W = torch.randn(*shape, generator=_gen(1), dtype=f64)
    t = top_singular(W, k=1)
    ref = torch.linalg.svdvals(W)
    assert isinstance(t, TopSingular)
    assert t.S.shape == (*shape[:-2], 1) and t.U.shape == (*shape[:-1], 1)
    assert t.V.shape == (*shape[:-2], shape[-1], 1) and t.gap.shape == shape[:-2]
    torch.testing.assert_close(t.S[..., 0], ref[..., 0])
    torch.testing.assert_close(t.gap, spectral_gap(ref))
    assert float(t.residual.max()) < 1e-13
    # sign convention: largest-magnitude entry of u_1 is positive
    idx = t.U[..., 0].abs().argmax(-1, keepdim=True)
    assert bool((t.U[..., 0].gather(-1, idx) > 0).all())


def test_rank_one_gap_is_one():
    assert float(top_singular(torch.randn(1, 6, dtype=f64)).gap) == 1.0
    W = torch.randn(5, 1, dtype=f64) @ torch.randn(1, 6, dtype=f64)
    assert abs(float(top_singular(W).gap) - 1.0) < 1e-12
    z = top_singular(torch.zeros(3, 4, dtype=f64))
    assert float(z.gap) == 0.0 and bool(z.degenerate) and float(z.residual) == 0.0


@pytest.mark.parametrize("shape", [(300, 280), (280, 300), (2, 120, 100)])
@pytest.mark.parametrize("k", [1, 3])
def test_iterative_matches_svd(shape, k):
    W = spiked(*shape[-2:], seed=2)
    if len(shape) == 3:
        W = torch.stack([W, spiked(*shape[-2:], seed=3)])
    a = top_singular(W, k, method="svd")
    b = top_singular(W, k, method="iterative", max_iter=300)
    torch.testing.assert_close(b.S, a.S, rtol=1e-12, atol=0)
    torch.testing.assert_close(b.U, a.U, rtol=0, atol=1e-9)
    torch.testing.assert_close(b.V, a.V, rtol=0, atol=1e-9)
    torch.testing.assert_close(b.gap, a.gap, rtol=1e-6, atol=0)
    assert float(b.residual.max()) <= 1e-12


def test_warm_start_converges_fast():
    W = spiked(400, 300, seed=4)
    t0 = top_singular(W, method="svd")
    G = torch.randn(400, 3, generator=_gen(5), dtype=f64) @ torch.randn(3, 300, generator=_gen(6),
                                                                        dtype=f64)
    W1 = W + 1e-3 * W.norm() * G / G.norm()
    cold = top_singular(W1, method="iterative", max_iter=500)
    warm = top_singular(W1, init=t0, method="iterative")
    ref = top_singular(W1, method="svd")
    assert warm.n_iter <= 15 and warm.n_iter < cold.n_iter
    torch.testing.assert_close(warm.S, ref.S, rtol=1e-13, atol=0)
    torch.testing.assert_close(warm.U, ref.U, rtol=0, atol=1e-10)
    # auto uses the iterative path with init for large matrices
    auto = top_singular(W1, init=t0)
    assert auto.n_iter > 0
    torch.testing.assert_close(auto.S, ref.S, rtol=1e-13, atol=0)


def test_repeated_top_value_is_flagged():
    Q1, _ = torch.linalg.qr(torch.randn(6, 6, generator=_gen(7), dtype=f64))
    Q2, _ = torch.linalg.qr(torch.randn(5, 5, generator=_gen(8), dtype=f64))
    S = torch.tensor([2.0, 2.0, 1.0, 0.5, 0.1], dtype=f64)
    W = Q1[:, :5] @ torch.diag(S) @ Q2.T
    t = top_singular(W)
    assert float(t.gap) < 1e-12 and bool(t.degenerate)
    near = Q1[:, :5] @ torch.diag(torch.tensor([2.0, 1.999, 1, 0.5, 0.1], dtype=f64)) @ Q2.T
    assert bool(top_singular(near).degenerate)
    assert not bool(top_singular(near, gap_tol=1e-4).degenerate)


def test_iterative_warns_when_not_converged():
    W = torch.randn(300, 300, generator=_gen(9), dtype=f64)  # tiny gap: slow convergence
    with pytest.warns(RuntimeWarning, match="did not reach"):
        t = top_singular(W, method="iterative", max_iter=3)
    assert float(t.residual) > 1e-10


@pytest.mark.parametrize("shape", [(4, 7), (7, 4), (6, 6)])
def test_jacobian_vs_finite_differences(shape):
    W = torch.randn(*shape, generator=_gen(10), dtype=f64)
    J = opnorm_jacobian(W)
    for seed in range(3):
        D = torch.randn(*shape, generator=_gen(20 + seed), dtype=f64)
        assert rel((J * D).sum(), d1(sigma1, W, D)) <= 1e-6


def test_jacobian_rank_deficient_and_batched():
    g = _gen(11)
    W = torch.randn(3, 5, 2, generator=g, dtype=f64) @ torch.randn(3, 2, 6, generator=g, dtype=f64)
    J = opnorm_jacobian(W)
    D = torch.randn(3, 5, 6, generator=g, dtype=f64)
    assert rel((J * D).sum((-2, -1)), d1(sigma1, W, D)) <= 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError):
        top_singular(torch.ones(3, 2), k=3)
    with pytest.raises(ValueError):
        top_singular(torch.ones(3, 2), method="lanczos")
