"""Per-sample projections and diag(Sigma) from both sketch kinds against dense G_i."""

from __future__ import annotations

import pytest
import torch
from sde_reference import F64, rank1_sketch, rel, subspace_sketch

from trajlab.sde import noise_diag, per_sample_directions, sketch_batch_size, sketch_coverage


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _dense_diag(G):
    B = G.shape[0]
    Om = G - G.mean(0)
    return Om.square().sum(0) / (B * (B - 1))


def test_rank1_directions_and_diag():
    gen = _gen(0)
    tensors, G = rank1_sketch(gen, 7, 4, 6)
    u1 = torch.randn(4, generator=gen, dtype=F64)
    v1 = torch.randn(6, generator=gen, dtype=F64)
    Gv, Gtu = per_sample_directions("rank1", tensors, u1, v1)
    assert rel(Gv, G @ v1) <= 1e-14 and rel(Gtu, G.mT @ u1) <= 1e-14
    assert rel(noise_diag("rank1", tensors, G.mean(0)), _dense_diag(G)) <= 1e-12
    assert sketch_batch_size("rank1", tensors) == 7


def test_subspace_directions_exact_in_span_and_coverage_outside():
    gen = _gen(1)
    B, m, n, k = 5, 6, 8, 3
    G = torch.randn(B, m, n, generator=gen, dtype=F64)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64)).Q
    tensors = subspace_sketch(G, U, V)
    u1, v1 = U @ torch.tensor([0.6, 0.0, 0.8], dtype=F64), V[:, 1]
    Gv, Gtu = per_sample_directions("subspace", tensors, u1, v1)
    assert rel(Gv, G @ v1) <= 1e-14 and rel(Gtu, G.mT @ u1) <= 1e-14
    cu, cv = sketch_coverage("subspace", tensors, u1, v1)
    assert float(cu) == pytest.approx(1.0) and float(cv) == pytest.approx(1.0)
    # a vector half outside span V: coverage reports it, the projection drops that half
    w = torch.randn(n, generator=gen, dtype=F64)
    w = w - V @ (V.T @ w)
    v_out = (V[:, 0] + w / w.norm()) / 2 ** 0.5
    _, cv = sketch_coverage("subspace", tensors, u1, v_out)
    assert float(cv) == pytest.approx(2 ** -0.5)
    Gv, _ = per_sample_directions("subspace", tensors, u1, v_out)
    assert rel(Gv, G @ (V @ (V.T @ v_out))) <= 1e-14
    assert rel(noise_diag("subspace", tensors, G.mean(0)), _dense_diag(G)) <= 1e-12
    assert sketch_batch_size("subspace", tensors) == B


def test_leading_step_dimension():
    gen = _gen(2)
    parts = [rank1_sketch(gen, 4, 3, 5) for _ in range(3)]
    tensors = {k: torch.stack([t[k] for t, _ in parts]) for k in parts[0][0]}
    G = torch.stack([G for _, G in parts])
    u1 = torch.randn(3, 3, generator=gen, dtype=F64)
    v1 = torch.randn(3, 5, generator=gen, dtype=F64)
    Gv, Gtu = per_sample_directions("rank1", tensors, u1, v1)
    assert rel(Gv, torch.einsum("tbmn,tn->tbm", G, v1)) <= 1e-14
    assert rel(Gtu, torch.einsum("tbmn,tm->tbn", G, u1)) <= 1e-14
    assert rel(noise_diag("rank1", tensors, G.mean(1)), (G - G.mean(1, keepdim=True)).square()
               .sum(1) / 12) <= 1e-12


def test_bad_inputs():
    gen = _gen(3)
    tensors, G = rank1_sketch(gen, 4, 3, 5)
    with pytest.raises(ValueError, match="unknown sketch"):
        per_sample_directions("dense", tensors, torch.ones(3), torch.ones(5))
    with pytest.raises(ValueError, match="missing"):
        per_sample_directions("subspace", tensors, torch.ones(3), torch.ones(5))
    with pytest.raises(ValueError, match="holds 4 samples"):
        noise_diag("rank1", tensors, G.mean(0), batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        noise_diag("subspace", {"grad_sq_sum": G.square().sum(0)}, G.mean(0))


def test_a_kind_or_its_name():
    """Every function takes the registered kind itself as well as its name."""
    from trajlab.sketches import sketch_kind

    gen = _gen(3)
    tensors, G = rank1_sketch(gen, 5, 3, 4)
    u1 = torch.randn(3, generator=gen, dtype=F64)
    v1 = torch.randn(4, generator=gen, dtype=F64)
    kind = sketch_kind("rank1")
    Gv, Gtu = per_sample_directions(kind, tensors, u1, v1)
    assert rel(Gv, G @ v1) <= 1e-14 and rel(Gtu, G.mT @ u1) <= 1e-14
    assert rel(noise_diag(kind, tensors, G.mean(0)), _dense_diag(G)) <= 1e-12
    assert sketch_batch_size(kind, tensors) == 5
    with pytest.raises(ValueError, match="no per-sample information"):
        sketch_batch_size(sketch_kind("none"), tensors)
