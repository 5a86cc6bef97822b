"""Conv2d operator norms: FFT == LOBPCG == power == dense operator; derivatives vs FD.

New geometries (Conv1d, reflect/replicate padding, ConvTranspose), tolerances, warm starts and
series: test_spectral_conv_geometries.py.
"""

import pytest
import torch
from spectral_fd import d1, d2, rel

from trajlab.spectral import (
    conv_hessian_quadform,
    conv_matrix_proxy,
    conv_operator,
    conv_operator_matrix,
    conv_opnorm,
    conv_opnorm_grad,
)

f64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny products: one thread each (two xdist workers on two cores must not oversubscribe)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


CIRCULAR = [
    dict(padding=1, padding_mode="circular"),
    dict(padding=(1, 2), dilation=(1, 2), padding_mode="circular"),
]
OTHER = [
    dict(padding=1),
    dict(padding=0, stride=2),
    dict(padding=1, stride=(2, 1), dilation=(1, 2)),
    dict(padding=1, stride=2, padding_mode="circular"),
]
SIZES = [(6, 6), (5, 7)]


def _dense_sigma(k, size, kw):
    return torch.linalg.svdvals(conv_operator_matrix(k, size, **kw))[0]


@pytest.mark.parametrize("kw", CIRCULAR)
@pytest.mark.parametrize("size", SIZES)
def test_fft_equals_iterative_equals_dense(kw, size):
    k = torch.randn(3, 2, 3, 3, generator=_gen(1), dtype=f64)
    fft = conv_opnorm(k, size, **kw)
    dense = _dense_sigma(k, size, kw)
    assert fft.method == "fft"
    assert abs(float(fft.sigma - dense)) <= 1e-13 * float(dense)
    assert float(fft.residual) <= 1e-13  # (u, v) is a real singular pair of the operator
    for method in ("lobpcg", "power", "dense"):
        r = conv_opnorm(k, size, **kw, method=method)
        assert r.method == method
        assert abs(float(r.sigma - fft.sigma)) <= 1e-12 * float(dense)


def test_fft_spectrum_equals_dense_spectrum():
    from trajlab.spectral.conv_fft import spectrum
    from trajlab.spectral.conv_geometry import conv_geometry

    k = torch.randn(2, 3, 3, 3, generator=_gen(2), dtype=f64)
    g = conv_geometry(k, (5, 6), padding=1, padding_mode="circular")
    fft = torch.sort(spectrum(k, g).reshape(-1), descending=True).values
    dense = torch.linalg.svdvals(conv_operator_matrix(k, (5, 6), padding=1,
                                                      padding_mode="circular"))
    # dense has C_out*H*W values, the FFT min(C_out, C_in)*H*W non-trivial ones (rest are 0)
    torch.testing.assert_close(dense[: fft.numel()], fft, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kw", OTHER)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", ["auto", "lobpcg", "power", "dense"])
def test_iterative_equals_dense(kw, size, method):
    k = torch.randn(3, 2, 3, 3, generator=_gen(3), dtype=f64)
    r = conv_opnorm(k, size, **kw, method=method)
    assert r.method == ("dense" if method == "auto" else method)  # tiny: auto builds the matrix
    assert abs(float(r.sigma - _dense_sigma(k, size, kw))) <= 1e-12 * float(r.sigma)
    assert r.u.shape == (3, *conv_operator(k, size, **kw)[2]) and r.v.shape == (2, *size)
    assert float(r.residual) <= 1e-10


@pytest.mark.parametrize("kw", CIRCULAR + OTHER)
def test_adjoint(kw):
    k = torch.randn(3, 2, 3, 3, generator=_gen(4), dtype=f64)
    fwd, adj, out = conv_operator(k, (5, 7), **kw)
    x = torch.randn(2, 2, 5, 7, generator=_gen(5), dtype=f64)
    y = torch.randn(2, 3, *out, generator=_gen(6), dtype=f64)
    torch.testing.assert_close((fwd(x) * y).sum(), (x * adj(y)).sum(), rtol=1e-13, atol=1e-13)


def test_fft_rejects_non_circulant():
    with pytest.raises(ValueError):
        conv_opnorm(torch.randn(2, 2, 3, 3), 6, padding=1, method="fft")


@pytest.mark.parametrize("kw", CIRCULAR + OTHER)
def test_gradient_vs_finite_differences(kw):
    k = torch.randn(3, 2, 3, 3, generator=_gen(7), dtype=f64)
    size = (5, 7)
    opts = dict(kw, max_iter=5000, tol=1e-14)

    def sig(kk):
        return conv_opnorm(kk, size, **opts).sigma

    G = conv_opnorm_grad(k, size, **kw, result=conv_opnorm(k, size, **opts))
    for seed in range(2):
        D = torch.randn(k.shape, generator=_gen(10 + seed), dtype=f64)
        assert rel((G * D).sum(), d1(sig, k, D)) <= 1e-6


@pytest.mark.parametrize("co,ci,size,kw", [
    (3, 2, (6, 6), dict(padding=1)),
    (2, 4, (5, 7), dict(padding=1)),
    (4, 4, (7, 5), dict(padding=(1, 2), dilation=(1, 2))),
])
def test_circular_hessian_vs_finite_differences(co, ci, size, kw):
    k = torch.randn(co, ci, 3, 3, generator=_gen(20), dtype=f64)
    D = torch.randn(3, co, ci, 3, 3, generator=_gen(21), dtype=f64)

    def sig(kk):
        return conv_opnorm(kk, size, padding_mode="circular", **kw).sigma

    r = conv_opnorm(k, size, padding_mode="circular", **kw)
    assert not bool(r.degenerate)
    H = conv_hessian_quadform(k, D, size, **kw, result=r)
    fd = torch.stack([d2(sig, k, d) for d in D])
    assert H.shape == (3,)
    assert rel(H, fd) <= 1e-6


def test_proxy_bounds_circular():
    for seed, shape in enumerate([(4, 3, 3, 3), (2, 5, 3, 3), (3, 3, 5, 5)]):
        k = torch.randn(shape, generator=_gen(30 + seed), dtype=f64)
        kh, kw = shape[-2:]
        exact = conv_opnorm(k, 8, padding=kh // 2, padding_mode="circular").sigma
        proxy = conv_matrix_proxy(k)
        assert float(proxy) <= float(exact) * (1 + 1e-12)
        assert float(exact) <= (kh * kw) ** 0.5 * float(proxy) * (1 + 1e-12)
    # both bounds attained: a single tap, and identical taps
    single = torch.zeros(1, 1, 3, 3, dtype=f64)
    single[0, 0, 1, 1] = 2.0
    same = torch.ones(1, 1, 3, 3, dtype=f64)
    for k, ratio in ((single, 1.0), (same, 3.0)):
        exact = conv_opnorm(k, 8, padding=1, padding_mode="circular").sigma
        assert abs(float(exact / conv_matrix_proxy(k)) - ratio) < 1e-12


def test_proxy_batched():
    k = torch.randn(2, 4, 3, 3, 3, generator=_gen(40), dtype=f64)
    ref = torch.stack([torch.linalg.svdvals(x.reshape(4, -1))[0] for x in k])
    torch.testing.assert_close(conv_matrix_proxy(k), ref)


@pytest.mark.parametrize("method", ["lobpcg", "power"])
def test_warm_start_equals_cold_start(method):
    k = torch.randn(4, 3, 3, 3, generator=_gen(41), dtype=f64)
    r0 = conv_opnorm(k, 8, padding=1, method=method, max_iter=3000)
    k1 = k + 1e-4 * torch.randn(k.shape, generator=_gen(42), dtype=f64)
    cold = conv_opnorm(k1, 8, padding=1, method=method, max_iter=3000)
    warm = conv_opnorm(k1, 8, padding=1, method=method, max_iter=3000, init=r0)
    assert warm.n_iter < cold.n_iter
    assert abs(float(warm.sigma - cold.sigma)) <= 1e-12 * float(cold.sigma)


@pytest.mark.parametrize("size", [(6, 6), (5, 7), (4, 5)])
def test_fft_gap_matches_full_spectrum(size):
    from trajlab.spectral.conv_fft import spectrum
    from trajlab.spectral.conv_geometry import conv_geometry

    k = torch.randn(3, 2, 3, 3, generator=_gen(50), dtype=f64)
    r = conv_opnorm(k, size, padding=1, padding_mode="circular")
    sv = spectrum(k, conv_geometry(k, size, padding=1, padding_mode="circular"))
    fh, fw = r.freq
    top = sv[..., 0].clone()
    second = sv[fh, fw, 1]
    top[fh, fw] = 0
    top[(-fh) % size[0], (-fw) % size[1]] = 0
    nxt = torch.maximum(top.max(), second)
    torch.testing.assert_close(r.gap, (r.sigma - nxt) / r.sigma)


def test_structural_frequency_tie_is_flagged():
    # dilation 2 on an even torus: f and f + N/2 share the same symbol
    k = torch.randn(2, 2, 3, 3, generator=_gen(51), dtype=f64)
    r = conv_opnorm(k, 6, padding=2, dilation=2, padding_mode="circular")
    assert bool(r.degenerate)
