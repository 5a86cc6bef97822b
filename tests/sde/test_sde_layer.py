"""Layer terms from sketches against dense references built straight from MATH.md §1–§5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sde_reference import (
    F64,
    dense_hessian,
    dense_terms,
    err_to,
    fd_second,
    matrix_with_spectrum,
    rank1_sketch,
    rel,
    subspace_sketch,
)
from torch import nn
from torch.func import functional_call, grad, vmap

from trajlab.analysis.variables import LAYER_KEYS
from trajlab.sde import (
    layer_terms,
    noise_diag,
    pathwise_increment,
    per_sample_directions,
    sketch_layer_terms,
)
from trajlab.spectral import hessian_diag

LR = 0.05
COMPARED = ("K", "drift_flow", "drift_noise", "diffusion2", "drift_noise_var", "drift_noise_cov",
            "diffusion2_var", "diffusion2_cov", "drift", "drift_discretization",
            "pathwise_increment", "pathwise_first_order")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_match(out: dict, ref: dict, tol: float, *, sign_free_proj: bool = True):
    for key in COMPARED:
        if key in ref:
            assert rel(out[key], ref[key]) <= tol, (key, float(out[key]), float(ref[key]))
    # noise_proj carries the sign of (u1, v1): compare up to one global sign
    c, cref = out["noise_proj"], ref["noise_proj"]
    s = torch.sign((c * cref).sum())
    assert rel(s * c, cref) <= tol


CASES = [  # (m, n, spectrum or None for Gaussian, Hessian method)
    (3, 5, None, "autograd"),
    (6, 4, None, "autograd"),
    (5, 5, None, "autograd"),
    (6, 4, [3.0, 1.5], "fd"),          # rank deficient: left and right null spaces
    (4, 7, [2.0, 1.2, 0.7], "fd"),
]


@pytest.mark.parametrize("m,n,spectrum,hmethod", CASES)
def test_rank1_sketch_terms_match_dense(m, n, spectrum, hmethod):
    gen = _gen(m * 10 + n)
    W = (torch.randn(m, n, generator=gen, dtype=F64) if spectrum is None
         else matrix_with_spectrum(m, n, spectrum, gen))
    B = 6
    tensors, G = rank1_sketch(gen, B, m, n)
    update = 0.01 * torch.randn(m, n, generator=gen, dtype=F64)
    H = dense_hessian(W, method=hmethod)
    ref = dense_terms(W, G, LR, update=update, H=H)
    g = G.mean(0)
    out = sketch_layer_terms(W, g, update, LR, "rank1", tensors)
    tol = 1e-8   # fd-Hessian reference (rank-deficient W) is itself good to ~1e-11
    _assert_match(out, ref, tol)
    assert set(LAYER_KEYS) <= set(out)
    assert float(out["coverage_u"]) == 1.0 and float(out["coverage_v"]) == 1.0


@pytest.mark.parametrize("m,n,k", [(5, 7, 2), (8, 4, 3), (6, 6, 6)])
def test_subspace_sketch_terms_match_dense(m, n, k):
    gen = _gen(100 + m + n + k)
    W = torch.randn(m, n, generator=gen, dtype=F64)
    B = 5
    G = torch.randn(B, m, n, generator=gen, dtype=F64)          # full-rank per-sample gradients
    U, _S, Vh = torch.linalg.svd(W)
    tensors = subspace_sketch(G, U[:, :k], Vh[:k].T)
    update = -LR * G.mean(0)
    ref = dense_terms(W, G, LR, update=update)
    out = sketch_layer_terms(W, G.mean(0), update, LR, "subspace", tensors)
    _assert_match(out, ref, 1e-8)
    assert abs(float(out["coverage_u"]) - 1) < 1e-12 and abs(float(out["coverage_v"]) - 1) < 1e-12


def test_drift_noise_matches_finite_differences():
    """Independent of any Hessian formula: sum_i of d^2 s_1(W + e Omega_i)/de^2 by 4th-order FD."""
    gen = _gen(7)
    m, n, B = 5, 8, 6
    W = matrix_with_spectrum(m, n, [2.0, 1.3, 1.0, 0.5, 0.2], gen)
    tensors, G = rank1_sketch(gen, B, m, n)
    g = G.mean(0)
    out = sketch_layer_terms(W, g, -LR * g, LR, "rank1", tensors)
    fd = torch.stack([fd_second(W, G[i] - g) for i in range(B)]).sum()
    assert rel(out["drift_noise"], LR / (2 * B * (B - 1)) * fd) <= 1e-8
    # From the batch gradient the term is debiased by the noise curvature (MATH.md §4a) ...
    assert rel(out["drift_discretization"] + out["drift_noise"], 0.5 * LR * fd_second(W, g)) <= 1e-8
    # ... and is the plain second derivative when the gradient is the full-data one.
    full = sketch_layer_terms(W, g, -LR * g, LR, "rank1", tensors, grad_full=g)
    assert rel(full["drift_discretization"], 0.5 * LR * fd_second(W, g)) <= 1e-8


@pytest.mark.parametrize("m,n,spectrum", [(4, 6, None), (7, 3, None), (6, 5, [2.0, 1.0])])
def test_hessian_diag_used_for_var_split_matches_dense(m, n, spectrum):
    gen = _gen(m + 2 * n)
    W = (torch.randn(m, n, generator=gen, dtype=F64) if spectrum is None
         else matrix_with_spectrum(m, n, spectrum, gen))
    H = dense_hessian(W, method="autograd" if spectrum is None else "fd")
    tol = 1e-12 if spectrum is None else 1e-8
    assert rel(hessian_diag(W).reshape(-1), H.diagonal()) <= tol


# --- real per-sample gradients from torch.func ------------------------------------------------

class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x, probe1=None, probe2=None):
        z1 = self.fc1(x)
        if probe1 is not None:
            z1 = z1 + probe1
        z2 = self.fc2(torch.tanh(z1))
        if probe2 is not None:
            z2 = z2 + probe2
        return z2


def _mlp_batch(B=6, seed=0):
    torch.manual_seed(seed)
    model = _MLP().double()
    gen = _gen(seed)
    X = torch.randn(B, 5, generator=gen, dtype=F64)
    Y = torch.randint(0, 3, (B,), generator=gen)
    return model, X, Y


def _mlp_per_sample(model, X, Y):
    """Per-sample weight gradients and output gradients (probes), both by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, p1, p2, x, y):
        out = functional_call(model, p, (x[None], p1[None], p2[None]))
        return F.cross_entropy(out, y[None])

    z1 = torch.zeros(7, dtype=F64)
    z2 = torch.zeros(3, dtype=F64)
    gp, d1, d2 = vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(None, None, None, 0, 0))(
        params, z1, z2, X, Y)
    h = torch.tanh(model.fc1(X)).detach()
    return {"fc1": (gp["fc1.weight"], d1, X), "fc2": (gp["fc2.weight"], d2, h)}


def test_mlp_rank1_sketch_matches_torch_func():
    model, X, Y = _mlp_batch()
    per = _mlp_per_sample(model, X, Y)
    for name, (G, delta, a) in per.items():
        W = getattr(model, name).weight.detach()
        assert rel(torch.einsum("bm,bn->bmn", delta, a), G) <= 1e-12   # the sketch is exact
        g = G.mean(0)
        ref = dense_terms(W, G, LR, update=-LR * g)
        out = sketch_layer_terms(W, g, -LR * g, LR, "rank1",
                                 {"ps_grad_out": delta, "ps_input": a})
        _assert_match(out, ref, 1e-8)


def test_conv_subspace_sketch_matches_torch_func():
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 4, 3).double()
    gen = _gen(3)
    X = torch.randn(5, 2, 6, 6, generator=gen, dtype=F64)
    T = torch.randn(5, 4, 4, 4, generator=gen, dtype=F64)
    params = {k: v.detach() for k, v in conv.named_parameters()}

    def loss(p, x, t):
        return ((functional_call(conv, p, (x[None],)) - t[None]) ** 2).sum()

    G = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, T)["weight"].reshape(5, 4, -1)
    W = conv.weight.detach().reshape(4, -1)
    U, _S, Vh = torch.linalg.svd(W, full_matrices=False)
    tensors = subspace_sketch(G, U[:, :2], Vh[:2].T)
    g = G.mean(0)
    ref = dense_terms(W, G, LR, update=-LR * g)
    out = sketch_layer_terms(W, g, -LR * g, LR, "subspace", tensors)
    _assert_match(out, ref, 1e-8)


# --- identities and edge cases ----------------------------------------------------------------

def _setup(seed=0, m=5, n=4, B=6):
    gen = _gen(seed)
    W = torch.randn(m, n, generator=gen, dtype=F64)
    tensors, G = rank1_sketch(gen, B, m, n)
    return W, tensors, G


def _terms(W, tensors, G, *, sign=1.0, lr=LR, **kw):
    U, _S, Vh = torch.linalg.svd(W, full_matrices=False)
    u1, v1 = sign * U[:, 0], sign * Vh[0]
    g = G.mean(0)
    Gv, Gtu = per_sample_directions("rank1", tensors, u1, v1)
    sd = noise_diag("rank1", tensors, g)
    return layer_terms(W, g, -lr * g, lr, G.shape[0], Gv, Gtu, sd, u1=u1, v1=v1, **kw)


def test_var_plus_cov_is_total():
    W, tensors, G = _setup(1)
    out = _terms(W, tensors, G)
    for k in ("drift_noise", "diffusion2"):
        assert rel(out[k + "_var"] + out[k + "_cov"], out[k]) <= 1e-15
    assert rel(out["drift_flow"] + out["drift_noise"], out["drift"]) <= 1e-15


def test_sign_of_singular_pair_does_not_matter():
    W, tensors, G = _setup(2)
    a = _terms(W, tensors, G, sign=1.0)
    b = _terms(W, tensors, G, sign=-1.0)
    for k in COMPARED:
        assert rel(a[k], b[k]) <= 1e-13, k
    assert rel(a["noise_proj"], b["noise_proj"]) <= 1e-13   # c_i = u1^T Omega v1 is sign-free
    assert float(a["alignment"]) == pytest.approx(1.0) == float(b["alignment"])


def test_batch_size_one_is_an_error():
    W, tensors, G = _setup(3, B=1)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        sketch_layer_terms(W, G.mean(0), -LR * G.mean(0), LR, "rank1", tensors)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        noise_diag("rank1", tensors, G.mean(0))
    W, tensors, G = _setup(3, B=4)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        layer_terms(W, G.mean(0), W, LR, 1, torch.zeros(1, 5, dtype=F64),
                    torch.zeros(1, 4, dtype=F64), torch.zeros_like(W),
                    u1=torch.ones(5, dtype=F64), v1=torch.ones(4, dtype=F64))


def test_zero_learning_rate_gives_zero_noise_terms():
    W, tensors, G = _setup(4)
    out = _terms(W, tensors, G, lr=0.0)
    for k in ("drift_noise", "drift_noise_var", "drift_noise_cov", "diffusion2",
              "diffusion2_var", "diffusion2_cov", "drift_discretization", "pathwise_increment"):
        assert float(out[k]) == 0.0, k
    assert all(bool(torch.isfinite(v).all()) for v in out.values())
    assert float(out["drift_flow"]) != 0.0


def test_finite_population_correction():
    W, tensors, G = _setup(5, B=6)
    iid = _terms(W, tensors, G)
    N = 20
    fin = _terms(W, tensors, G, population=N)
    ref = dense_terms(W, G, LR, population=N)
    for k in ("drift_noise", "diffusion2", "drift_noise_var", "diffusion2_var"):
        assert rel(fin[k], iid[k] * (N - 6) / N) <= 1e-13
        assert rel(fin[k], ref[k]) <= 1e-8
    whole = _terms(W, tensors, G, population=6)   # the batch is the whole data set: no noise
    assert float(whole["diffusion2"]) == 0.0 and float(whole["drift_noise"]) == 0.0
    with pytest.raises(ValueError, match="population"):
        _terms(W, tensors, G, population=3)


def test_batched_steps_and_full_gradient_fallback():
    gen = _gen(6)
    T, m, n, B = 3, 4, 6, 5
    Ws = torch.randn(T, m, n, generator=gen, dtype=F64)
    Gs = [rank1_sketch(gen, B, m, n) for _ in range(T)]
    tensors = {k: torch.stack([t[k] for t, _ in Gs]) for k in Gs[0][0]}
    G = torch.stack([G for _, G in Gs])
    g = G.mean(1)
    full = torch.randn(T, m, n, generator=gen, dtype=F64)
    full[1] = float("nan")                                     # no probe at step 1
    lr = torch.tensor([0.1, 0.05, 0.02], dtype=F64)
    out = sketch_layer_terms(Ws, g, -lr[:, None, None] * g, lr, "rank1", tensors, grad_full=full)
    assert out["flow_full_gradient"].tolist() == [True, False, True]
    for t in range(T):
        ref = dense_terms(Ws[t], G[t], float(lr[t]), update=-lr[t] * g[t],
                          grad_full=None if t == 1 else full[t])
        one = {k: v[t] for k, v in out.items()}
        _assert_match(one, ref, 1e-8)


def test_degenerate_top_singular_value_is_flagged():
    W = torch.diag(torch.tensor([2.0, 2.0, 1.0], dtype=F64))
    gen = _gen(8)
    tensors, G = rank1_sketch(gen, 4, 3, 3)
    out = sketch_layer_terms(W, G.mean(0), -LR * G.mean(0), LR, "rank1", tensors)
    assert bool(out["degenerate"]) and float(out["spectral_gap"]) == 0.0
    near = W.clone()
    near[0, 0] = 2.01
    out = sketch_layer_terms(near, G.mean(0), -LR * G.mean(0), LR, "rank1", tensors)
    assert not bool(out["degenerate"])                       # gap 0.005 > 1e-3
    assert bool(torch.isfinite(out["drift_noise"]))


def test_pathwise_increment_matches_second_order_taylor():
    W, _, _ = _setup(9)
    D = 1e-3 * torch.randn(W.shape, generator=_gen(10), dtype=F64)
    exact = torch.linalg.matrix_norm(W + D, ord=2) - torch.linalg.matrix_norm(W, ord=2)
    # third-order remainder: |D|^3 / gap^2 ~ 1e-9 relative to the increment
    assert rel(pathwise_increment(W, D), exact) <= 1e-5


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 6), B=st.integers(2, 5), seed=st.integers(0, 999))
def test_properties(m, n, B, seed):
    """Any shape: var + cov == total, kappa-term >= 0, s^2 >= 0, sign-free."""
    gen = _gen(seed)
    W = torch.randn(m, n, generator=gen, dtype=F64)
    tensors, G = rank1_sketch(gen, B, m, n)
    a = _terms(W, tensors, G)
    if bool(a["degenerate"]):
        return
    b = _terms(W, tensors, G, sign=-1.0)
    scale = float(a["drift_noise"].abs() + a["diffusion2"].abs() + a["drift_flow"].abs())
    for k in COMPARED:
        assert abs(float(a[k] - b[k])) <= 1e-10 * max(scale, 1.0), k
    parts = a["drift_noise_var"].abs() + a["drift_noise_cov"].abs()   # the sum may cancel
    assert err_to(a["drift_noise_var"] + a["drift_noise_cov"], a["drift_noise"], parts) <= 1e-14
    assert float(a["drift_noise"]) >= 0 and float(a["diffusion2"]) >= 0
    assert float(a["drift_noise_var"]) >= 0 and float(a["diffusion2_var"]) >= 0


def test_float32_inputs_agree_with_float64():
    W, tensors, G = _setup(11)
    ref = sketch_layer_terms(W, G.mean(0), -LR * G.mean(0), LR, "rank1", tensors)
    t32 = {k: v.float() for k, v in tensors.items()}
    g32 = G.mean(0).float()
    out = sketch_layer_terms(W.float(), g32, -LR * g32, torch.tensor(LR), "rank1", t32)
    # Float32 error is relative to the operands' scale, not to a result that may cancel (the
    # flow u1^T g v1 can be much smaller than |g|): the scale of each term's inputs.
    g = G.mean(0)
    gnorm = float(torch.linalg.matrix_norm(g, ord=2))
    scale = {"drift_flow": gnorm, "drift": gnorm + float(ref["drift_noise"]),
             "pathwise_increment": LR * gnorm, "pathwise_first_order": LR * gnorm,
             "drift_discretization": abs(float(ref["drift_discretization"]))
             + float(ref["drift_noise"]),
             "drift_noise_cov": abs(float(ref["drift_noise_var"])) + float(ref["drift_noise"]),
             "diffusion2_cov": abs(float(ref["diffusion2_var"])) + float(ref["diffusion2"])}
    for k in COMPARED:
        assert out[k].dtype == torch.float32
        s = max(scale.get(k, 0.0), abs(float(ref[k])))
        assert err_to(out[k], ref[k], s) <= 1e-4, (k, err_to(out[k], ref[k], s))
