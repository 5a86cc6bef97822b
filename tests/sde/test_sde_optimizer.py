"""Forward predictions per optimizer (trajlab.sde.optimizer, docs/math.md §8) against float64
Monte-Carlo: many batches drawn from the same state (MATH.md §7's one-step check, per optimizer),
and a short multi-step ensemble for the transfer of noise through the optimizer's fast state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trajlab.sde.optimizer import (
    OptimizerSpec,
    adam_preconditioner,
    expected_clip_factor,
    forward_prediction,
    preconditioned_noise_terms,
    transfer_weights,
)
from trajlab.spectral import hessian_quadform_proj

F64 = torch.float64
SPECS = {
    "sgd": OptimizerSpec("sgd", weight_decay=0.05),
    "momentum": OptimizerSpec("momentum", momentum=0.9, dampening=0.1, weight_decay=0.05),
    "nesterov": OptimizerSpec("momentum", momentum=0.8, nesterov=True),
    "adam": OptimizerSpec("adam", weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8),
    "adamw": OptimizerSpec("adamw", weight_decay=0.05, betas=(0.8, 0.99), eps=1e-8),
}


def _population(seed: int, N: int = 40, m: int = 6, n: int = 5, mean: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=F64)
    G = torch.randn(N, m, n, generator=g, dtype=F64) + mean * torch.randn(m, n, generator=g,
                                                                          dtype=F64)
    return W, G


def _sigma1(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(W, ord=2)


def _step(spec: OptimizerSpec, W, g, state, t, lr):
    """One PyTorch-rule optimizer step for a batch of gradients g (M, m, n): (W', state')."""
    lam = spec.weight_decay
    if spec.kind in ("sgd", "momentum"):
        gt = g + lam * W
        if spec.kind == "sgd":
            return W - lr * gt, state
        mu, d = spec.momentum, spec.dampening
        b = gt.clone() if state is None else mu * state + (1 - d) * gt
        upd = gt + mu * b if spec.nesterov else b
        return W - lr * upd, b
    b1, b2 = spec.betas
    m_, v_ = state
    gt = g + spec.l2 * W
    m_ = b1 * m_ + (1 - b1) * gt
    v_ = b2 * v_ + (1 - b2) * gt * gt
    mh, vh = m_ / (1 - b1 ** (t + 1)), v_ / (1 - b2 ** (t + 1))
    Wd = W * (1 - lr * spec.decoupled)
    return Wd - lr * mh / (vh.sqrt() + spec.eps), (m_, v_)


def test_sgd_transfer_is_the_left_point_integral():
    rng = np.random.default_rng(0)
    flow, noise, d2, dt = rng.normal(size=7), rng.normal(size=7), rng.random(7), rng.random(7)
    mean, var = forward_prediction(flow, noise, d2, dt, spec=OptimizerSpec(), steps=np.arange(7))
    inc = np.concatenate([[0.0], np.cumsum((flow + noise) * dt)[:-1]])
    np.testing.assert_allclose(mean, inc, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(var, np.concatenate([[0.0], np.cumsum(d2 * dt)[:-1]]),
                               rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam"])
def test_transfer_matches_the_unrolled_recursion(name):
    """A_{s,T} from transfer_weights == the coefficient with which a unit gradient injected at
    step s moves the weights by step T, found by running the optimizer's own linear recursion
    (Adam with P = 1: only its first moment is linear)."""
    spec = SPECS[name]
    T = 25
    steps = np.arange(3, 3 + T)
    dt = 0.01 * (1 + np.arange(T) % 3)
    from trajlab.sde.optimizer import _transfer_rows

    first, rest, gain, ratio = _transfer_rows(spec, steps, 1)
    P, K = transfer_weights(dt, first, rest, gain, ratio, tol=1e-30)
    for s in (0, 4, 11):
        moved, buf = 0.0, None
        for i in range(T):
            x = 1.0 if i == s else 0.0
            t = steps[i]
            if spec.kind == "momentum":
                mu, d = spec.momentum, spec.dampening
                buf = x if buf is None else mu * buf + (1 - d) * x
                upd = x + mu * buf if spec.nesterov else buf
            else:
                b1 = spec.betas[0]
                buf = (1 - b1) * x + b1 * (buf or 0.0)
                upd = buf / (1 - b1 ** (t + 1))
            moved += dt[i] * upd
            if i >= s and i - s <= K:
                assert P[s, i - s] == pytest.approx(moved, rel=1e-12, abs=1e-15), (s, i)


def _one_step_prediction(spec, W, G, B, state, t, lr):
    """Predicted mean and variance of sigma_1(W') - sigma_1(W) for one step, from the module's
    terms: expected update from the state and the expected gradient, the noise with its
    coefficient c_{t,0}, the population covariance of a with-replacement batch."""
    N = G.shape[0]
    gbar = G.mean(0)
    if spec.preconditioned:
        m_, v_ = state
        var_pop = ((G - gbar) ** 2).mean(0) / B
        gt_mean = gbar + spec.l2 * W
        P = adam_preconditioner(v_, gt_mean**2 + var_pop, t, spec)
        b1 = spec.betas[0]
        Ed = P * (b1 * m_ + (1 - b1) * gt_mean) / (1 - b1 ** (t + 1))
        c0 = (1 - b1) / (1 - b1 ** (t + 1))
        Ed = Ed + spec.decoupled * W
    else:
        P = torch.ones_like(W)
        gt_mean = gbar + spec.l2 * W
        if spec.kind == "sgd":
            Ed, c0 = gt_mean, 1.0
        else:
            mu, d = spec.momentum, spec.dampening
            Eb = mu * state + (1 - d) * gt_mean
            Ed = gt_mean + mu * Eb if spec.nesterov else Eb
            c0 = 1 + mu * (1 - d) if spec.nesterov else 1 - d
    terms = preconditioned_noise_terms(W, P, Ed / P, G, torch.tensor(lr, dtype=F64))
    rescale = (N - 1) / B  # the population's 1/(N(N-1)) estimate -> Cov of a B-sample mean
    svd = torch.linalg.svd(W, full_matrices=False)
    u, v = svd[0][:, 0], svd[2][0, :]
    D = -lr * Ed
    second = hessian_quadform_proj(W, (D @ v)[None], (D.mT @ u)[None], svd=svd)[0]
    mean = lr * (terms["flow"] + c0**2 * rescale * terms["drift_noise"]) + 0.5 * second
    var = lr * c0**2 * rescale * terms["diffusion2"]
    return float(mean), float(var), c0



@pytest.mark.parametrize("name", list(SPECS))
def test_one_step_against_monte_carlo(name):
    """MATH.md §7's one-step check per optimizer: 200,000 batches drawn (with replacement)
    from the same state; the empirical mean and variance of the change of sigma_1 against the
    predicted drift (+ the discretisation term) and diffusion. The noise-curvature part is
    checked on its own: the mean change minus the deterministic part."""
    spec = SPECS[name]
    if spec.preconditioned:  # beta1 < 0.9, so that the step's noise (c = 1 - beta1) is resolved
        spec = OptimizerSpec(spec.kind, weight_decay=0.05, betas=(0.4, 0.999))
    W, G = _population(1)
    N, B, M, lr, t = G.shape[0], 4, 200_000, 0.02, 500
    g = torch.Generator().manual_seed(2)
    if spec.preconditioned:
        v0 = (G**2).mean(0) * (1 - spec.betas[1] ** t)  # a history of E[g^2]
        state = (0.2 * G.mean(0), v0)
    elif spec.kind == "momentum":
        state = 0.5 * G.mean(0) + 0.1 * G[0]
    else:
        state = None
    pm, pv, c0 = _one_step_prediction(spec, W, G, B, state, t, lr)
    idx = torch.randint(0, N, (M, B), generator=g)
    gb = G[idx].mean(1)
    st = state if not spec.preconditioned else (state[0][None], state[1][None])
    W1, _ = _step(spec, W[None], gb, None if state is None else st, t, lr)
    dK = (_sigma1(W1) - _sigma1(W)).numpy()
    em, ev = dK.mean(), dK.var()
    se = np.sqrt(ev / M)
    assert abs(em - pm) < 5 * se + 1e-3 * abs(pm), (name, em, pm, se)
    assert ev / pv == pytest.approx(1.0, abs=0.03), (name, ev, pv)
    # the noise part of the mean alone: drop it and the check must fail (the test can fail)
    pm_without_noise = pm - lr * c0**2 * (N - 1) / B * float(preconditioned_noise_terms(
        W, torch.ones_like(W) if not spec.preconditioned else
        adam_preconditioner(state[1], (G.mean(0) + spec.l2 * W) ** 2 + ((G - G.mean(0)) ** 2
                                                                       ).mean(0) / B, t, spec),
        torch.zeros_like(W), G, torch.tensor(lr, dtype=F64))["drift_noise"])
    assert abs(em - pm_without_noise) > 5 * se, (name, em, pm_without_noise, se)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
def test_multi_step_variance_against_monte_carlo(name):
    """Noise injected at one step is carried by the fast state: over 30 steps from one state,
    the variance of sigma_1 across 20,000 runs against forward_prediction's (terms frozen at the
    start: the gradients do not depend on W here). The SGD theory applied to momentum would be
    off by ~(1/(1-mu))^2 at long horizons; here it is checked to miss by more than 2x."""
    spec = SPECS[name]
    W, G = _population(3, mean=0.02)
    N, B, M, lr, T = G.shape[0], 4, 20_000, 0.002, 30
    g = torch.Generator().manual_seed(4)
    if spec.preconditioned:
        v0 = (G**2).mean(0) * (1 - spec.betas[1] ** 1000)
        state = (torch.zeros(M, *W.shape, dtype=F64), v0.expand(M, *W.shape).clone())
    else:
        state = None
    Wt = W.expand(M, *W.shape).clone()
    for i in range(T):
        idx = torch.randint(0, N, (M, B), generator=g)
        Wt, state = _step(spec, Wt, G[idx].mean(1), state, 1000 + i, lr)
    ev = float(_sigma1(Wt).var())
    P = torch.ones_like(W)
    if spec.preconditioned:
        P = adam_preconditioner(v0, G.mean(0) ** 2 + ((G - G.mean(0)) ** 2).mean(0) / B, 1000,
                                spec)
    terms = preconditioned_noise_terms(W, P, G.mean(0), G, torch.tensor(lr, dtype=F64))
    d2 = float(terms["diffusion2"]) * (N - 1) / B
    rates = np.zeros(T + 1)
    _, var = forward_prediction(rates, rates, np.full(T + 1, d2), np.full(T + 1, lr),
                                spec=spec, steps=np.arange(1000, 1001 + T))
    assert ev / var[T] == pytest.approx(1.0, abs=0.06), (name, ev, var[T])
    if spec.kind == "momentum":
        _, sgd_var = forward_prediction(rates, rates, np.full(T + 1, d2), np.full(T + 1, lr),
                                        spec=OptimizerSpec(), steps=np.arange(T + 1))
        assert ev / sgd_var[T] > 2.0


def test_spec_from_torch_optimizers():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert OptimizerSpec.from_optimizer(torch.optim.SGD(p, lr=0.1)).kind == "sgd"
    s = OptimizerSpec.from_optimizer(torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True))
    assert (s.kind, s.momentum, s.nesterov) == ("momentum", 0.9, True)
    s = OptimizerSpec.from_optimizer(torch.optim.AdamW(p, lr=0.1, weight_decay=0.02))
    assert (s.kind, s.decoupled, s.l2) == ("adamw", 0.02, 0.0)
    assert OptimizerSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="no SDE"):
        OptimizerSpec.from_optimizer(torch.optim.RMSprop(p, lr=0.1))


@pytest.mark.parametrize("max_norm", [0.5, 0.8, 5.0])
def test_expected_clip_factor_against_monte_carlo(max_norm):
    """kappa against 200,000 batches (float64, with replacement) of clip_grad_norm_'s factor,
    and kappa grad L against the mean clipped batch gradient projected on grad L."""
    rng = np.random.default_rng(3)
    N, d, B = 200, 400, 16
    G = rng.normal(size=(N, d)) * 0.3 + 0.05 * rng.normal(size=d)
    g = G.mean(0)
    cov_trace = ((G - g) ** 2).sum(1).mean() / B        # population covariance / B
    kappa = float(expected_clip_factor(g @ g, cov_trace, max_norm))
    f, proj = [], []
    for _ in range(20):
        gB = G[rng.integers(0, N, size=(10_000, B))].mean(1)
        fac = np.minimum(1.0, max_norm / (np.linalg.norm(gB, axis=1) + 1e-6))
        f.append(fac)
        proj.append(fac * (gB @ g) / (g @ g))
    f, proj = np.concatenate(f), np.concatenate(proj)
    assert kappa == pytest.approx(f.mean(), rel=0.01)
    assert kappa == pytest.approx(proj.mean(), rel=0.02)
    if max_norm < 1:
        assert kappa < 0.9
    with pytest.raises(ValueError, match="max_norm"):
        expected_clip_factor(1.0, 0.0, 0.0)
