"""Second derivatives of s_1: SVD form, resolvent form, projections, diagonal."""

import pytest
import torch
from spectral_fd import d2, rel, sigma1

from trajlab.spectral import (
    hessian_diag,
    hessian_quadform,
    hessian_quadform_proj,
    top_singular,
)

f64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _matrix(kind: str, seed: int) -> torch.Tensor:
    g = _gen(seed)
    if kind == "wide":
        return torch.randn(5, 9, generator=g, dtype=f64)
    if kind == "tall":
        return torch.randn(9, 5, generator=g, dtype=f64)
    if kind == "square":
        return torch.randn(6, 6, generator=g, dtype=f64)
    if kind == "rankdef_tall":
        return torch.randn(8, 2, generator=g, dtype=f64) @ torch.randn(2, 5, generator=g, dtype=f64)
    if kind == "rankdef_square":
        return torch.randn(6, 3, generator=g, dtype=f64) @ torch.randn(3, 6, generator=g, dtype=f64)
    if kind == "vector":
        return torch.randn(1, 6, generator=g, dtype=f64)
    raise KeyError(kind)


KINDS = ["wide", "tall", "square", "rankdef_tall", "rankdef_square", "vector"]


@pytest.mark.parametrize("kind", KINDS)
def test_svd_form_vs_finite_differences(kind):
    W = _matrix(kind, 1)
    D = torch.randn(5, *W.shape, generator=_gen(2), dtype=f64)
    H = hessian_quadform(W, D, method="svd")
    fd = torch.stack([d2(sigma1, W, d) for d in D])
    assert rel(H, fd) <= 1e-6
    assert bool((H >= -1e-12).all())  # s_1 is convex


@pytest.mark.parametrize("kind", KINDS)
def test_resolvent_equals_svd_form(kind):
    W = _matrix(kind, 3)
    D = torch.randn(7, *W.shape, generator=_gen(4), dtype=f64)
    a = hessian_quadform(W, D, method="svd")
    b = hessian_quadform(W, D, method="resolvent")
    assert rel(b, a) <= 1e-10


def test_resolvent_tight_and_batched_large():
    g = _gen(5)
    W = torch.randn(2, 300, 260, generator=g, dtype=f64)  # auto -> resolvent
    D = torch.randn(2, 16, 300, 260, generator=g, dtype=f64)
    a = hessian_quadform(W, D, method="svd")
    b = hessian_quadform(W, D, method="resolvent", tol=1e-14)
    c = hessian_quadform(W, D)
    assert rel(b, a) <= 1e-11
    assert rel(c, a) <= 1e-8


def test_proj_equals_full_and_reuses_svd():
    g = _gen(6)
    W = torch.randn(3, 7, 11, generator=g, dtype=f64)
    D = torch.randn(3, 4, 7, 11, generator=g, dtype=f64)
    svd = torch.linalg.svd(W, full_matrices=False)
    u1, v1 = svd[0][..., 0], svd[2][..., 0, :]
    Dv = torch.einsum("...bmn,...n->...bm", D, v1)
    Dtu = torch.einsum("...bmn,...m->...bn", D, u1)
    ref = hessian_quadform(W, D, method="svd")
    torch.testing.assert_close(hessian_quadform_proj(W, Dv, Dtu, svd=svd), ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(hessian_quadform_proj(W, Dv, Dtu), ref, rtol=1e-13, atol=0)
    top = top_singular(W)
    Dv = torch.einsum("...bmn,...n->...bm", D, top.V[..., 0])
    Dtu = torch.einsum("...bmn,...m->...bn", D, top.U[..., 0])
    res = hessian_quadform_proj(W, Dv, Dtu, method="resolvent", top=top)
    torch.testing.assert_close(res, ref, rtol=1e-10, atol=0)


def test_rank_one_direction_closed_form():
    W = torch.diag(torch.tensor([2.0, 1.0], dtype=f64))
    D = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]], dtype=f64)
    torch.testing.assert_close(hessian_quadform(W, D), torch.tensor([2.0 / 3.0], dtype=f64))


@pytest.mark.parametrize("kind", KINDS)
def test_diag_equals_explicit_hessian(kind):
    W = _matrix(kind, 7)
    m, n = W.shape
    H = torch.autograd.functional.hessian(sigma1, W).reshape(m * n, m * n)
    torch.testing.assert_close(hessian_diag(W), H.diagonal().reshape(m, n), rtol=1e-9, atol=1e-12)


def test_diag_equals_quadform_on_unit_matrices_batched():
    W = torch.randn(2, 4, 3, generator=_gen(8), dtype=f64)
    E = torch.eye(12, dtype=f64).reshape(12, 4, 3).expand(2, 12, 4, 3)
    q = hessian_quadform(W, E, method="svd").reshape(2, 4, 3)
    torch.testing.assert_close(hessian_diag(W), q, rtol=1e-12, atol=1e-14)


def test_degenerate_top_value_is_not_finite_silently():
    W = torch.diag(torch.tensor([1.0, 1.0, 0.5], dtype=f64))
    D = torch.randn(2, 3, 3, generator=_gen(9), dtype=f64)
    assert bool(top_singular(W).degenerate)
    assert not bool(torch.isfinite(hessian_quadform(W, D, method="svd")).all())


def test_resolvent_warns_if_capped():
    W = torch.randn(260, 260, generator=_gen(10), dtype=f64)
    D = torch.randn(2, 260, 260, generator=_gen(11), dtype=f64)
    with pytest.warns(RuntimeWarning, match="CG stopped"):
        hessian_quadform(W, D, method="resolvent", max_iter=2)


def test_float32_runs():
    W = torch.randn(6, 4, generator=_gen(12), dtype=f64)
    D = torch.randn(3, 6, 4, generator=_gen(13), dtype=f64)
    ref = hessian_quadform(W, D)
    for method in ("svd", "resolvent"):
        out = hessian_quadform(W.float(), D.float(), method=method)
        assert out.dtype == torch.float32
        top = top_singular(W)
        assert rel(out.double(), ref) <= 1e-3 / float(top.gap)
