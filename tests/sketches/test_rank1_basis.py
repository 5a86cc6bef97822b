"""The ``rank1_basis`` sketch on recorded runs: every analysis variable equal to the ``rank1``
layout's of the same training, and its noise terms equal to torch.func per-sample gradients'.

The same training (same seeds, CPU, deterministic) is recorded twice: once with the default
Linear rule (``rank1`` factors) and once with :class:`LinearBasisRule` (``rank1_basis``
statistics for every Linear layer): a Linear(8, 40) (m > n: the output gradient is projected)
and a Linear(40, 3) (m < n: the input is projected), SGD, batch sizes varying from step to step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SCALE_OF, assert_analyses_close
from torch import nn

import trajlab
from trajlab.record.rules import LinearRule, register_rule
from trajlab.record.rules.linear_basis import LinearBasisRule
from trajlab.sde import layer_terms
from trajlab.sde.basis import basis_gradient_terms, basis_noise_terms
from trajlab.sketches.rank1_basis import STATS, shape_saving
from trajlab.spectral import hessian_quadform
from trajlab.store import open_run
from trajlab.store.reconstruct import per_sample_gradients

SIZES = (5, 7, 1, 4, 6, 7, 3, 6)
LR = 0.05


@pytest.fixture
def basis_rule():
    """Linear layers recorded with ``rank1_basis`` for the test's duration."""
    register_rule(nn.Linear, LinearBasisRule(min_saving=0), overwrite=True)
    try:
        yield
    finally:
        register_rule(nn.Linear, LinearRule(), overwrite=True)


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 40), nn.Tanh(), nn.Linear(40, 3)).to(dtype)


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 8, generator=g).to(dtype), torch.randint(0, 3, (64,), generator=g)


def _train(store, dtype: torch.dtype, *, steps=SIZES) -> list[torch.Tensor]:
    """Record SGD on the MLP into ``store``; the weights before each step, for the checks."""
    model = _model(dtype)
    X, Y = _data(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(2)
    with trajlab.Recorder(model, store, optimizer=opt, loss_fn=F.cross_entropy) as rec:
        for b in steps:
            idx = torch.randperm(len(X), generator=g)[:b]
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
    return store


def _analyze(store):
    return trajlab.analyze(store, scheduler="synchronous", progress=False)


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
def test_every_analysis_variable_equals_the_rank1_layouts(tmp_path, basis_rule, dtype, rel):
    register_rule(nn.Linear, LinearRule(), overwrite=True)
    plain = _analyze(_train(tmp_path / "rank1.zarr", dtype))
    register_rule(nn.Linear, LinearBasisRule(min_saving=0), overwrite=True)
    run = open_run(_train(tmp_path / "basis.zarr", dtype))
    assert [lm.sketch for lm in run.meta.layers] == ["rank1_basis"] * 2
    assert [lm.rank for lm in run.meta.layers] == [8, 3]
    got = _analyze(run)
    names = [k for k in plain.data_vars]
    assert set(names) == set(got.data_vars)
    noisy = plain["batch_size"].values >= 2  # the step with one sample has no noise terms
    assert np.isfinite(plain["drift_noise_var"].values[noisy]).all() and not noisy.all()
    assert_analyses_close(got, plain, rel=rel, names=names)


def test_the_store_holds_statistics_not_the_factors_nor_grad(tmp_path, basis_rule):
    run = open_run(_train(tmp_path / "basis.zarr", torch.float64, steps=(5, 4)))
    for lm in run.meta.layers:
        assert not lm.stored_grad
        rows = run.layer_rows(lm.name, list(STATS))
        s = min(lm.shape)
        assert rows["ps_small"].shape[-1] == s and rows["svd_u"].shape[1:] == (s, s)
        for name in ("ps_input", "ps_grad_out", "grad"):
            with pytest.raises((KeyError, ValueError)):
                run.layer_rows(lm.name, [name])
    with pytest.raises(ValueError, match=r"'0'.*rank1_basis.*'rank1' sketch"):
        per_sample_gradients(run, "0", int(run.steps[0]))


def test_noise_terms_equal_torch_func_per_sample_gradients(tmp_path, basis_rule):
    """One recorded step's statistics against per-sample gradients from torch.func (float64)."""
    store = _train(tmp_path / "basis.zarr", torch.float64, steps=(6,))
    model = _model(torch.float64)  # the same initial weights the recorded step saw
    X, Y = _data(torch.float64)
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(2))[:6]
    params = dict(model.named_parameters())

    def loss_one(p, x, y):
        out = torch.func.functional_call(model, p, (x[None],))
        return F.cross_entropy(out, y[None])

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(
        params, X[idx], Y[idx])
    run = open_run(store)
    for name in ("0", "2"):
        G = grads[f"{name}.weight"].detach()
        W = params[f"{name}.weight"].detach()
        rows = run.layer_rows(name, ["weight", *STATS])
        torch.testing.assert_close(torch.from_numpy(rows["weight"][0]), W, rtol=0, atol=0)
        stats = {k: torch.from_numpy(np.asarray(rows[k][0])) for k in STATS}
        g = G.mean(0)
        got = basis_noise_terms(W, LR, stats)
        got["grad_first"], got["grad_second"] = basis_gradient_terms(stats)
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        u1, v1 = U[:, 0], Vh[0]
        sd = ((G ** 2).sum(0) - 6 * g ** 2) / (6 * 5)
        want = layer_terms(W, g, -LR * g, LR, 6, G @ v1, G.mT @ u1, sd, u1=u1, v1=v1)
        want["grad_first"], want["grad_second"] = u1 @ g @ v1, hessian_quadform(W, g[None])[0]
        for k in ("drift_noise", "drift_noise_var", "diffusion2", "diffusion2_var",
                  "noise_proj", "grad_first", "grad_second"):
            scale = float(want[k].abs().max())
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10 * scale, msg=k)


def test_the_rule_chooses_the_kind_from_the_shape():
    assert shape_saving((64, 4096)) > 2 > shape_saving((40, 8))
    rule = LinearBasisRule()  # min_saving=2
    x = torch.zeros(2, 4096)
    assert rule.describe(nn.Linear(4096, 64), None, (x,), {}).sketch == "rank1_basis"
    assert rule.describe(nn.Linear(4096, 64), None, (x,), {}).rank == 64
    assert rule.describe(nn.Linear(8, 40), None, (torch.zeros(2, 8),), {}).sketch == "rank1"
    seq = torch.zeros(2, 5, 4096)  # over a sequence: the subspace sketch, as LinearRule
    assert rule.describe(nn.Linear(4096, 64), None, (seq,), {}).sketch == "subspace"


def test_only_stores_with_such_layers_are_format_4(tmp_path, basis_rule):
    import json

    from trajlab.errors import StoreCorruptError

    basis = open_run(_train(tmp_path / "basis.zarr", torch.float64, steps=(4,)))
    assert basis.meta.format_version == 4 and basis.layout.variant == "v4"
    register_rule(nn.Linear, LinearRule(), overwrite=True)
    plain = open_run(_train(tmp_path / "rank1.zarr", torch.float64, steps=(4,)))
    assert plain.meta.format_version == 3 and plain.layout.variant == "v3"
    path = tmp_path / "basis.zarr" / "zarr.json"
    doc = json.loads(path.read_text())
    doc["attributes"]["trajlab"]["format_version"] = 3  # edited down
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreCorruptError, match="'rank1_basis' sketch that only format 4"):
        open_run(tmp_path / "basis.zarr")


@pytest.mark.parametrize("shape", [(3, 40), (40, 8)])
def test_svd_form_and_small_gap_rows_equal_rank1(shape):
    """The SVD form (``sketch_layer_terms``, used for steps with a small gap) and the resolvent
    form at a step it hands to the SVD form give rank1's terms."""
    from trajlab.sde import sketch_layer_terms
    from trajlab.sde.resolvent import resolvent_layer_terms
    from trajlab.sketches.rank1_basis import basis_statistics

    gen = torch.Generator().manual_seed(5)
    m, n = shape
    W = torch.randn(2, m, n, generator=gen, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W[1], full_matrices=False)
    S[1] = S[0] * (1 - 1.5e-3)  # relative gap 1.5e-3: the resolvent form hands it to SVD
    W[1] = U @ torch.diag(S) @ Vh
    d = torch.randn(2, 6, m, generator=gen, dtype=torch.float64)
    a = torch.randn(2, 6, n, generator=gen, dtype=torch.float64)
    g = d.mT @ a / 6
    upd, lr = -0.1 * g, torch.full((2,), 0.1, dtype=torch.float64)
    raw = {"ps_grad_out": d, "ps_input": a}
    stats = [basis_statistics(d[t], a[t], W[t]) for t in range(2)]
    stacked = {k: torch.stack([s[k] for s in stats]) for k in stats[0]}
    want = resolvent_layer_terms(W, g, upd, lr, sketch="rank1", tensors=raw)
    got = resolvent_layer_terms(W, None, upd, lr, sketch="rank1_basis", tensors=stacked,
                                grad_stats=stacked)
    quiet = resolvent_layer_terms(W, None, upd, lr, grad_stats=stacked)  # no noise terms
    dense = resolvent_layer_terms(W, g, upd, lr)

    def scale(terms, k):  # drift_optimizer: rounding around 0 under SGD, on drift_flow's scale
        return max(float(terms[j].nan_to_num().abs().max()) for j in SCALE_OF.get(k, (k,))
                   if j in terms) or 1.0

    for k, v in dense.items():
        if v.is_floating_point():
            torch.testing.assert_close(quiet[k], v, rtol=0, atol=1e-10 * scale(dense, k),
                                       equal_nan=True, msg=k)
    for t in range(2):
        ref = sketch_layer_terms(W[t], g[t], upd[t], 0.1, "rank1",
                                 {k: v[t] for k, v in raw.items()})
        svd = sketch_layer_terms(W[t], None, upd[t], 0.1, "rank1_basis", stats[t])
        for k in want:
            if not want[k].is_floating_point():
                assert torch.equal(got[k], want[k]) and torch.equal(svd[k], ref[k]), k
                continue
            tol = 1e-10 * scale(want, k)
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=tol, msg=k)
            torch.testing.assert_close(svd[k].to(ref[k].dtype), ref[k], rtol=0, atol=tol, msg=k)


def test_micro_batches_and_clipping(tmp_path, basis_rule):
    """Two micro-batches per step (concatenated raw factors) under gradient clipping
    (``grad_scale`` != 1): the statistics are of the scaled, joined factors."""
    def train(store):
        model = _model(torch.float64)
        X, Y = _data(torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        g = torch.Generator().manual_seed(3)
        with trajlab.Recorder(model, store, optimizer=opt, loss_fn=F.cross_entropy) as rec:
            for _ in range(4):
                idx = torch.randperm(len(X), generator=g)[:8]
                opt.zero_grad()
                for part in (idx[:3], idx[3:]):
                    loss = F.cross_entropy(model(X[part]), Y[part]) * len(part) / 8
                    loss.backward()
                    rec.log(loss=loss * 8 / len(part), indices=part, batch_size=len(part))
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                opt.step()
        return store

    register_rule(nn.Linear, LinearRule(), overwrite=True)
    plain = _analyze(train(tmp_path / "rank1.zarr"))
    register_rule(nn.Linear, LinearBasisRule(min_saving=0), overwrite=True)
    run = open_run(train(tmp_path / "basis.zarr"))
    assert (run.layer_rows("0", ["grad_scale"])["grad_scale"] < 1).all()
    got = _analyze(run)
    assert_analyses_close(got, plain, rel=1e-10, names=list(plain.data_vars))
