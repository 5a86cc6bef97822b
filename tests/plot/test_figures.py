"""The figures: legends off every axis label, no all-NaN curves, which prediction is drawn."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn

import trajlab
from trajlab.plot import figures
from trajlab.plot.figures import NEEDS, needed_variables

matplotlib.use("Agg")

NOT_A_BOUND = ("product of sigma_1 over 2 matrices (0, 2): 117 of the model's 171 "
               "weight-matrix parameters (68%). NOT a Lipschitz bound of this network: it leaves "
               "out weight matrices that were not analysed")


def mlp(n_layers: int) -> nn.Module:
    torch.manual_seed(0)
    dims = [6] + [7] * (n_layers - 1) + [4]
    mods: list[nn.Module] = []
    for i in range(n_layers):
        mods += [nn.Linear(dims[i], dims[i + 1]), nn.Tanh()]
    return nn.Sequential(*mods[:-1]).double()


def record_and_analyse(path, *, n_layers=2, momentum=0.0, every=1, steps=12, per_sample=True):
    """A short recorded run (SGD, optionally with momentum) and its in-memory analysis."""
    torch.manual_seed(1)
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    model = mlp(n_layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    g = torch.Generator().manual_seed(0)
    probe = trajlab.FullGradientProbe([(X, Y)], F.cross_entropy)  # the prediction's grad L
    with trajlab.Recorder(model, path, optimizer=opt, loss_fn=F.cross_entropy, every=every,
                          per_sample=per_sample, probe=probe,
                          metadata={"optimizer": "momentum" if momentum else "sgd"}) as rec:
        for _ in range(steps):
            idx = torch.randint(0, len(X), (8,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
    return trajlab.analyze(path, scheduler="synchronous", progress=False).load()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("figures")
    return {
        "sgd": record_and_analyse(base / "sgd.zarr"),
        "momentum": record_and_analyse(base / "momentum.zarr", momentum=0.9),
        "every2": record_and_analyse(base / "every2.zarr", every=2),
        "weights_only": record_and_analyse(base / "w.zarr", momentum=0.9, per_sample=False),
    }


def synthetic(n_layers: int, *, steps: int = 80) -> xr.Dataset:
    """An analysis-shaped Dataset with every variable the figures read (layout tests)."""
    rng = np.random.default_rng(n_layers)
    layers = [f"features.{i}" for i in range(n_layers)]
    K = 1 + 0.05 * rng.standard_normal((steps, n_layers)).cumsum(0)
    lay = {k: 0.01 * rng.standard_normal((steps, n_layers)) for k in
           ("drift_flow", "drift_noise", "drift_noise_var", "drift_noise_cov", "diffusion2",
            "diffusion2_var", "diffusion2_cov")}
    net = np.prod(K, axis=1)
    data = {
        "K": K, "K_pred_mean": K * 1.01, "K_pred_mean_sgd": K * 0.99, "K_pathwise": K * 1.001,
        "degenerate": np.zeros_like(K, dtype=bool), "dt": np.full_like(K, 0.05), **lay,
    }
    ds = xr.Dataset({k: (("step", "layer"), v) for k, v in data.items()},
                    coords={"step": np.arange(steps), "layer": layers})
    ds["degenerate"][5, 0] = True
    for k, v in {"K_net": net, "logK": np.log(net), "logK_pred_mean": np.log(net * 1.01),
                 "logK_pred_mean_sgd": np.log(net * 0.99), "K_net_pred_lower": net * 0.9,
                 "K_net_pred_upper": net * 1.1, "K_net_pathwise": net * 1.001,
                 "net_dt": np.full(steps, 0.05), "logK_drift": 0.01 * rng.standard_normal(steps),
                 "logK_drift_optimizer": 0.01 * rng.standard_normal(steps),
                 "logK_noise_curvature": 0.01 * rng.standard_normal(steps),
                 "logK_discretization": 1e-4 * rng.standard_normal(steps)}.items():
        ds[k] = ("step", v)
    ds.attrs.update(optimizer="adamw", k_net=NOT_A_BOUND)
    return ds


def legend_labels(fig) -> list[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t.get_text() for leg in legends for t in leg.get_texts()]


def line_labels(fig) -> list[str]:
    return [ln.get_label() for ax in fig.axes for ln in ax.get_lines()]


def assert_legends_clear_of_axes(fig):
    """No legend overlaps an x-label, tick labels or plot area of another axis, and every
    legend lies inside the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    fig_box = fig.bbox
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_subplotspec() is not None]
    assert fig.legends, "expected one figure legend"
    for leg in fig.legends:
        box = leg.get_window_extent(renderer)
        assert fig_box.x0 - 1 <= box.x0 and box.x1 <= fig_box.x1 + 1, "legend wider than figure"
        assert fig_box.y0 - 1 <= box.y0 and box.y1 <= fig_box.y1 + 1, "legend outside figure"
        for ax in axes:
            label = ax.xaxis.label.get_window_extent(renderer)
            assert not box.overlaps(label), f"legend overlaps x-label of {ax.get_title()!r}"
            assert not box.overlaps(ax.get_tightbbox(renderer)), \
                f"legend overlaps the axes {ax.get_title()!r}"


@pytest.mark.parametrize("n_layers", [1, 2, 3, 5])
def test_validation_legend_clear_of_axis_labels(n_layers):
    fig = figures.plot_validation(synthetic(n_layers))
    try:
        assert_legends_clear_of_axes(fig)
    finally:
        plt.close(fig)


def test_validation_legend_clear_on_recorded_runs(runs):
    for ds in runs.values():
        fig = ds.lipschitz.plot_validation()
        try:
            assert_legends_clear_of_axes(fig)
        finally:
            plt.close(fig)


def test_pathwise_not_drawn_when_all_nan(runs):
    ds = runs["every2"]
    assert np.isnan(ds.K_pathwise).all() and np.isnan(ds.K_net_pathwise).all()
    fig = ds.lipschitz.plot_validation()
    try:
        assert not [t for t in legend_labels(fig) if "pathwise" in t]
        assert not [t for t in line_labels(fig) if "pathwise" in t]
    finally:
        plt.close(fig)
    fig = runs["sgd"].lipschitz.plot_validation()  # every=1: drawn and listed
    try:
        assert "pathwise 2nd order" in legend_labels(fig) and "pathwise" in legend_labels(fig)
    finally:
        plt.close(fig)


def test_momentum_run_draws_optimizer_aware_and_sgd_predictions(runs):
    ds = runs["momentum"]
    assert figures.optimizer_aware(ds)
    theory = ds.K_pred_mean.attrs["theory"]
    assert "momentum" in theory and ds.K_pred_mean_sgd.attrs["theory"] == "SDE for SGD (paper)"
    fig = ds.lipschitz.plot_validation()
    try:
        labels = legend_labels(fig)
        for label in (f"{theory}: predicted mean of K", "SDE for SGD (paper): predicted mean of K",
                      f"{theory}: exp E[Z]", "SDE for SGD (paper): exp E[Z]"):
            assert label in labels
        sgd_lines = [ln for ax in fig.axes for ln in ax.get_lines()
                     if ln.get_label() == "SDE for SGD (paper): predicted mean of K"]
        assert sgd_lines and all(ln.get_alpha() < 1 for ln in sgd_lines)  # the fainter line
        np.testing.assert_allclose(sgd_lines[0].get_ydata(), ds.K_pred_mean_sgd[:, 0])
        assert "momentum" in fig._suptitle.get_text()
    finally:
        plt.close(fig)
    fig = ds.lipschitz.plot_band()
    try:
        assert "SDE for SGD (paper): predicted median" in legend_labels(fig)
        assert f"{theory}: predicted median" in legend_labels(fig)
    finally:
        plt.close(fig)
    fig = ds.lipschitz.plot_drift()
    try:  # the realised update's drift is a reconstruction, never labelled a prediction
        labels = legend_labels(fig)
        assert ("pathwise reconstruction: μ_Z + realised optimizer drift + discretisation"
                in labels)
        assert not [t for t in labels if "optimizer-aware" in t]
    finally:
        plt.close(fig)


def test_plain_sgd_run_draws_one_prediction(runs):
    ds = runs["sgd"]
    assert not figures.optimizer_aware(ds)
    for plot in (ds.lipschitz.plot_validation, ds.lipschitz.plot_band, ds.lipschitz.plot_drift):
        fig = plot()
        try:
            labels = legend_labels(fig)
            assert not [t for t in labels if "paper, SGD" in t or "optimizer" in t]
        finally:
            plt.close(fig)
    fig = ds.lipschitz.plot_validation()
    try:
        assert "SDE for SGD (paper): predicted mean of K" in legend_labels(fig)
    finally:
        plt.close(fig)


def test_network_title_says_when_k_net_is_not_a_bound(runs):
    ds = runs["sgd"].copy()
    fig = ds.lipschitz.plot_validation()
    try:
        assert fig.axes[len(ds.layer)].get_title() == "network bound K_net = Π K_ℓ"
    finally:
        plt.close(fig)
    ds.attrs["k_net"] = NOT_A_BOUND
    fig = ds.lipschitz.plot_validation()
    try:
        title = fig.axes[len(ds.layer)].get_title()
        assert "NOT a Lipschitz bound" in title and "covers 2 matrices, 68%" in title
    finally:
        plt.close(fig)


@pytest.mark.parametrize("figure", sorted(NEEDS))
def test_figures_read_only_their_needed_variables(runs, figure):
    """The `trajlab plot` path: a Dataset cut to needed_variables draws the same figure."""
    for name in ("sgd", "momentum"):
        ds = runs[name]
        full = getattr(figures, figure)(ds)
        sub = getattr(figures, figure)(ds[needed_variables(figure, ds)])
        try:
            assert legend_labels(sub) == legend_labels(full)
            assert line_labels(sub) == line_labels(full)
        finally:
            plt.close(full)
            plt.close(sub)


def test_weights_only_run_draws_no_prediction_and_says_why(runs):
    """Without per-sample information the predictions are NaN: no SDE curve or band is drawn or
    listed, the title says why, the noise figure is refused, and the drift figure keeps the
    flow and the optimizer's drift (momentum is detected from it, not from the predictions)."""
    ds = runs["weights_only"]
    assert np.isnan(ds.logK_pred_mean.values[1:]).all()
    fig = ds.lipschitz.plot_validation()
    try:
        labels = legend_labels(fig)
        assert "measured σ1(W)" in labels and "pathwise 2nd order" in labels
        assert not any(lab.startswith("SDE") for lab in labels), labels
        assert "no SDE prediction" in fig._suptitle.get_text()
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="per_sample=False"):
        ds.lipschitz.plot_noise_split()
    assert figures.optimizer_aware(ds)
    fig = ds.lipschitz.plot_drift()
    try:
        labels = legend_labels(fig)
        assert any(lab.startswith("gradient flow") for lab in labels)
        assert any(lab.startswith("pathwise: realised optimizer drift") for lab in labels)
        assert not any("κ_Z" in lab or "Itô" in lab or lab.startswith("SDE") for lab in labels)
    finally:
        plt.close(fig)
    fig = ds.lipschitz.plot_band()
    try:
        assert not any("predicted" in lab for lab in legend_labels(fig))
    finally:
        plt.close(fig)


def test_band_draws_the_weight_matrices_k_net_in_a_batchnorm_chain():
    """The SDE predicts the product over weight matrices: in a BatchNorm chain the measured line
    on the band figure divides K_net by the BatchNorm factors (which have no SDE terms)."""
    import matplotlib
    import numpy as np
    import xarray as xr

    from trajlab.plot.figures import plot_band

    matplotlib.use("Agg")
    steps = np.arange(5)
    k_mat = np.exp(np.linspace(0.0, 0.4, 5))
    bn = np.full(5, 3.0)
    ds = xr.Dataset({"K_net": ("step", k_mat * bn), "K_net_batchnorm": ("step", bn),
                     "logK": ("step", np.log(k_mat))}, coords={"step": steps})
    from trajlab.plot import needed_variables

    fig = plot_band(ds[needed_variables("plot_band", ds)])  # what `trajlab plot` passes
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("measured"))
    np.testing.assert_allclose(line.get_ydata(), k_mat, rtol=1e-12)
    assert "BatchNorm factors left out" in line.get_label()
    ds["K_net_batchnorm"] = ("step", np.ones(5))
    fig = plot_band(ds)
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("measured"))
    np.testing.assert_allclose(line.get_ydata(), k_mat * 3.0, rtol=1e-12)


def test_prediction_line_names_the_weight_matrices_in_a_batchnorm_chain():
    """logK (the SDE's state) leaves BatchNorm factors out: the printed line says so."""
    import numpy as np
    import xarray as xr

    from trajlab.cli._util import prediction_line

    ds = xr.Dataset({"logK": ("step", np.array([0.0, 0.25])),
                     "K_net_batchnorm": ("step", np.array([2.0, 3.0]))},
                    coords={"step": [0, 1]})
    line = prediction_line(ds, missing="a probe")
    assert line.startswith("log K_net of the weight matrices (BatchNorm factors left out): "
                           "measured change +0.250")
    ds["K_net_batchnorm"] = ("step", np.ones(2))
    assert prediction_line(ds, missing="a probe").startswith("log K_net: measured change +0.250")
