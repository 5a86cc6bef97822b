"""Property tests (hypothesis) for the operator norm and its derivatives."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trajlab.spectral import hessian_quadform, opnorm_jacobian, top_singular
from trajlab.spectral.testing import matrices, well_separated_matrices

f64 = torch.float64
FAST = settings(max_examples=25, deadline=None)

#: documented float32 tolerance of s_1 (relative to the float64 value), see docs/spectral.md
F32_RTOL = 1e-5


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed),
                                       dtype=f64))
    return Q * torch.sign(torch.diagonal(R))


@FAST
@given(matrices(max_side=7), st.floats(-1e3, 1e3, allow_nan=False))
def test_scale_equivariance(W, c):
    s = top_singular(W).S[0]
    torch.testing.assert_close(top_singular(c * W).S[0], abs(c) * s, rtol=1e-12, atol=1e-300)


@FAST
@given(matrices(max_side=7), st.integers(0, 1000))
def test_orthogonal_invariance(W, seed):
    m, n = W.shape
    Q1, Q2 = _orthogonal(m, seed), _orthogonal(n, seed + 1)
    a = top_singular(W)
    b = top_singular(Q1 @ W @ Q2.T)
    torch.testing.assert_close(b.S, a.S, rtol=1e-12, atol=1e-14)


@FAST
@given(well_separated_matrices(max_side=6, min_gap=0.05), st.integers(0, 1000))
def test_derivatives_invariant_under_rotation(W, seed):
    m, n = W.shape
    Q1, Q2 = _orthogonal(m, seed), _orthogonal(n, seed + 1)
    D = torch.randn(2, m, n, generator=torch.Generator().manual_seed(seed), dtype=f64)
    Wr, Dr = Q1 @ W @ Q2.T, Q1 @ D @ Q2.T
    torch.testing.assert_close(opnorm_jacobian(Wr), Q1 @ opnorm_jacobian(W) @ Q2.T,
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(hessian_quadform(Wr, Dr), hessian_quadform(W, D),
                               rtol=1e-8, atol=1e-10)


@FAST
@given(matrices(max_side=8))
def test_sigma1_bounds(W):
    s1 = float(top_singular(W).S[0])
    assert s1 >= float(torch.linalg.vector_norm(W, dim=0).max()) * (1 - 1e-12)
    assert s1 >= float(torch.linalg.vector_norm(W, dim=1).max()) * (1 - 1e-12)
    assert s1 <= float(torch.linalg.matrix_norm(W)) * (1 + 1e-12)


@FAST
@given(matrices(max_side=8, rank=2))
def test_rank_deficient_sigma1_and_hessian_psd(W):
    t = top_singular(W)
    torch.testing.assert_close(t.S[0], torch.linalg.svdvals(W)[0])
    if not bool(t.degenerate):
        D = torch.randn(3, *W.shape, generator=torch.Generator().manual_seed(0), dtype=f64)
        assert bool((hessian_quadform(W, D) >= -1e-9 * t.S[0]).all())


@FAST
@given(matrices(max_side=16))
def test_float32_within_documented_tolerance(W):
    s64 = top_singular(W).S[0]
    s32 = top_singular(W.float()).S[0]
    assert s32.dtype == torch.float32
    assert abs(float(s32) - float(s64)) <= F32_RTOL * float(s64) + 1e-30
