"""Every conv geometry and method against the dense matrix of the PyTorch layer itself.

The references are built from ``torch.nn.functional`` exactly as the layers compute
(``F.pad(x, mode)`` then ``conv`` for non-zero padding modes, ``conv_transpose`` for transposed
layers), never from trajlab's operators. Also: relative tolerances, warnings, warm starts, series.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from spectral_fd import d1, rel

from trajlab.spectral import (
    conv_hessian_quadform,
    conv_operator,
    conv_operator_matrix,
    conv_opnorm,
    conv_opnorm_grad,
    conv_opnorm_series,
    conv_transpose_operator,
    conv_transpose_operator_matrix,
    conv_transpose_opnorm,
)

f64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny products: one thread each (two xdist workers on two cores must not oversubscribe)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
MODES = ["zeros", "circular", "reflect", "replicate"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tuple(x, d):
    return (x,) * d if isinstance(x, int) else tuple(x)


def torch_conv(kernel, x, *, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    """What ``nn.Conv1d``/``nn.Conv2d`` (bias removed) computes."""
    d = kernel.dim() - 2
    conv = F.conv1d if d == 1 else F.conv2d
    if padding_mode == "zeros":
        return conv(x, kernel, stride=stride, padding=padding, dilation=dilation)
    pad = [q for p in reversed(_tuple(padding, d)) for q in (p, p)]
    return conv(F.pad(x, pad, mode=padding_mode), kernel, stride=stride, dilation=dilation)


def torch_conv_transpose(kernel, x, *, stride=1, padding=0, output_padding=0, dilation=1):
    convt = F.conv_transpose1d if kernel.dim() == 3 else F.conv_transpose2d
    return convt(x, kernel, stride=stride, padding=padding, output_padding=output_padding,
                 dilation=dilation)


def matrix_of(fn, in_shape):
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=f64).reshape(n, *in_shape)
    return fn(eye).reshape(n, -1).mT


def s1(A):
    return float(torch.linalg.svdvals(A)[0])


CONV2D = [  # (input size, options)
    ((6, 6), dict(padding=1)),
    ((5, 7), dict(padding=1, stride=2)),
    ((7, 6), dict(padding=(1, 2), stride=(2, 1), dilation=(1, 2))),
    ((6, 5), dict(padding=0, stride=2)),
]
CONV1D = [(9, dict(padding=1)), (10, dict(padding=2, stride=2)), (11, dict(padding=2, dilation=2)),
          (8, dict(padding=1, stride=3))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size,kw", CONV2D + CONV1D)
def test_operator_and_dense_matrix_match_the_torch_layer(mode, size, kw):
    d = 1 if isinstance(size, int) else 2
    k = torch.randn(3, 2, *(3,) * d, generator=_gen(1), dtype=f64)
    fwd, adj, out = conv_operator(k, size, **kw, padding_mode=mode)
    x = torch.randn(4, 2, *_tuple(size, d), generator=_gen(2), dtype=f64)
    ref = torch_conv(k, x, **kw, padding_mode=mode)
    torch.testing.assert_close(fwd(x), ref, rtol=1e-14, atol=1e-14)
    assert tuple(ref.shape[2:]) == out
    y = torch.randn(ref.shape, generator=_gen(3), dtype=f64)
    torch.testing.assert_close((fwd(x) * y).sum(), (x * adj(y)).sum(), rtol=1e-13, atol=1e-13)
    A = matrix_of(lambda z: torch_conv(k, z, **kw, padding_mode=mode), (2, *_tuple(size, d)))
    torch.testing.assert_close(conv_operator_matrix(k, size, **kw, padding_mode=mode), A)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size,kw", CONV2D + CONV1D)
@pytest.mark.parametrize("method", ["auto", "lobpcg", "dense"])
def test_every_conv_geometry_and_method_equals_dense_sigma(mode, size, kw, method):
    d = 1 if isinstance(size, int) else 2
    k = torch.randn(3, 2, *(3,) * d, generator=_gen(4), dtype=f64)
    A = matrix_of(lambda z: torch_conv(k, z, **kw, padding_mode=mode), (2, *_tuple(size, d)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = conv_opnorm(k, size, **kw, padding_mode=mode, method=method)
    assert abs(float(r.sigma) - s1(A)) <= 1e-8 * s1(A)
    assert float(r.residual) <= 1e-10
    out = conv_operator(k, size, **kw, padding_mode=mode)[2]
    assert r.u.shape == (3, *out) and r.v.shape == (2, *_tuple(size, d))


@pytest.mark.parametrize("size,kw", [(9, dict(padding=1)), (8, dict(padding=2, dilation=2)),
                                     (7, dict(padding=2, dilation=1))])
def test_conv1d_circular_fft_equals_dense(size, kw):
    k = torch.randn(4, 3, 2 * kw["padding"] // kw.get("dilation", 1) + 1, generator=_gen(5),
                    dtype=f64)
    r = conv_opnorm(k, size, **kw, padding_mode="circular")
    A = matrix_of(lambda z: torch_conv(k, z, **kw, padding_mode="circular"), (3, size))
    assert r.method == "fft" and len(r.freq) == 1
    assert abs(float(r.sigma) - s1(A)) <= 1e-12 * s1(A)
    assert float(r.residual) <= 1e-13


TRANSPOSED = [  # (input size, options)
    ((4, 5), dict()),
    ((4, 5), dict(stride=2, padding=1, output_padding=1)),
    ((3, 4), dict(stride=(3, 2), padding=1, output_padding=(2, 1))),
    ((3, 4), dict(stride=2, padding=0, output_padding=2, dilation=3)),  # output_padding >= stride
    (6, dict(stride=2, padding=1, output_padding=1)),
    (5, dict(stride=3, dilation=2, output_padding=2)),
]


@pytest.mark.parametrize("size,kw", TRANSPOSED)
@pytest.mark.parametrize("method", ["auto", "lobpcg", "dense"])
def test_conv_transpose_equals_dense_sigma(size, kw, method):
    d = 1 if isinstance(size, int) else 2
    k = torch.randn(2, 3, *(3,) * d, generator=_gen(6), dtype=f64)  # (C_in, C_out, ...)
    fwd, adj, out = conv_transpose_operator(k, size, **kw)
    x = torch.randn(4, 2, *_tuple(size, d), generator=_gen(7), dtype=f64)
    ref = torch_conv_transpose(k, x, **kw)
    torch.testing.assert_close(fwd(x), ref, rtol=1e-14, atol=1e-14)
    assert tuple(ref.shape[2:]) == out
    y = torch.randn(ref.shape, generator=_gen(8), dtype=f64)
    torch.testing.assert_close((fwd(x) * y).sum(), (x * adj(y)).sum(), rtol=1e-13, atol=1e-13)
    A = matrix_of(lambda z: torch_conv_transpose(k, z, **kw), (2, *_tuple(size, d)))
    torch.testing.assert_close(conv_transpose_operator_matrix(k, size, **kw), A)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = conv_transpose_opnorm(k, size, **kw, method=method)
    assert abs(float(r.sigma) - s1(A)) <= 1e-8 * s1(A)
    assert r.v.shape == (2, *_tuple(size, d)) and r.u.shape == (3, *out)


@pytest.mark.parametrize("method", ["lobpcg", "dense"])
def test_conv_transpose_is_the_adjoint_convolution(method):
    # ConvTranspose2d(stride 2, padding 1, output_padding 1) on 5x5 == Conv2d on its 10x10 output
    k = torch.randn(4, 3, 3, 3, generator=_gen(9), dtype=f64)
    t = conv_transpose_opnorm(k, 5, stride=2, padding=1, output_padding=1, method=method)
    c = conv_opnorm(k, 10, stride=2, padding=1, method=method)
    assert abs(float(t.sigma - c.sigma)) <= 1e-11 * float(c.sigma)


@pytest.mark.parametrize("scale", [1e6, 1.0, 1e-6])
@pytest.mark.parametrize("method", ["lobpcg", "power"])
def test_relative_tolerance_is_scale_free(scale, method):
    """The former absolute tolerance (1e-13) could never be met by a large kernel."""
    k = torch.randn(4, 3, 3, 3, generator=_gen(10), dtype=f64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        base = conv_opnorm(k, 8, padding=1, method=method)
        r = conv_opnorm(scale * k, 8, padding=1, method=method)
    assert float(r.residual) <= 1e-10
    assert abs(float(r.sigma) / (scale * float(base.sigma)) - 1) <= 1e-12
    assert abs(r.n_iter - base.n_iter) <= 2


def test_default_tolerance_is_relative_1e10_and_float32_works():
    k = torch.randn(4, 3, 3, 3, generator=_gen(11), dtype=f64)
    ref = conv_opnorm(k, 8, padding=1, method="dense").sigma
    r = conv_opnorm(k, 8, padding=1, method="lobpcg")
    assert 1e-12 < float(r.residual) <= 1e-10  # stopped at the default, not at rounding level
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r32 = conv_opnorm(k.float(), 8, padding=1, method="lobpcg")
    assert r32.sigma.dtype == torch.float32 and float(r32.residual) <= 1e3 * 1.2e-7
    assert abs(float(r32.sigma) / float(ref) - 1) <= 1e-5


def test_not_converged_warns_with_the_relative_residual():
    k = torch.randn(4, 3, 3, 3, generator=_gen(12), dtype=f64)
    with pytest.warns(RuntimeWarning, match=r"relative residual \d\.\d\de-\d\d > tol=1\.0e-10"):
        r = conv_opnorm(k, 8, padding=1, method="lobpcg", max_iter=2)
    assert float(r.residual) > 1e-10 and r.n_iter == 2


def test_warm_start_converges_in_few_iterations_and_equals_cold():
    k = torch.randn(4, 3, 3, 3, generator=_gen(13), dtype=f64)
    ks = k + 1e-6 * torch.randn(5, *k.shape, generator=_gen(14), dtype=f64).cumsum(0)
    prev = conv_opnorm(k, 10, padding=1, method="lobpcg")
    for kt in ks:
        cold = conv_opnorm(kt, 10, padding=1, method="lobpcg")
        warm = conv_opnorm(kt, 10, padding=1, method="lobpcg", init=prev)
        assert abs(float(warm.sigma - cold.sigma)) <= 1e-12 * float(cold.sigma)
        assert warm.n_iter <= cold.n_iter // 2
        prev = warm


def test_series_equals_individual_solves_and_skips_non_finite():
    k = torch.randn(3, 2, 3, 3, generator=_gen(15), dtype=f64)
    ks = k + 1e-3 * torch.randn(4, *k.shape, generator=_gen(16), dtype=f64).cumsum(0)
    ks[2, 0, 0, 0, 0] = float("nan")
    ser = conv_opnorm_series(ks, (9, 8), padding=1, stride=2, padding_mode="reflect",
                             method="lobpcg")
    assert ser.method == "lobpcg" and ser.sigma.shape == (4,)
    assert math.isnan(float(ser.sigma[2])) and int(ser.n_iter[2]) == 0
    for t in (0, 1, 3):
        one = conv_opnorm(ks[t], (9, 8), padding=1, stride=2, padding_mode="reflect")
        assert abs(float(ser.sigma[t] - one.sigma)) <= 1e-12 * float(one.sigma)
        assert float(ser.residual[t]) <= 1e-10
    assert ser.last is not None and float(ser.last.sigma) == float(ser.sigma[3])
    more = conv_opnorm_series(ks[3:], (9, 8), padding=1, stride=2, padding_mode="reflect",
                              method="lobpcg", init=ser.last)
    assert int(more.n_iter[0]) <= 1  # the same kernel again: already converged


def test_series_of_conv1d_kernels():
    ks = torch.randn(3, 4, 2, 3, generator=_gen(17), dtype=f64)
    ser = conv_opnorm_series(ks, 12, padding=1, padding_mode="replicate")
    for t, k in enumerate(ks):
        A = conv_operator_matrix(k, 12, padding=1, padding_mode="replicate")
        assert abs(float(ser.sigma[t]) - s1(A)) <= 1e-8 * s1(A)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "zeros"])
@pytest.mark.parametrize("d", [1, 2])
def test_gradient_of_new_geometries_vs_finite_differences(mode, d):
    k = torch.randn(3, 2, *(3,) * d, generator=_gen(18), dtype=f64)
    size = 7 if d == 1 else (5, 6)
    kw = dict(padding=1, stride=2, padding_mode=mode)

    def sig(kk):
        return conv_opnorm(kk, size, **kw).sigma

    r = conv_opnorm(k, size, **kw)
    assert not bool(r.degenerate)
    G = conv_opnorm_grad(k, size, **kw, result=r)
    assert G.shape == k.shape
    D = torch.randn(k.shape, generator=_gen(19), dtype=f64)
    assert rel((G * D).sum(), d1(sig, k, D)) <= 1e-6


def test_conv1d_circular_hessian_vs_finite_differences():
    from spectral_fd import d2

    k = torch.randn(3, 2, 3, generator=_gen(20), dtype=f64)
    D = torch.randn(2, 3, 2, 3, generator=_gen(21), dtype=f64)

    def sig(kk):
        return conv_opnorm(kk, 9, padding=1, padding_mode="circular").sigma

    r = conv_opnorm(k, 9, padding=1, padding_mode="circular")
    assert not bool(r.degenerate)
    H = conv_hessian_quadform(k, D, 9, padding=1, result=r)
    assert rel(H, torch.stack([d2(sig, k, dd) for dd in D])) <= 1e-6


def test_invalid_geometries_raise():
    k = torch.randn(2, 2, 3, 3, dtype=f64)
    with pytest.raises(ValueError, match="padding_mode"):
        conv_opnorm(k, 6, padding=1, padding_mode="symmetric")
    with pytest.raises(ValueError, match="reflect"):
        conv_opnorm(k, 3, padding=3, padding_mode="reflect")
    with pytest.raises(ValueError, match="output_padding"):
        conv_transpose_opnorm(k, 4, stride=2, output_padding=2)
    with pytest.raises(ValueError, match="fft"):
        conv_opnorm(k, 6, padding=1, padding_mode="reflect", method="fft")
    with pytest.raises(ValueError, match="init does not fit"):
        conv_opnorm(k, 8, padding=1, method="lobpcg", init=conv_opnorm(k, 6, padding=1))
    with pytest.raises(ValueError, match="kernel must be"):
        conv_opnorm(torch.randn(2, 2), 6)


def test_zero_kernel():
    for method in ("auto", "lobpcg", "dense", "power"):
        r = conv_opnorm(torch.zeros(2, 3, 3, 3, dtype=f64), 6, padding=1, method=method)
        assert float(r.sigma) == 0 and float(r.residual) == 0 and bool(r.degenerate)
