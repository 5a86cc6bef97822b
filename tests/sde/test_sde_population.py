"""The finite-population factor of batches drawn without replacement, by exact enumeration
(MATH.md §1): averaged over every batch of a small data set, the one-batch noise estimate
times (N - B) / N equals the exact covariance of the batch mean."""

from __future__ import annotations

import itertools

import pytest
import torch
from sde_reference import F64, rank1_sketch

from trajlab.sde import noise_scale, sketch_layer_terms


def test_one_batch_estimate_is_unbiased_with_the_n_minus_b_over_n_factor():
    N, B, d = 7, 3, 4
    g = torch.randn(N, d, generator=torch.Generator().manual_seed(0), dtype=F64)
    batches = list(itertools.combinations(range(N), B))
    means = torch.stack([g[list(S)].mean(0) for S in batches])
    exact = torch.cov(means.T, correction=0)  # Cov of the batch mean over all batches
    fpc, scale = noise_scale(B, population=N)
    assert fpc == pytest.approx((N - B) / N)
    est = torch.zeros(d, d, dtype=F64)
    for S in batches:
        om = g[list(S)] - g[list(S)].mean(0)
        est += scale * om.T @ om
    est /= len(batches)
    torch.testing.assert_close(est, exact, rtol=1e-12, atol=1e-15)
    old = est * (N / (N - 1))  # the (N - B) / (N - 1) factor: 7/6 too large here
    assert float((old / exact).diagonal().mean()) == pytest.approx(7 / 6)


def test_layer_diffusion_averaged_over_all_batches_is_the_exact_variance():
    N, B, m, n, lr = 7, 3, 4, 5, 0.1
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(m, n, generator=gen, dtype=F64)
    tensors, G = rank1_sketch(gen, N, m, n)  # one gradient per data-set sample
    U, _, Vh = torch.linalg.svd(W)
    u1, v1 = U[:, 0], Vh[0]
    proj = torch.einsum("m,imn,n->i", u1, G, v1)  # u1^T G_i v1
    batches = list(itertools.combinations(range(N), B))
    exact = torch.var(torch.stack([proj[list(S)].mean() for S in batches]), correction=0)
    avg = 0.0
    for S in batches:
        t = {k: v[list(S)] for k, v in tensors.items()}
        g = G[list(S)].mean(0)
        out = sketch_layer_terms(W, g, -lr * g, lr, "rank1", t, population=N)
        avg += float(out["diffusion2"]) / len(batches)
    assert avg / lr == pytest.approx(float(exact), rel=1e-12)  # s^2 = eta Var(u1^T g v1)
