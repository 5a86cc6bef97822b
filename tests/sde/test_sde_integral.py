"""Integrals over steps, log-normal prediction, Euler–Maruyama and the pathwise check (§4–§5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sde_reference import F64, rel, sigma1
from torch import nn

from trajlab.sde import euler_maruyama, integrate, logK_prediction, pathwise, pathwise_increment


def test_integrate_conventions():
    rates = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=F64)
    lr = torch.tensor([0.1, 0.2, 0.5], dtype=F64)
    grid = integrate(rates, lr)
    assert grid.shape == (4, 2) and grid[0].tolist() == [0.0, 0.0]
    assert rel(grid[-1], (rates * lr[:, None]).sum(0)) <= 1e-15
    assert torch.equal(integrate(rates, lr, at="start"), grid[:-1])
    assert torch.equal(integrate(rates, lr, at="end"), grid[1:])
    with pytest.raises(ValueError, match="steps"):
        integrate(rates, lr[:2])
    with pytest.raises(ValueError, match="at must be"):
        integrate(rates, lr, at="middle")


def test_prediction_with_constant_coefficients():
    T, eta, mu, s2 = 40, 0.05, 0.3, 0.2
    pred = logK_prediction(1.5, torch.full((T,), mu, dtype=F64),
                           torch.full((T,), s2, dtype=F64), torch.full((T,), eta, dtype=F64))
    t = pred["time"]
    assert rel(t[-1], torch.tensor(T * eta)) <= 1e-14
    assert rel(pred["logK_pred_mean"], 1.5 + mu * t) <= 1e-14
    assert rel(pred["logK_pred_var"][1:], s2 * t[1:]) <= 1e-14
    assert float(pred["K_pred_lower"][-1]) < float(pred["K_pred_median"][-1]) < float(
        pred["K_pred_upper"][-1])


def test_euler_maruyama_matches_prediction():
    T, n = 30, 40_000
    gen = torch.Generator().manual_seed(0)
    lr = torch.rand(T, generator=gen, dtype=F64) * 0.1 + 0.01
    mu = torch.randn(T, generator=gen, dtype=F64)
    s2 = torch.rand(T, generator=gen, dtype=F64)
    state = torch.get_rng_state()
    paths = euler_maruyama(0.7, mu, s2, lr, n_paths=n, seed=1)
    assert torch.equal(torch.get_rng_state(), state)              # no global RNG
    assert paths.shape == (n, T + 1) and bool((paths[:, 0] == 0.7).all())
    pred = logK_prediction(0.7, mu, s2, lr)
    m, v = pred["logK_pred_mean"][-1], pred["logK_pred_var"][-1]
    assert abs(float(paths[:, -1].mean() - m)) <= 4 * math.sqrt(float(v) / n)
    assert abs(float(paths[:, -1].var() / v) - 1) <= 4 * math.sqrt(2 / (n - 1))
    # every grid point, not only the last
    assert float(((paths.mean(0) - pred["logK_pred_mean"]).abs()
                  / (pred["logK_pred_var"].clamp_min(1e-12) / n).sqrt())[1:].max()) <= 5
    # reproducible from the seed or an explicit generator
    again = euler_maruyama(0.7, mu, s2, lr, n_paths=n,
                           generator=torch.Generator().manual_seed(1))
    assert torch.equal(paths, again)
    with pytest.raises(ValueError, match="exactly one"):
        euler_maruyama(0.7, mu, s2, lr, n_paths=2)
    with pytest.raises(ValueError, match="non-negative"):
        euler_maruyama(0.7, mu, -s2, lr, n_paths=2, seed=0)


def test_pathwise_reconstruction_tracks_measured_k():
    """Tiny float64 MLP, plain SGD: K(0) + sum of second-order increments tracks s_1(W_t)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 6, generator=gen, dtype=F64)
    Y = torch.randint(0, 4, (64,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    layers = [model[0], model[2]]
    T = 200
    Ws = [[] for _ in layers]
    for _ in range(T):
        Ws_step = [m.weight.detach().clone() for m in layers]
        idx = torch.randint(0, 64, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
        for lst, W in zip(Ws, Ws_step):
            lst.append(W)
    for lst, m in zip(Ws, layers):
        W = torch.stack(lst)                                   # (T, m, n) before each step
        W_after = torch.cat([W[1:], m.weight.detach()[None]])
        inc = pathwise_increment(W, W_after - W)               # batched over steps
        K = pathwise(sigma1(W[0]), inc)
        measured = torch.cat([torch.linalg.matrix_norm(W, ord=2),
                              sigma1(m.weight.detach())[None]])
        change = float((measured[-1] - measured[0]).abs())
        err2 = float((K - measured).abs().max() / measured[-1])
        u1, v1 = _top_pair(W)
        first = pathwise(sigma1(W[0]), torch.einsum("tm,tmn,tn->t", u1, W_after - W, v1))
        err1 = float((first[-1] - measured[-1]).abs() / measured[-1])
        assert change / float(measured[-1]) > 0.01            # K actually moved
        assert err2 <= 5e-3 and err2 < err1 / 3, (err2, err1)


def _top_pair(W):
    U, _, Vh = torch.linalg.svd(W)
    return U[..., :, 0], Vh[..., 0, :]
