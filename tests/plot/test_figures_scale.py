"""Figures and summaries that scale to 100 layers (issue 22, item 7): grids that wrap,
shortened layer names with a key, no library warnings, prediction labels from
``attrs["theory"]``, ``trajlab plot`` writing every figure, ``trajlab analyze`` ending with the
measured-vs-predicted line, and a readable ``rec.summary``."""

from __future__ import annotations

import warnings

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from helpers import mlp64, train
from torch import nn

import trajlab
from trajlab.cli import main
from trajlab.plot import figures

matplotlib.use("Agg")

LONG = "encoder.blocks.{}.feed_forward_projection"


def synthetic(n_layers: int, *, steps: int = 30, names: str = LONG) -> xr.Dataset:
    """An analysis-shaped Dataset with every variable the figures read."""
    rng = np.random.default_rng(n_layers)
    layers = [names.format(i) for i in range(n_layers)]
    K = 1 + 0.05 * rng.standard_normal((steps, n_layers)).cumsum(0)
    lay = {k: 0.01 * rng.standard_normal((steps, n_layers)) for k in
           ("drift_flow", "drift_noise", "drift_noise_var", "drift_noise_cov", "diffusion2",
            "diffusion2_var", "diffusion2_cov", "drift_optimizer")}
    net = np.prod(K, axis=1)
    data = {"K": K, "K_pred_mean": K * 1.01, "K_pred_mean_sgd": K * 0.99,
            "K_pathwise": K * 1.001, "degenerate": np.zeros_like(K, dtype=bool),
            "dt": np.full_like(K, 0.05), **lay}
    ds = xr.Dataset({k: (("step", "layer"), v) for k, v in data.items()},
                    coords={"step": np.arange(steps), "layer": layers})
    for k, v in {"K_net": net, "logK": np.log(net), "logK_pred_mean": np.log(net * 1.01),
                 "logK_pred_mean_sgd": np.log(net * 0.99), "logK_pred_var": np.full(steps, 0.01),
                 "K_net_pred_lower": net * 0.9, "K_net_pred_upper": net * 1.1,
                 "K_net_pathwise": net * 1.001, "net_dt": np.full(steps, 0.05),
                 "logK_drift": 0.01 * rng.standard_normal(steps),
                 "logK_drift_optimizer": 0.01 * rng.standard_normal(steps),
                 "logK_noise_curvature": 0.01 * rng.standard_normal(steps),
                 "logK_discretization": 1e-4 * rng.standard_normal(steps)}.items():
        ds[k] = ("step", v)
    return ds


def grid_shape(fig) -> tuple[int, int]:
    specs = [ax.get_subplotspec() for ax in fig.axes if ax.get_subplotspec() is not None]
    gs = specs[0].get_gridspec()
    return gs.nrows, gs.ncols


def legend_texts(fig) -> list[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t.get_text() for leg in legends for t in leg.get_texts()]


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("figure", ["plot_noise_split", "plot_validation"])
def test_a_hundred_layers_wrap_into_a_grid_a_screen_can_show(figure):
    ds = synthetic(100)
    fig = getattr(figures, figure)(ds)
    try:
        w, h = fig.get_size_inches()
        assert w <= 40 and h <= 40, f"{figure}: {w:.0f} x {h:.0f} inches"
        assert 0.33 <= w / h <= 3, f"{figure}: aspect {w / h:.2f} (one long row or column)"
        rows, cols = grid_shape(fig)
        assert cols <= 10 and rows >= 10
        titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
        assert titles and max(len(t) for t in titles) <= 40, max(titles, key=len)
        assert not any(LONG.format(7) in t for t in titles)
        key = legend_texts(fig)
        for i in (0, 57, 99):  # the key gives every full name
            assert any(t.endswith(f"= {LONG.format(i)}") for t in key)
    finally:
        plt.close(fig)


def test_a_few_short_layers_keep_their_layout():
    ds = synthetic(3, names="fc{}")
    fig = figures.plot_validation(ds)
    try:
        assert grid_shape(fig) == (2, 3)
        assert [ax.get_title() for ax in fig.axes[:3]] == ["layer fc0", "layer fc1", "layer fc2"]
        assert not any(" = " in t for t in legend_texts(fig))  # nothing shortened: no key
    finally:
        plt.close(fig)
    fig = figures.plot_noise_split(ds)
    try:
        assert grid_shape(fig) == (2, 3)
    finally:
        plt.close(fig)


def test_layer_labels():
    labels, key = figures.layer_labels([LONG.format(i) for i in range(100)]
                                       + ["classifier_head"])
    assert max(map(len, labels)) <= figures.LABEL_CHARS
    assert len(set(labels)) == 101
    assert dict(key)[labels[42]] == LONG.format(42) and "classifier_head" not in dict(key)
    # a common prefix is left out, short names are kept
    assert figures.layer_labels(["model.layers.0.mlp", "model.layers.1.mlp"])[0] == ["0.mlp",
                                                                                 "1.mlp"]
    assert figures.layer_labels(["fc1", "fc2"]) == (["fc1", "fc2"], [])
    # labels that would collide are numbered
    labels, key = figures.layer_labels(["x" * 30 + "a" + "y" * 30, "x" * 30 + "b" + "y" * 30])
    assert labels == ["L0", "L1"] and len(key) == 2


def test_a_shortened_single_layer_is_labelled_too():
    labels, key = figures.layer_labels(
        ["a_very_long_module_name_inside.another_long_component_here"])
    assert len(labels[0]) <= figures.LABEL_CHARS and key


# ----------------------------------------------------------------------------- warnings
def test_figures_print_no_warnings_on_undefined_values():
    """A zero learning rate at the first step (warm-up) and NaN noise terms, Dask-backed: the
    arithmetic that meets them warns nowhere, also in Dask's threads."""
    ds = synthetic(4, names="l{}")
    ds["dt"][0] = 0.0
    ds["net_dt"][0] = 0.0
    ds["drift_noise"][:5] = np.nan
    ds["diffusion2"][:, 1] = np.nan
    ds = ds.chunk({"step": 7})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("plot_validation", "plot_drift", "plot_noise_split", "plot_band"):
            plt.close(getattr(ds.lipschitz, name)())


# ----------------------------------------------------------------------------- labels
def test_prediction_labels_come_from_the_theory_attribute():
    ds = synthetic(2, names="l{}")
    for k in ("K_pred_mean", "logK_pred_mean", "K_net_pred_lower"):
        ds[k].attrs["theory"] = "SDE for SGD with momentum (test)"
    for k in ("K_pred_mean_sgd", "logK_pred_mean_sgd"):
        ds[k].attrs["theory"] = "SDE for SGD (paper)"
    fig = figures.plot_validation(ds)
    try:
        labels = legend_texts(fig)
        assert "SDE for SGD with momentum (test): predicted mean of K" in labels
        assert "SDE for SGD with momentum (test): exp E[Z]" in labels
        assert "SDE for SGD (paper): predicted mean of K" in labels  # drawn: drift_optimizer
        assert figures.SDE_OPT_LABEL not in labels
    finally:
        plt.close(fig)
    fig = figures.plot_band(ds)
    try:
        assert "SDE for SGD with momentum (test): predicted median" in legend_texts(fig)
    finally:
        plt.close(fig)
    # without the attribute: today's labels
    fig = figures.plot_validation(synthetic(2, names="l{}"))
    try:
        assert figures.SDE_OPT_LABEL in legend_texts(fig)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("figscale")
    X = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(8))
    run = root / "run.zarr"
    train(mlp64(), X, Y, steps=10, store=run)
    return root, run


def test_analyze_ends_with_measured_vs_predicted_and_plot_writes_every_figure(analysed, capsys):
    root, run = analysed
    out = root / "a.zarr"
    assert main(["analyze", str(run), "--out", str(out), "--scheduler", "synchronous",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "log K_net: measured change" in text
    assert "probe" in text  # no probe recorded: says how to get a prediction
    figs = root / "figs"
    assert main(["plot", str(out), "--out-dir", str(figs)]) == 0
    written = sorted(p.name for p in figs.glob("*.png"))
    assert written == ["a_band.png", "a_drift.png", "a_noise.png", "a_validation.png"]


def test_the_prediction_line_with_a_prediction():
    from trajlab.cli._util import prediction_line

    ds = synthetic(2, names="l{}")
    ds.attrs["optimizer_theory"] = "SDE for SGD (paper)"
    line = prediction_line(ds, missing="-")
    assert line.startswith("log K_net: measured change ")
    assert "SDE for SGD (paper)" in line and "predicts" in line and "95%" in line


# ----------------------------------------------------------------------------- summary
def test_the_model_summary_reads_as_a_table_and_stays_a_dict(tmp_path):
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(30):
        mods += [nn.Linear(5, 5), nn.Tanh()]
    mods += [nn.BatchNorm1d(5).eval(), nn.Linear(5, 3)]
    model = nn.Sequential(*mods).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not recorded: BatchNorm1d" is expected here
        rec = trajlab.Recorder(model, tmp_path / "run.zarr", optimizer=opt,
                               loss_fn=F.cross_entropy)
    text = repr(rec.summary)
    lines = text.splitlines()
    assert lines[0].startswith("trajlab model summary: 31 of 32 modules")
    assert "recorded (31):" in text and "... and 19 more" in text
    assert "not recorded (1):" in text and "BatchNorm1d" in text
    assert len(lines) <= 25 and max(map(len, lines)) <= 300
    assert str(rec.summary) == text
    assert isinstance(rec.summary, dict) and len(rec.summary["modules"]) == 32
