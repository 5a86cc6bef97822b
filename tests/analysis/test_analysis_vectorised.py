"""The vectorised analysis node against the per-step reference, variable by variable.

``trajlab.analysis.tasks.layer_chunk`` computes every step of a chunk at once (resolvent form of
:mod:`trajlab.sde.resolvent`, steps grouped by batch size); ``layer_chunk_per_step`` is the old
one-step-at-a-time loop over the SVD-form kernels. Both run in float64 on tiny recorded runs
that hold every awkward case: repeated top singular values, NaN steps, batch size 1 among
others, mixed batch sizes in one chunk, a Conv2d (subspace sketch) layer, a full-gradient probe
and two param groups with different learning rates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ConvModel, assert_analyses_close
from torch import nn

import trajlab
from trajlab.analysis.plan import AnalysisOptions, make_plan
from trajlab.analysis.reference import layer_chunk_per_step
from trajlab.analysis.tasks import layer_chunk, network_chunk
from trajlab.analysis.variables import variables
from trajlab.sde import network_terms, resolvent

RTOL = 1e-10
#: Variables that are differences of larger terms (0 for plain SGD, covariance parts, the
#: debiased discretisation term): their scale is that of the terms they are made from.
SCALE_OF = {
    "drift_optimizer": ("drift_optimizer", "drift_flow"),
    "drift_noise_cov": ("drift_noise_cov", "drift_noise", "drift_noise_var"),
    "diffusion2_cov": ("diffusion2_cov", "diffusion2", "diffusion2_var"),
    "drift_discretization": ("drift_discretization", "drift_noise"),
    "drift": ("drift", "drift_flow", "drift_noise"),
}
#: Batch sizes of the mixed runs: batch size 1 among others, several sizes in each chunk.
SIZES = [8, 8, 1, 5, 8, 3, 8, 8, 1, 8, 5, 8, 8, 2, 8, 8]


def _scale(ref: dict, name: str, good: np.ndarray) -> float:
    vals = [np.abs(ref[k][good]) for k in SCALE_OF.get(name, (name,))]
    vals = [v[np.isfinite(v)] for v in vals]
    return max((float(v.max()) for v in vals if v.size), default=0.0)


def assert_same(got: dict, ref: dict, *, where: str = "") -> None:
    """Every variable equal at RTOL: NaN/inf where the reference has them, elsewhere within
    RTOL of max(|reference|, its scale): over the non-degenerate steps, the largest value of
    the variable (and of the terms it is a difference of, SCALE_OF); at a degenerate step
    (second-order terms ~1/gap) the size of those terms at that step."""
    assert set(got) == set(ref)
    deg = ref["degenerate"].astype(bool)
    for k, b in ref.items():
        a = got[k]
        assert a.shape == b.shape and a.dtype == b.dtype, (where, k)
        if b.dtype == bool:
            np.testing.assert_array_equal(a, b, err_msg=f"{where} {k}")
            continue
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{where} {k}: NaN")
        np.testing.assert_array_equal(np.isposinf(a), np.isposinf(b), err_msg=f"{where} {k}")
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b), err_msg=f"{where} {k}")
        fin = np.isfinite(b)
        rows = ~deg if b.ndim == 1 else ~deg[:, None] & np.ones(b.shape, bool)
        scale = _scale(ref, k, rows & fin) if k != "noise_proj" else \
            float(np.abs(b[fin]).max(initial=0.0))
        here = np.max([np.abs(np.nan_to_num(ref[j])) for j in SCALE_OF.get(k, (k,))], axis=0)
        floor = np.where(rows, scale, here)
        tol = RTOL * np.maximum(np.abs(b), floor)
        err = np.where(fin, np.abs(a - b), 0.0)
        bad = err > tol
        assert not bad.any(), (where, k, np.flatnonzero(bad.reshape(-1))[:5],
                               float((err / np.where(tol > 0, tol, 1.0)).max()) * RTOL)


# ----------------------------------------------------------------------------- recorded runs
class Three(nn.Module):
    """Linear 6-12-12-4, float64; the middle layer gets repeated top singular values."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(6, 12)
        self.mid = nn.Linear(12, 12)
        self.out = nn.Linear(12, 4)
        self.double()

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.a(x)))))


def _repeated_top(W: torch.Tensor) -> torch.Tensor:
    """W with its two largest singular values made equal (a degenerate spectral gap)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    S = S.clone()
    S[1] = S[0]
    return U @ torch.diag(S) @ Vh


def record_mixed(store, *, model=None, X=None, Y=None, lrs=(0.05, 0.02), probe_every=3,
                 nan_at=(7,), degenerate_at=(4, 10), sizes=SIZES, **kw):
    """SGD with two param groups, mixed batch sizes, NaN inputs at ``nan_at`` (that step's
    update is zero) and the middle layer's weight set to repeated top singular values before the
    steps in ``degenerate_at``."""
    model = Three() if model is None else model
    if X is None:
        g = torch.Generator().manual_seed(0)
        X = torch.randn(96, 6, dtype=torch.float64, generator=g)
        Y = torch.randint(0, 4, (96,), generator=g)
    mid = getattr(model, "mid", None)
    others = [p for n, p in model.named_parameters() if not n.startswith("mid.")]
    groups = [{"params": others, "lr": lrs[0]}]
    if mid is not None:
        groups.append({"params": list(mid.parameters()), "lr": lrs[1]})
    opt = torch.optim.SGD(groups, lr=lrs[0])
    probe = None
    if probe_every:
        probe = trajlab.FullGradientProbe([(X[:48], Y[:48]), (X[48:], Y[48:])], F.cross_entropy,
                                          every=probe_every)
    g = torch.Generator().manual_seed(1)
    with trajlab.Recorder(model, store, optimizer=opt, loss_fn=F.cross_entropy, probe=probe,
                          self_check=False, dataset_size=len(X), **kw) as rec:
        for step, b in enumerate(sizes):
            if step in degenerate_at and mid is not None:
                with torch.no_grad():
                    mid.weight.copy_(_repeated_top(mid.weight))
            idx = torch.randperm(len(X), generator=g)[:b]
            x = X[idx].clone()
            if step in nan_at:
                x[0, 0] = float("nan")
            opt.zero_grad()
            loss = F.cross_entropy(model(x), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx, inputs=x, targets=Y[idx])
            if not torch.isfinite(loss):  # skip the NaN step: a zero update keeps W finite
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
            opt.step()
    return store


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        return record_mixed(tmp_path_factory.mktemp("v") / "mixed.zarr")


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(64, 3, 8, 8, dtype=torch.float64, generator=g)
    Y = torch.randint(0, 4, (64,), generator=g)
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        return record_mixed(tmp_path_factory.mktemp("v") / "conv.zarr", model=ConvModel().double(),
                            X=X, Y=Y, lrs=(0.05,), probe_every=2, nan_at=(5,), degenerate_at=(),
                            sizes=[6, 6, 1, 4, 6, 6, 2, 6], rank=2)


def _plan(store, chunk_rows, **options):
    run = trajlab.open_run(store)
    return make_plan(run, None, None, chunk_rows, AnalysisOptions(**options))


def _compare(plan, where):
    for li, lm in enumerate(plan.layers):
        for rows in plan.chunks:
            assert_same(layer_chunk(plan, li, rows), layer_chunk_per_step(plan, li, rows),
                        where=f"{where} layer {lm.name} rows {rows}")


# ----------------------------------------------------------------------------- the tests
def test_the_mixed_run_holds_every_case(mixed):
    run = trajlab.open_run(mixed)
    bs = run.root.batch_size.values
    assert bs.tolist() == SIZES
    assert run.root.probe.values.any() and not run.root.probe.values.all()
    mid = run.layer("mid")
    assert mid.nonfinite.values[7] and not mid.nonfinite.values[8]
    assert sorted(set(np.round(mid.lr.values, 6))) == [0.02]
    assert sorted(set(np.round(run.layer("a").lr.values, 6))) == [0.05]
    plan = _plan(mixed, 5)
    ref = layer_chunk_per_step(plan, 1, (0, 16))
    assert ref["degenerate"][[4, 10]].all() and not ref["degenerate"][[0, 1, 2, 3, 9]].any()
    assert (ref["spectral_gap"][[4, 10]] < 1e-12).all()  # repeated top singular value
    assert np.isnan(ref["drift_noise"][[2, 7, 8]]).all()  # batch size 1 twice, NaN step
    assert np.isfinite(ref["K"][[2, 8]]).all() and np.isnan(ref["K"][7])
    assert ref["flow_full_gradient"][[0, 3, 6]].all()


@pytest.mark.parametrize("gradient", ["auto", "batch"])
@pytest.mark.parametrize("path", ["eigh", "mrrr"])
def test_vectorised_equals_per_step_on_the_mixed_run(mixed, monkeypatch, gradient, path):
    if path == "mrrr":  # the large-layer path (top pair by MRRR, Cholesky resolvent)
        monkeypatch.setattr(resolvent, "MRRR_MIN", 2)
    _compare(_plan(mixed, 5, gradient=gradient), f"{path}/{gradient}")


def test_vectorised_equals_per_step_with_a_finite_population(mixed):
    _compare(_plan(mixed, 16, population=96, gap_tol=1e-2), "population")


@pytest.mark.parametrize("path", ["eigh", "mrrr"])
def test_vectorised_equals_per_step_on_a_conv_run(conv, monkeypatch, path):
    if path == "mrrr":
        monkeypatch.setattr(resolvent, "MRRR_MIN", 2)
    plan = _plan(conv, 3)
    assert [lm.sketch for lm in plan.layers] == ["subspace", "rank1"]
    _compare(plan, path)


def test_degenerate_steps_take_the_svd_form(mixed, monkeypatch):
    """Steps below the gap threshold are recomputed with the SVD form; the rest are not."""
    from trajlab.sde import layer

    seen = []
    real = layer.sketch_layer_terms

    def spy(W, *a, **k):
        seen.append(tuple(W.shape))
        return real(W, *a, **k)

    monkeypatch.setattr(resolvent, "sketch_layer_terms", spy)
    plan = _plan(mixed, 16)
    out = layer_chunk(plan, 1, (0, 16))
    assert out["degenerate"][[4, 10]].all()
    noisy = np.isfinite(out["drift_noise"])
    small = noisy & (out["spectral_gap"] < max(resolvent.MIN_GAP, 2 * plan.options.gap_tol))
    assert small[[4, 10]].all() and small.sum() < noisy.sum()
    assert seen == [(12, 12)] * int(small.sum())  # those steps only, one call each


def test_resolvent_kernel_matches_the_svd_form_on_random_layers():
    """Both orientations, both spectrum paths, rank-deficient and one-row layers."""
    from trajlab.sde import sketch_layer_terms

    g = torch.Generator().manual_seed(0)
    for m, n, B in [(5, 7, 4), (7, 5, 4), (6, 6, 3), (1, 5, 3), (5, 1, 3), (12, 30, 5)]:
        W = torch.randn(3, m, n, dtype=torch.float64, generator=g)
        if min(m, n) > 2:  # rank 2: null spaces on both sides
            W[1] = W[1, :, :2] @ torch.randn(2, n, dtype=torch.float64, generator=g)
        d = torch.randn(3, B, m, dtype=torch.float64, generator=g)
        a = torch.randn(3, B, n, dtype=torch.float64, generator=g)
        t = {"ps_grad_out": d, "ps_input": a}
        gr = d.mT @ a / B
        upd = 0.01 * torch.randn(3, m, n, dtype=torch.float64, generator=g)
        lr = torch.full((3,), 0.05, dtype=torch.float64)
        ref = sketch_layer_terms(W, gr, upd, lr, "rank1", t, population=50)
        for mrrr in (1000, 1):
            resolvent.MRRR_MIN, saved = mrrr, resolvent.MRRR_MIN
            try:
                got = resolvent.resolvent_layer_terms(W, gr, upd, lr, sketch="rank1", tensors=t,
                                                      population=50)
            finally:
                resolvent.MRRR_MIN = saved
            for k, v in got.items():
                if v.dtype == torch.bool:
                    assert torch.equal(v, ref[k]), k
                    continue
                scale = max(float(ref[j].abs().max()) for j in SCALE_OF.get(k, (k,)))
                torch.testing.assert_close(v, ref[k].to(v.dtype), rtol=0,
                                           atol=1e-12 * max(scale, 1e-300), msg=f"{m}x{n} {k}")


def test_network_chunk_equals_a_per_step_loop_of_network_terms(mixed):
    plan = _plan(mixed, 16, population=96)
    rows = (0, 16)
    layers = [layer_chunk(plan, li, rows) for li in range(len(plan.layers))]
    net = network_chunk(plan, rows, layers)
    run = trajlab.open_run(mixed)
    batch = run.root.batch_size.values
    expect = {k: np.full(16, np.nan) for k in variables("network")}
    expect["batch_size"] = batch.astype(float)
    for i in range(16):
        L = {k: np.array([r[k][i] for r in layers]) for k in layers[0] if k != "noise_proj"}
        expect["net_dt"][i] = L["dt"][0]
        expect["logK"][i] = np.log(L["K"]).sum()
        expect["K_net"][i] = np.exp(expect["logK"][i])
        expect["K_net_batchnorm"][i] = 1.0  # no BatchNorm layer: the empty product
        expect["logK_drift_optimizer"][i] = (L["lr"] / L["lr"][0] * L["drift_optimizer"]
                                             / L["K"]).sum()
        b = int(batch[i])
        proj = np.stack([r["noise_proj"][i, :b] for r in layers])
        if b < 2 or not np.isfinite(L["K"]).all() or not np.isfinite(proj).all():
            continue
        t = {k: torch.from_numpy(v) for k, v in L.items()}
        out = network_terms(t["K"], t["drift"], t["diffusion2"], t["drift_noise"],
                            torch.from_numpy(proj), t["lr"], b, population=96,
                            drift_flow=t["drift_flow"],
                            drift_discretization=t["drift_discretization"],
                            flow_full_gradient=t["flow_full_gradient"].bool(),
                            time_lr=t["lr"][0])
        for k, v in out.items():
            if k not in ("K_net", "logK"):
                expect[k][i] = float(v)
    assert set(net) == set(expect)
    assert_analyses_close(net, expect, rel=1e-12)  # another code path: up to rounding
    assert np.isnan(net["logK_diffusion2"][[2, 7, 8]]).all()
    assert np.isfinite(net["logK_diffusion2"][[0, 1, 3, 13]]).all()  # B = 8, 8, 5, 2
