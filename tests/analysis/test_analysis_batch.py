"""Batch analysis of many runs: one graph, one store and resume state per run, and
``open_analyses`` combining them along ``run``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from helpers import ConvModel, assert_analyses_close, mlp64, train

import trajlab
from trajlab.analysis import tasks as tasks_module
from trajlab.analysis.pipeline import open_analyses
from trajlab.recipes import TrainConfig, record_digits
from trajlab.store.analysis_store import AnalysisStore


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs that differ in layers, lengths and batch sizes."""
    root = tmp_path_factory.mktemp("batch")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 6, dtype=torch.float64, generator=g)
    Y = torch.randint(0, 4, (64,), generator=g)
    Xc = torch.randn(32, 3, 8, 8, dtype=torch.float64, generator=g)
    train(mlp64(0), X, Y, steps=10, batch_size=8, store=root / "a.zarr",
          recorder_kwargs={"metadata": {"lr": 0.05, "batch_size": 8, "optimizer": "sgd"}})
    train(mlp64(1), X, Y, steps=14, batch_size=4, lr=0.1, store=root / "b.zarr",
          recorder_kwargs={"metadata": {"lr": 0.1, "batch_size": 4, "optimizer": "sgd"}})
    torch.manual_seed(5)
    train(ConvModel().double(), Xc, Y[:32], steps=7, batch_size=6, store=root / "c.zarr",
          recorder_kwargs={"metadata": {"lr": 0.05, "batch_size": 6, "optimizer": "sgd"},
                           "rank": 2})
    return [root / n for n in ("a.zarr", "b.zarr", "c.zarr")]


def assert_identical(a: xr.Dataset, b: xr.Dataset, *, exact: bool = False) -> None:
    """Same variables, steps and layers; values bit for bit where ``exact`` (one code path
    computed twice), else up to rounding (another scheduler or batching)."""
    assert set(a.data_vars) == set(b.data_vars)
    if exact:
        for k in a.data_vars:
            np.testing.assert_array_equal(a[k].values, b[k].values, err_msg=k)
    else:
        assert_analyses_close(a, b)
    np.testing.assert_array_equal(a.step.values, b.step.values)
    np.testing.assert_array_equal(a.layer.values, b.layer.values)


def test_many_runs_equal_single_run_analyses(runs, tmp_path):
    many = trajlab.analyze(runs, out=[tmp_path / f"m{i}.zarr" for i in range(3)],
                           scheduler="threads", chunk_rows=4, progress=False)
    in_memory = trajlab.analyze(runs, scheduler="synchronous", chunk_rows=4, progress=False)
    assert isinstance(many, list) and len(many) == 3
    for i, run in enumerate(runs):
        single = trajlab.analyze(run, out=tmp_path / f"s{i}.zarr", scheduler="synchronous",
                                 chunk_rows=4, progress=False)
        assert_identical(many[i], single)
        assert_identical(in_memory[i], single)
        assert many[i].attrs["run_id"] == trajlab.open_run(run).meta.identity


def test_many_run_arguments_are_checked(runs, tmp_path):
    with pytest.raises(ValueError, match="one analysis store per run"):
        trajlab.analyze(runs, out=tmp_path / "one.zarr", progress=False)
    with pytest.raises(ValueError, match="same analysis store"):
        trajlab.analyze(runs[:2], out=[tmp_path / "x.zarr", tmp_path / "x.zarr"],
                        progress=False)
    with pytest.raises(ValueError, match="no runs"):
        trajlab.analyze([], progress=False)


def test_open_analyses_aligns_runs_with_different_layers_and_lengths(runs, tmp_path):
    outs = [tmp_path / f"{i}.analysis.zarr" for i in range(3)]
    singles = trajlab.analyze(runs, out=outs, scheduler="threads", progress=False)
    ds = open_analyses(str(tmp_path / "*.analysis.zarr"))
    assert ds.sizes["run"] == 3 and ds.sizes["step"] == 14  # the longest run
    assert list(ds.layer.values) == ["0", "2", "conv", "fc"]  # union, first-seen order
    assert ds.sizes["sample"] == 8  # the largest batch
    assert ds.time.dims == ("run", "step")
    assert isinstance(ds.K.data, type(singles[0].K.data))  # still lazy (dask)
    for i, single in enumerate(singles):
        part = ds.isel(run=i)
        steps, layers = single.step.values, list(single.layer.values)
        np.testing.assert_array_equal(part.K.sel(step=steps, layer=layers).values,
                                      single.K.values)
        np.testing.assert_array_equal(part.logK_diffusion2.sel(step=steps).values,
                                      single.logK_diffusion2.values)
        np.testing.assert_array_equal(part.time.sel(step=steps).values, single.time.values)
        missing_layers = [x for x in ds.layer.values if x not in layers]
        assert np.isnan(part.K.sel(layer=missing_layers).values).all()
        missing_steps = np.setdiff1d(ds.step.values, steps)
        assert np.isnan(part.K_net.sel(step=missing_steps).values).all()
        B = single.sizes["sample"]
        assert np.isnan(part.noise_proj.sel(layer=layers, step=steps)
                        .isel(sample=slice(B, None)).values).all()
    # boolean flags become float with NaN where a run has no value
    assert ds.degenerate.dtype == np.float64
    assert np.isnan(ds.degenerate.isel(run=0).sel(layer="conv").values).all()
    assert set(np.unique(ds.degenerate.isel(run=0).sel(layer="0", step=range(10)))) <= {0, 1}
    assert "NaN" in open_analyses.__doc__
    # attributes that differ between runs stay per run (what K_net covers, where each run is)
    assert ds.run_k_net.dims == ("run",)
    for i, single in enumerate(singles):
        assert str(ds.run_k_net.values[i]) == single.attrs["k_net"]
        assert str(ds.run_store.values[i]) == single.attrs["run"]
    assert "trajlab" in ds.attrs and "k_net" not in ds.attrs


def test_open_analyses_of_aligned_runs_keeps_dtypes(runs, tmp_path):
    trajlab.analyze([runs[0], runs[0]], out=[tmp_path / "x.zarr", tmp_path / "y.zarr"],
                    scheduler="synchronous", progress=False)
    ds = open_analyses([tmp_path / "x.zarr", tmp_path / "y.zarr"])
    assert ds.degenerate.dtype == bool and ds.sizes == {"run": 2, "step": 10, "layer": 2,
                                                         "sample": 8}
    np.testing.assert_array_equal(ds.K.isel(run=0).values, ds.K.isel(run=1).values)
    with pytest.raises(FileNotFoundError):
        open_analyses(str(tmp_path / "nothing-*.zarr"))


def test_run_coordinates_from_recipes_allow_groupby(tmp_path):
    base = TrainConfig(model="mlp", hidden=8, steps=6, dtype="float64", lr=0.05)
    runs, outs = [], []
    for B in (8, 16):
        for seed in (0, 1):
            cfg = base.replace(batch_size=B, sampling_seed=seed,
                               optimizer="momentum" if seed else "sgd")
            runs.append(record_digits(tmp_path / f"r-{B}-{seed}.zarr", cfg, progress=False))
            outs.append(tmp_path / f"r-{B}-{seed}.analysis.zarr")
    trajlab.analyze(runs, out=outs, scheduler="threads", progress=False)
    ds = open_analyses(outs)
    assert ds.run_batch_size.values.tolist() == [8, 8, 16, 16]  # metadata, not the variable
    assert ds.run_batch_size.dtype == np.int64
    assert ds.batch_size.dims == ("run", "step")  # the per-step variable is kept
    assert ds.sampling_seed.values.tolist() == [0, 1, 0, 1]
    assert ds.run_lr.values.tolist() == [0.05] * 4
    assert ds.lr.dims == ("run", "step", "layer")
    assert ds.optimizer.values.tolist() == ["sgd", "momentum"] * 2
    assert ds.sampler.values.tolist() == ["with_replacement"] * 4
    assert (ds.dataset.values == "sklearn-digits").all()
    by_b = ds.logK_diffusion2.mean("step").groupby("run_batch_size").mean()
    assert by_b.run_batch_size.values.tolist() == [8, 16]
    per_run = ds.logK_diffusion2.mean("step").values
    np.testing.assert_allclose(by_b.values, [per_run[:2].mean(), per_run[2:].mean()])
    by_opt = ds.K_net.isel(step=-1).groupby("optimizer").mean()
    assert sorted(by_opt.optimizer.values.tolist()) == ["momentum", "sgd"]


def test_killed_many_run_analysis_resumes_only_unfinished_chunks(runs, tmp_path, monkeypatch):
    outs = [tmp_path / f"k{i}.zarr" for i in range(3)]
    full = trajlab.analyze(runs, scheduler="synchronous", chunk_rows=3, progress=False)
    real = tasks_module.layer_chunk
    calls: list[tuple[str, tuple[int, int]]] = []

    def flaky(plan, li, rows):
        if len(calls) >= 11:
            raise KeyboardInterrupt("killed")
        calls.append((str(plan.store), rows))
        return real(plan, li, rows)

    monkeypatch.setattr("trajlab.analysis.pipeline.layer_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        trajlab.analyze(runs, out=outs, scheduler="synchronous", chunk_rows=3, progress=False)
    chunks = {str(r): [(a, min(a + 3, n)) for a in range(0, n, 3)]
              for r, n in zip(runs, (10, 14, 7))}
    done = {str(r): AnalysisStore.open(o).done() if o.exists()
            else np.zeros(len(chunks[str(r)]), bool) for r, o in zip(runs, outs)}
    assert 0 < sum(d.sum() for d in done.values()) < sum(d.size for d in done.values())
    unfinished = {(r, c) for r in done for c, ok in zip(chunks[r], done[r]) if not ok}
    for r, o in zip(runs, outs):  # unfinished, or not laid out yet (or finished)
        if not done[str(r)].all():
            with pytest.raises((trajlab.StoreError, FileNotFoundError),
                               match="unfinished" if o.exists() else "no analysis store"):
                trajlab.open_analysis(o)

    calls.clear()
    monkeypatch.setattr("trajlab.analysis.pipeline.layer_chunk",
                        lambda plan, li, rows: calls.append((str(plan.store), rows))
                        or real(plan, li, rows))
    resumed = trajlab.analyze(runs, out=outs, scheduler="synchronous", chunk_rows=3,
                              progress=False)
    n_layers = {str(r): len(trajlab.open_run(r).layers) for r in runs}
    assert set(calls) == unfinished  # only the unfinished chunks of each run...
    for key in unfinished:  # ...each once per layer
        assert calls.count(key) == n_layers[key[0]]
    for a, b in zip(resumed, full):
        assert_identical(a, b, exact=True)


def test_figures_of_a_sweep(runs, tmp_path):
    """A sweep dataset: the band figure draws every run; one-run figures and simulate_paths
    say how to pick a run (they raised matplotlib/numpy errors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outs = [tmp_path / f"{i}.analysis.zarr" for i in range(3)]
    trajlab.analyze(runs, out=outs, scheduler="threads", progress=False)
    ds = open_analyses([str(o) for o in outs])
    fig = ds.lipschitz.plot_band()
    try:
        labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert labels[:3] == ["0.analysis", "1.analysis", "2.analysis"]
        assert len(fig.axes[0].get_lines()) >= 3
    finally:
        plt.close(fig)
    for draw in (ds.lipschitz.plot_validation, ds.lipschitz.plot_drift,
                 ds.lipschitz.plot_noise_split):
        with pytest.raises(ValueError, match=r"holds 3 along 'run'.*isel\(run=i\)"):
            draw()
    with pytest.raises(ValueError, match="simulate_paths takes one run"):
        trajlab.analysis.simulate_paths(ds)
    one = ds.isel(run=[1])  # a run dimension of size 1 draws as that run
    plt.close(ds.isel(run=1).lipschitz.plot_validation())
    plt.close(one.lipschitz.plot_drift())
