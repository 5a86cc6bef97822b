"""The layer kernels' shared end terms (trajlab/sde/epilogue.py) and the keys they return."""

from __future__ import annotations

import math

import pytest
import torch
from sde_reference import F64, rank1_sketch

from trajlab.analysis.variables import LAYER_KEYS, VARIABLES
from trajlab.sde import (
    diagonal_layer_terms,
    layer_epilogue,
    noise_free_terms,
    resolvent_layer_terms,
    sketch_layer_terms,
)
from trajlab.sde.epilogue import flow_gradient

#: What the noise-free kernels return (MATH.md §3–§5 without a noise estimate).
NOISE_FREE = {"K", "spectral_gap", "degenerate", "flow_full_gradient", "drift_flow",
              "drift_discretization", "pathwise_increment", "pathwise_first_order",
              "drift_optimizer"}


def test_layer_keys_are_the_registry_kernel_variables():
    # the hand-written list LAYER_KEYS was before it was derived, less "alignment" (a
    # diagnostic of layer_terms, no analysis variable)
    assert set(LAYER_KEYS) == NOISE_FREE | {
        "drift_noise", "drift_noise_var", "drift_noise_cov", "drift", "diffusion2",
        "diffusion2_var", "diffusion2_cov", "noise_proj"}
    assert all(VARIABLES[k].stage == "layer" for k in LAYER_KEYS)
    assert "alignment" not in LAYER_KEYS


def _inputs(T=3, m=4, n=5, B=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(T, m, n, generator=gen, dtype=F64)
    sk = [rank1_sketch(gen, B, m, n) for _ in range(T)]
    tensors = {k: torch.stack([s[0][k] for s in sk]) for k in sk[0][0]}
    g = torch.stack([s[1].mean(0) for s in sk])
    return W, g, -0.05 * g, torch.full((T,), 0.05, dtype=F64), tensors


def test_every_kernel_returns_the_registry_keys():
    W, g, upd, lr, tensors = _inputs()
    gamma, vals = torch.tensor([[0.5, -1.5, 1.0]] * 3, dtype=F64), torch.randn(3, 4, 3, dtype=F64)
    dg = vals.mean(1)
    full = [
        sketch_layer_terms(W[0], g[0], upd[0], 0.05, "rank1", {k: v[0] for k, v in
                                                              tensors.items()}),
        resolvent_layer_terms(W, g, upd, lr, sketch="rank1", tensors=tensors),
        diagonal_layer_terms(gamma, dg, -0.05 * dg, lr, ps_diag=vals),
    ]
    for out in full:
        assert set(LAYER_KEYS) <= set(out)
    free = [noise_free_terms(W[0], g[0], upd[0], 0.05),
            resolvent_layer_terms(W, g, upd, lr),
            diagonal_layer_terms(gamma, dg, -0.05 * dg, lr)]
    for out in free:
        assert set(out) == NOISE_FREE


def test_epilogue_against_values_by_hand():
    one = torch.tensor([1.0, 1.0, 1.0], dtype=F64)
    eta = torch.tensor([0.1, 0.0, 0.2], dtype=F64)
    used = torch.tensor([True, False, False])
    p1, p2, plain = torch.tensor([0.3, 0.5, -0.2], dtype=F64), 0.4 * one, -0.1 * one
    disc, dn = 0.7 * one, 0.25 * one
    common = {"K": 2 * one, "gap": torch.tensor([0.5, 1e-4, 0.1], dtype=F64), "gap_tol": 1e-3,
              "used_full": used, "flow": 0.6 * one, "disc_raw": disc, "p1": p1, "p2": p2,
              "plain": plain, "eta": eta}
    free = layer_epilogue(**common)
    assert free["degenerate"].tolist() == [False, True, False]
    assert free["drift_flow"].tolist() == [-0.6] * 3
    assert free["pathwise_increment"].tolist() == pytest.approx([0.5, 0.7, 0.0])
    assert free["drift_optimizer"].tolist() == pytest.approx([4.0, 0.0, -0.5])   # (p1-plain)/eta
    assert free["drift_discretization"][0] == 0.7
    assert all(math.isnan(x) for x in free["drift_discretization"][1:].tolist())
    noisy = layer_epilogue(**common, noise={
        "drift_noise": dn, "drift_noise_var": 0.1 * one, "diffusion2": 0.9 * one,
        "diffusion2_var": 0.5 * one, "noise_proj": torch.zeros(3, 4, dtype=F64)})
    assert noisy["drift_discretization"].tolist() == pytest.approx([0.7, 0.45, 0.45])
    assert noisy["drift"].tolist() == pytest.approx([-0.35] * 3)
    assert noisy["drift_noise_cov"].tolist() == pytest.approx([0.15] * 3)
    assert noisy["diffusion2_cov"].tolist() == pytest.approx([0.4] * 3)


def test_flow_gradient_falls_back_where_the_full_gradient_is_not_finite():
    g = torch.zeros(3, 2, 2, dtype=F64)
    full = torch.ones(3, 2, 2, dtype=F64)
    full[1, 0, 1] = float("nan")
    grad, used = flow_gradient(g, full)
    assert used.tolist() == [True, False, True]
    assert grad[:, 0, 0].tolist() == [1.0, 0.0, 1.0]
    grad, used = flow_gradient(g[:, 0], full[:, 0], matrix_dims=1)
    assert used.tolist() == [True, False, True]
    assert not flow_gradient(g, None)[1].any()
