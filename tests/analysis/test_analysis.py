"""The analysis: terms from the store against torch.func references, Dask vs eager, resume."""

from __future__ import annotations

import copy

import dask.array
import dask.core
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ConvModel, assert_analyses_close, mlp64, reference_per_sample_grads

import trajlab
from trajlab.analysis import analyze, open_analysis
from trajlab.analysis import tasks as tasks_module
from trajlab.analysis.plan import AnalysisOptions, make_plan
from trajlab.spectral import hessian_quadform


def record(model, X, Y, store, *, steps, lr=0.05, batch_size=8, seed=0, keep=None, **kw):
    """SGD under a recorder; ``keep`` collects (pre-step model copy, batch) per step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with trajlab.Recorder(model, store, optimizer=opt, loss_fn=F.cross_entropy, **kw) as rec:
        for _ in range(steps):
            idx = torch.randint(0, len(X), (batch_size,), generator=g)
            if keep is not None:
                keep.append((copy.deepcopy(model), idx))
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    torch.manual_seed(0)
    X = torch.randn(128, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (128,))
    store = tmp_path_factory.mktemp("a") / "run.zarr"
    keep: list = []
    record(mlp64(), X, Y, store, steps=24, keep=keep)
    return store, X, Y, keep


def direct_terms(model, X, Y, idx, lr):
    """MATH.md §3-§4 evaluated directly on dense torch.func per-sample gradients."""
    ps = reference_per_sample_grads(model, F.cross_entropy, X[idx], Y[idx])
    B = len(idx)
    out = {}
    cs = []
    for name in ("0", "2"):
        W = dict(model.named_parameters())[f"{name}.weight"].detach()
        G = ps[f"{name}.weight"]
        g = G.mean(0)
        Om = G - g
        U, S, Vh = torch.linalg.svd(W)
        u1, v1 = U[:, 0], Vh[0]
        c = torch.einsum("m,bmn,n->b", u1, Om, v1)
        d2 = hessian_quadform(W, Om, method="svd")
        out[name] = {
            "K": S[0],
            "drift_flow": -(u1 @ g @ v1),
            "diffusion2": lr * (c**2).sum() / (B * (B - 1)),
            "drift_noise": lr * d2.sum() / (2 * B * (B - 1)),
        }
        cs.append(c / S[0])
    cs = torch.stack(cs)
    out["logK_diffusion2"] = lr * (cs.sum(0) ** 2).sum() / (B * (B - 1))
    return out


def test_terms_from_store_equal_torch_func_reference(mlp_run):
    store, X, Y, keep = mlp_run
    ds = analyze(store, scheduler="synchronous", progress=False)
    for step in (0, 7, 23):
        model, idx = keep[step]
        ref = direct_terms(model, X, Y, idx, 0.05)
        for li, name in enumerate(("0", "2")):
            for k, v in ref[name].items():
                got = float(ds[k].sel(step=step, layer=name))
                assert got == pytest.approx(float(v), rel=1e-8, abs=1e-14), (step, name, k)
        assert float(ds.logK_diffusion2.sel(step=step)) == pytest.approx(
            float(ref["logK_diffusion2"]), rel=1e-8)


def test_variance_plus_covariance_is_total(mlp_run):
    ds = analyze(mlp_run[0], scheduler="synchronous", progress=False)
    np.testing.assert_allclose(ds.drift_noise_var + ds.drift_noise_cov, ds.drift_noise,
                               rtol=1e-12, atol=1e-18)
    np.testing.assert_allclose(ds.diffusion2_var + ds.diffusion2_cov, ds.diffusion2,
                               rtol=1e-12, atol=1e-18)
    assert (ds.logK_noise_curvature >= 0).all()
    np.testing.assert_allclose(ds.time.diff("step"), 0.05)


def test_dask_result_equals_eager_loop(mlp_run):
    """The graph's result == calling the chunk kernel once over all rows, no Dask."""
    store = mlp_run[0]
    ds = analyze(store, scheduler="threads", chunk_rows=5, progress=False)
    run = trajlab.open_run(store)
    plan = make_plan(run, None, None, run.n_steps, AnalysisOptions())
    for li, name in enumerate(run.layers):
        eager = tasks_module.layer_chunk(plan, li, (0, run.n_steps))
        # chunks of 5 rows against all rows at once: equal up to rounding (another batch shape
        # may take another BLAS kernel)
        assert_analyses_close(ds.sel(layer=name), eager, names=(
            "K", "drift_flow", "drift_noise", "diffusion2", "pathwise_increment"))


def test_pathwise_reconstruction_tracks_measured_K(tmp_path):
    torch.manual_seed(4)
    X = torch.randn(256, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (256,))
    record(mlp64(4), X, Y, tmp_path / "r.zarr", steps=200, batch_size=16)
    ds = analyze(tmp_path / "r.zarr", scheduler="threads", progress=False)
    last = ds.isel(step=-1)
    rel = np.abs(last.K_pathwise - last.K) / last.K
    assert (rel < 5e-3).all(), rel.values
    first_order = ds.K.isel(step=0) + ds.pathwise_first_order.isel(step=slice(0, -1)).sum("step")
    rel1 = np.abs(first_order - last.K) / last.K
    assert (rel1 > rel).all()  # the second-order term matters
    np.testing.assert_allclose(ds.K_net_pathwise.isel(step=0), ds.K_net.isel(step=0))


def test_conv_run_analyses_with_full_coverage(tmp_path):
    torch.manual_seed(5)
    X = torch.randn(64, 3, 8, 8, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    record(ConvModel().double(), X, Y, tmp_path / "r.zarr", steps=6, rank=2)
    ds = analyze(tmp_path / "r.zarr", scheduler="synchronous", progress=False)
    np.testing.assert_allclose(ds.coverage, 1.0, atol=1e-9)
    assert np.isfinite(ds.drift_noise).all() and np.isfinite(ds.logK_diffusion2).all()
    assert "matrix" in ds.attrs["conv_definition"]


def test_two_process_cluster_equals_threads(mlp_run, tmp_path):
    store = mlp_run[0]
    a = analyze(store, scheduler="threads", progress=False)
    b = analyze(store, out=tmp_path / "an.zarr", workers=2, progress=False).compute()
    assert set(a.data_vars) <= set(b.data_vars)
    assert_analyses_close(b, a)  # other processes, other thread counts: equal up to rounding
    assert list(b.layer.values) == ["0", "2"]


def test_interrupted_analysis_resumes_without_recomputing(mlp_run, tmp_path, monkeypatch,
                                                          capsys):
    store = mlp_run[0]
    full = analyze(store, scheduler="synchronous", chunk_rows=4, progress=False)
    out = tmp_path / "an.zarr"
    calls = []
    real = tasks_module.layer_chunk

    def flaky(*args):
        rows = args[2]
        calls.append(rows)
        if rows[0] >= 12:
            raise KeyboardInterrupt("killed")
        return real(*args)

    monkeypatch.setattr("trajlab.analysis.pipeline.layer_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        analyze(store, out=out, scheduler="synchronous", chunk_rows=4, progress=False)
    with pytest.raises(trajlab.StoreError, match="unfinished"):
        open_analysis(out)
    done_before = {r for r in calls if r[0] < 12}
    calls.clear()
    monkeypatch.setattr("trajlab.analysis.pipeline.layer_chunk", real)
    monkeypatch.setattr("trajlab.analysis.pipeline.layer_chunk",
                        lambda *a: calls.append(a[2]) or real(*a))
    capsys.readouterr()
    resumed = analyze(store, out=out, scheduler="synchronous", chunk_rows=4, progress=True)
    left = len({r[1] for r in calls})
    assert f"resuming {out}: {left} of 6 chunks left" in capsys.readouterr().err
    assert not (set(calls) & done_before)  # finished chunks were not recomputed
    for k in full.data_vars:
        np.testing.assert_array_equal(resumed[k].values, full[k].values)


def test_a_store_reanalysed_in_place_opens_with_its_new_values(mlp_run, tmp_path):
    """Lazy variables are named per opening, never from the path: a dataset opened before the
    store was overwritten and one opened after never share a Dask name (or values)."""
    store = mlp_run[0]
    out = tmp_path / "an.zarr"
    old = analyze(store, out=out, steps=(0, 12), scheduler="synchronous", progress=False)
    old_K = old.K.values.copy()
    new = analyze(store, out=out, steps=(12, 24), overwrite=True, scheduler="synchronous",
                  progress=False)
    assert isinstance(new.K.data, dask.array.Array)  # lazy; the step index is in memory
    assert not isinstance(new.step.data, dask.array.Array)
    keys = {str(k) for k in dask.core.flatten(new.K.data.__dask_keys__())}
    assert not keys & {str(k) for k in dask.core.flatten(old.K.data.__dask_keys__())}
    np.testing.assert_array_equal(new.step.values, np.arange(12, 24))
    direct = analyze(store, steps=(12, 24), scheduler="synchronous", progress=False)
    np.testing.assert_allclose(new.K.values, direct.K.values, rtol=1e-14)
    assert not np.array_equal(open_analysis(out).K.values, old_K)


def test_bad_arguments(mlp_run, tmp_path):
    store = mlp_run[0]
    with pytest.raises(KeyError, match="recorded"):
        analyze(store, layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="select no recorded step"):
        analyze(store, steps=(1000, 2000), progress=False)
    with pytest.raises(ValueError, match="gradient"):
        analyze(store, gradient="exact", progress=False)
    analyze(store, out=tmp_path / "a.zarr", scheduler="synchronous", progress=False)
    with pytest.raises(trajlab.StoreError, match="does not match this request.*rows 0..24"):
        analyze(store, out=tmp_path / "a.zarr", steps=(0, 5), scheduler="synchronous",
                progress=False)
    with pytest.raises(FileNotFoundError):
        open_analysis(tmp_path / "missing.zarr")


def test_operator_definition_adds_exact_conv_norms(tmp_path):
    from trajlab.spectral import conv_operator_matrix

    torch.manual_seed(6)
    X = torch.randn(32, 3, 8, 8, dtype=torch.float64)
    Y = torch.randint(0, 4, (32,))
    record(ConvModel().double(), X, Y, tmp_path / "r.zarr", steps=3, rank=2)
    ds = analyze(tmp_path / "r.zarr", scheduler="synchronous", progress=False,
                 conv_definition="operator")
    run = trajlab.open_run(tmp_path / "r.zarr")
    geo = run.layer_meta("conv").geometry
    for step in range(3):
        W = run.layer("conv").weight.sel(step=step).values
        kernel = torch.from_numpy(W).reshape(geo.kernel_shape)
        A = conv_operator_matrix(kernel, tuple(geo.input_size), stride=tuple(geo.stride),
                                 padding=tuple(geo.padding), dilation=tuple(geo.dilation))
        exact = float(torch.linalg.matrix_norm(A, ord=2))
        assert float(ds.K_operator.sel(step=step, layer="conv")) == pytest.approx(exact, rel=1e-8)
    np.testing.assert_allclose(ds.K_operator.sel(layer="fc"), ds.K.sel(layer="fc"))
    np.testing.assert_allclose(ds.K_net_operator, ds.K_operator.prod("layer"))
    assert "6b" in ds.attrs["conv_definition"]


def test_drift_optimizer_is_zero_for_sgd_and_minus_lambda_K_for_weight_decay(tmp_path):
    torch.manual_seed(8)
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    record(mlp64(8), X, Y, tmp_path / "sgd.zarr", steps=5)
    ds = analyze(tmp_path / "sgd.zarr", scheduler="synchronous", progress=False)
    assert np.abs(ds.drift_optimizer / ds.K).max() < 1e-10
    model = mlp64(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=0.01)
    with trajlab.Recorder(model, tmp_path / "wd.zarr", optimizer=opt) as rec:
        for s in range(5):
            idx = torch.arange(8) + 8 * s
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            rec.log(indices=idx)
            opt.step()
    wd = analyze(tmp_path / "wd.zarr", scheduler="synchronous", progress=False)
    np.testing.assert_allclose(wd.drift_optimizer, -0.01 * wd.K, rtol=1e-9)
    np.testing.assert_allclose(wd.logK_drift_optimizer, -0.01 * 2, rtol=1e-9)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_simulated_paths_match_the_lognormal_prediction(tmp_path, momentum):
    """The paths' law is the default forward prediction's (logK_pred_mean, logK_pred_var),
    with momentum too, where the noise a step injects is carried to later steps."""
    from trajlab.analysis import simulate_paths

    torch.manual_seed(0)
    X = torch.randn(128, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (128,))
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    probe = trajlab.FullGradientProbe([(X, Y)], F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, loss_fn=F.cross_entropy,
                          probe=probe) as rec:
        for _ in range(16):
            idx = torch.randint(0, len(X), (8,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
    ds = analyze(tmp_path / "r.zarr", scheduler="synchronous", progress=False)
    mean, var = float(ds.logK_pred_mean[-1]), float(ds.logK_pred_var[-1])
    assert np.isfinite(mean) and var > 0
    paths = simulate_paths(ds, n_paths=4000, seed=1)
    assert paths.dims == ("path", "step") and paths.sizes["step"] == ds.sizes["step"]
    assert paths.attrs["theory"] == ds.logK_pred_mean.attrs["theory"]
    z = np.log(paths.isel(step=-1).values)
    assert abs(z.mean() - mean) < 5 * np.sqrt(var / 4000)
    assert abs(z.var() / var - 1) < 0.15
    again = simulate_paths(ds, n_paths=4000, seed=1)
    np.testing.assert_array_equal(again.values, paths.values)  # seeded, no global RNG
    stored = analyze(tmp_path / "r.zarr", out=tmp_path / "a.zarr", scheduler="synchronous",
                     progress=False)  # a stored analysis names its theories too
    for k in ("logK_pred_mean", "K_net_pred_upper", "logK_pred_mean_sgd", "K_pathwise"):
        assert stored[k].attrs["theory"] == ds[k].attrs["theory"], k
    assert "momentum" in ds.logK_pred_mean.attrs["theory"].lower() or momentum == 0


def test_analysing_a_run_that_is_being_recorded_says_so(mlp_run):
    from trajlab.store.lock import StoreLock

    lock = StoreLock(mlp_run[0], what="recorder")
    lock.acquire()  # as a live recorder would hold it
    try:
        with pytest.warns(UserWarning, match="still being recorded.*24 committed steps"):
            analyze(mlp_run[0], scheduler="synchronous", progress=False)
    finally:
        lock.release()
