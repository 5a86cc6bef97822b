"""Network terms of Z = log K_net (MATH.md §4) against dense joint-covariance references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sde_reference import F64, fd_second, jacobian, rel, sigma1
from torch import nn
from torch.func import functional_call, grad, vmap

from trajlab.sde import network_terms, sketch_layer_terms

LR = 0.05


def _mlp_terms(B=8, seed=0):
    """Layer terms and dense per-sample gradients of a 3-layer float64 tanh MLP."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(),
                          nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(B, 4, generator=gen, dtype=F64)
    Y = torch.randint(0, 3, (B,), generator=gen)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, Y)
    names = ["0.weight", "2.weight", "4.weight"]
    Ws = [params[k] for k in names]
    Gs = [per[k] for k in names]
    terms = []
    for W, G in zip(Ws, Gs):
        U, _S, Vh = torch.linalg.svd(W)
        k = min(W.shape)
        tensors = {"basis_u": U[:, :k], "basis_v": Vh[:k].T, "ps_proj_out": G @ Vh[:k].T,
                   "ps_proj_in": G.mT @ U[:, :k], "grad_sq_sum": G.square().sum(0)}
        g = G.mean(0)
        terms.append(sketch_layer_terms(W, g, -LR * g, LR, "subspace", tensors))
    stacked = {k: torch.stack([t[k] for t in terms]) for k in terms[0]}
    return Ws, Gs, stacked


def _net(stacked, B, **kw):
    return network_terms(stacked["K"], stacked["drift"], stacked["diffusion2"],
                         stacked["drift_noise"], stacked["noise_proj"], LR, B, **kw)


def test_network_terms_match_dense_joint_covariance():
    B = 8
    Ws, Gs, st = _mlp_terms(B)
    net = _net(st, B)
    # grad Z over all weights, and the joint (all-layer) covariance of the batch mean
    gradZ = torch.cat([(jacobian(W) / sigma1(W)).reshape(-1) for W in Ws])
    Om = torch.cat([(G - G.mean(0)).reshape(B, -1) for G in Gs], dim=1)
    Sigma = Om.T @ Om / (B * (B - 1))
    assert rel(net["logK_diffusion2"], LR * gradZ @ Sigma @ gradZ) <= 1e-8
    sizes = [W.numel() for W in Ws]
    blocks = torch.split(torch.arange(sum(sizes)), sizes)
    bd = sum(LR * gradZ[i] @ Sigma[i][:, i] @ gradZ[i] for i in blocks)
    assert rel(net["logK_diffusion2_blockdiag"], bd) <= 1e-8
    K = torch.stack([sigma1(W) for W in Ws])
    assert rel(net["K_net"], K.prod()) <= 1e-14 and rel(net["logK"], K.log().sum()) <= 1e-14
    mu = (st["drift"] / K - st["diffusion2"] / (2 * K * K)).sum()
    assert rel(net["logK_drift"], mu) <= 1e-14
    kappa = net["logK_noise_curvature"]
    assert float(kappa) > 0 and rel(kappa, (st["drift_noise"] / K).sum()) <= 1e-14


def test_single_layer_full_equals_blockdiag_and_nonnegative():
    B = 8
    _, _, st = _mlp_terms(B, seed=1)
    for layer in range(3):
        one = {k: v[layer:layer + 1] for k, v in st.items()}
        net = _net(one, B)
        assert rel(net["logK_diffusion2"], net["logK_diffusion2_blockdiag"]) <= 1e-13
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):   # any projections: the full form is a sum of squares
        c = torch.randn(4, B, generator=gen, dtype=F64)
        K = torch.rand(4, generator=gen, dtype=F64) + 0.5
        net = network_terms(K, K, K, K, c, LR, B)
        assert float(net["logK_diffusion2"]) >= 0


def test_discretisation_term_is_second_order_of_log_k():
    """Per step, 1/2 eta^2 d^2/de^2 log s_1(W - e grad) summed over layers, by FD."""
    Ws, Gs, st = _mlp_terms(8, seed=3)
    # Treating g as the full-data gradient: the plain second derivative of log K_net along g.
    disc_full = st["drift_discretization"] + st["drift_noise"]
    net = _net(st, 8, drift_flow=st["drift_flow"], drift_discretization=disc_full,
               flow_full_gradient=torch.ones_like(st["K"], dtype=torch.bool))
    ref = 0.0
    for W, G in zip(Ws, Gs):
        g = G.mean(0)
        K, d1 = sigma1(W), -(jacobian(W) * g).sum()
        ref = ref + 0.5 * LR * (fd_second(W, -g) / K - d1 ** 2 / K ** 2)
    assert rel(net["logK_discretization"], ref) <= 1e-7
    # From the batch gradient, both parts are debiased by the noise (MATH.md §4a).
    net_b = _net(st, 8, drift_flow=st["drift_flow"],
                 drift_discretization=st["drift_discretization"])
    debias = (-st["drift_noise"] / st["K"] + st["diffusion2"] / (2 * st["K"] ** 2)).sum()
    assert rel(net_b["logK_discretization"], ref + debias) <= 1e-7
    with pytest.raises(ValueError, match="together"):
        _net(st, 8, drift_flow=st["drift_flow"])


def test_network_shape_checks_and_batch_size():
    K = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        network_terms(K, K, K, K, torch.zeros(3, 1, dtype=F64), LR, 1)
    with pytest.raises(ValueError, match="samples"):
        network_terms(K, K, K, K, torch.zeros(3, 4, dtype=F64), LR, 5)
    with pytest.raises(ValueError, match="shape"):
        network_terms(K, K, K, K, torch.zeros(2, 4, dtype=F64), LR, 4)
    # leading step dimension
    gen = torch.Generator().manual_seed(0)
    Kt = torch.rand(5, 3, generator=gen, dtype=F64) + 1
    c = torch.randn(5, 3, 4, generator=gen, dtype=F64)
    net = network_terms(Kt, Kt, Kt, Kt, c, torch.full((5,), LR, dtype=F64), 4)
    for t in range(5):
        one = network_terms(Kt[t], Kt[t], Kt[t], Kt[t], c[t], LR, 4)
        for k in one:
            assert rel(net[k][t], one[k]) <= 1e-14
