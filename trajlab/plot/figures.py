"""Figure functions: theory vs measurement, drift decomposition, noise split, prediction bands."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import xarray as xr


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        try:
            import matplotlib.pyplot as plt
        except Exception:  # pragma: no cover - headless without a GUI toolkit
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: Variables each figure reads (so a caller can load only those, e.g. ``trajlab plot``).
NEEDS: dict[str, tuple[str, ...]] = {
    "plot_validation": ("K", "K_pred_mean", "K_pred_mean_sgd", "K_pathwise", "degenerate",
                        "K_net", "K_net_pred_lower", "K_net_pred_upper", "logK_pred_mean",
                        "logK_pred_mean_sgd", "K_net_pathwise", "drift_optimizer", "dt"),
    "plot_drift": ("K", "dt", "net_dt", "drift_flow", "diffusion2", "logK_noise_curvature",
                   "logK_drift", "logK_drift_optimizer", "logK_discretization", "logK",
                   "logK_pred_mean", "logK_pred_mean_sgd", "drift_optimizer"),
    "plot_noise_split": ("drift_noise", "drift_noise_var", "drift_noise_cov", "diffusion2",
                         "diffusion2_var", "diffusion2_cov"),
    "plot_band": ("K_net_pred_lower", "K_net_pred_upper", "logK_pred_mean", "logK_pred_mean_sgd",
                  "K_net", "K", "drift_optimizer", "dt"),
}

#: Relative difference above which the optimizer-aware prediction (``K_pred_mean``,
#: ``logK_pred_mean``) counts as different from the paper's SGD one (``*_sgd``): the figures
#: then name it "optimizer-aware" and draw the SGD-only prediction as a second, fainter line.
SGD_RTOL = 1e-4

#: Legend labels of the predictions.
SDE_LABEL = "SDE: K(0)+∫μ dt"
SDE_OPT_LABEL = "SDE (optimizer-aware): K(0)+∫(μ+μ_opt)dt"
SDE_SGD_LABEL = "SDE (paper, SGD): K(0)+∫μ dt"
NET_LABEL = "SDE: exp E[Z]"
NET_OPT_LABEL = "SDE (optimizer-aware): exp E[Z]"
NET_SGD_LABEL = "SDE (paper, SGD): exp E[Z]"

#: Style of the SGD-only prediction drawn behind the optimizer-aware one.
_SGD_STYLE = {"color": "C0", "lw": 1.0, "ls": ":", "alpha": 0.55}


def needed_variables(figure: str, ds: xr.Dataset) -> list[str]:
    """The variables of ``ds`` that figure function ``figure`` reads."""
    return [k for k in NEEDS[figure] if k in ds.data_vars]


def optimizer_aware(ds: xr.Dataset) -> bool:
    """Whether the default prediction differs from the paper's SGD one (by > :data:`SGD_RTOL`).

    Compares ``K_pred_mean`` with ``K_pred_mean_sgd`` (relative) and ``logK_pred_mean`` with
    ``logK_pred_mean_sgd`` (absolute in log K = relative in K), over every step and layer
    present, and the optimizer's own drift integrated over time relative to K (which stays
    defined when the noise terms, and with them the predictions, are not). False for plain SGD
    (the optimizer's drift is 0 up to rounding) and when nothing to compare is present.
    """
    if all(k in ds.data_vars for k in ("drift_optimizer", "dt", "K")):
        inc = np.nan_to_num(np.asarray(ds.drift_optimizer.values * ds.dt.values, np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.abs(np.cumsum(inc, axis=0)) / np.abs(np.asarray(ds.K.values, np.float64))
        if np.nan_to_num(rel, nan=0.0, posinf=0.0).max(initial=0.0) > SGD_RTOL:
            return True
    for name, log in (("K_pred_mean", False), ("logK_pred_mean", True)):
        if name not in ds.data_vars or f"{name}_sgd" not in ds.data_vars:
            continue
        a = np.asarray(ds[name].values, dtype=np.float64)
        b = np.asarray(ds[f"{name}_sgd"].values, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            diff = np.abs(a - b) if log else np.abs(a - b) / np.abs(a)
        if np.nan_to_num(diff, nan=0.0, posinf=np.inf).max(initial=0.0) > SGD_RTOL:
            return True
    return False


def _drawn(ds: xr.Dataset, name: str) -> bool:
    """Whether ``name`` is present with a curve to draw: two finite values along the steps of
    some layer. Others are neither drawn nor listed (the pathwise reconstruction of runs recorded
    with every > 1; predictions without noise terms, defined at their first step only)."""
    if name not in ds.data_vars:
        return False
    values = np.asarray(ds[name].values)
    return bool((np.isfinite(values).sum(axis=0) >= 2).any()) if values.ndim else False


def _one_run(ds: xr.Dataset, figure: str) -> xr.Dataset:
    """``ds`` without a ``run`` dimension (of size 1), or a clear error for a sweep."""
    if "run" not in ds.dims:
        return ds
    if ds.sizes["run"] == 1:
        return ds.isel(run=0)
    raise ValueError(
        f"{figure} draws one run; this dataset holds {ds.sizes['run']} along 'run' "
        "(trajlab.open_analyses): pick one with ds.isel(run=i) or ds.sel(run=...), or draw them "
        "together with ds.lipschitz.plot_band(label=<a run coordinate>)")


def _no_prediction_note(ds: xr.Dataset) -> str:
    """A line for figures whose SDE prediction is undefined (no per-sample information)."""
    if _drawn(ds, "logK_pred_mean") or "logK_pred_mean" not in ds.data_vars:
        return ""
    return "\n(no SDE prediction: its noise terms are undefined; see the dataset's attrs['noise'])"


def network_title(ds: xr.Dataset) -> str:
    """Title of the network panel; says when K_net is NOT a Lipschitz bound (``attrs['k_net']``)
    and what it covers then."""
    text = str(ds.attrs.get("k_net", ""))
    if "NOT a Lipschitz bound" not in text:
        return "network bound K_net = Π K_ℓ"
    covers = text.split(". NOT a Lipschitz bound")[0]
    n = re.search(r"over (\d+) matri", covers)
    share = re.search(r"\((\d+(?:\.\d+)?%)\)", covers)
    if n and share:
        note = f"covers {n.group(1)} matrices, {share.group(1)} of the weight parameters"
    elif n:
        note = f"covers the {n.group(1)} analysed matrices only"
    else:
        note = "covers the analysed layers only"
    return f"K_net = Π K_ℓ: NOT a Lipschitz bound\n({note})"


def _legend(fig, axes) -> None:
    """One figure legend below every panel (constrained layout keeps it off the axes and
    their labels), as many columns as fit the figure's width."""
    entries: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(lab, h)
    if not entries:
        return
    renderer = fig.canvas.get_renderer()
    for ncol in range(len(entries), 0, -1):
        leg = fig.legend(list(entries.values()), list(entries.keys()), loc="outside lower center",
                         ncol=ncol, fontsize=8, frameon=False)
        if ncol == 1 or leg.get_window_extent(renderer).width <= 0.98 * fig.bbox.width:
            return
        leg.remove()


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average that ignores NaN and is normalised at the edges."""
    if window <= 1 or y.size < 2:
        return y
    ok = np.isfinite(y)
    k = np.ones(min(window, y.size))
    total = np.convolve(np.where(ok, y, 0.0), k, mode="same")
    count = np.convolve(ok.astype(float), k, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _inset(ax, x, series, *, steps: int, log: bool = False):
    if x.size <= steps * 1.5:
        return
    ins = ax.inset_axes([0.55, 0.08, 0.42, 0.38])
    for y, kw in series:
        ins.plot(x[:steps], y[:steps], **kw)
    if log:
        ins.set_yscale("log")
    ins.set_title(f"first {steps} steps", fontsize=7)
    ins.tick_params(labelsize=6)


def _title(ds: xr.Dataset, text: str) -> str:
    optimizer = ds.attrs.get("optimizer")
    return f"{text} (optimizer: {optimizer})" if optimizer else text


def plot_validation(
    ds: xr.Dataset, *, layers: Sequence[str] | None = None, inset_steps: int = 50
):
    """Theory vs measured Lipschitz constant, per layer and for the network (paper Fig. 2).

    Per layer: measured K = sigma_1(W); the SDE's expected path with the drift evaluated along
    the recorded trajectory; the pathwise second-order reconstruction from the recorded updates
    (left out where undefined, e.g. runs recorded with ``every`` > 1). Network: measured prod K,
    the log-normal prediction exp(E[Z]) with its 95% band, and the pathwise product. Each panel
    has an inset on the first ``inset_steps`` steps; one legend below all panels.

    For an optimizer other than plain SGD (see :func:`optimizer_aware`) the drawn prediction is
    the optimizer-aware one, K(0)+∫(μ+μ_opt)dt, and the paper's SGD prediction (``*_sgd``) is
    drawn as a fainter dotted line. The network panel's title says when ``K_net`` is not a
    Lipschitz bound of the network (``attrs['k_net']``) and what it covers.
    """
    ds = _one_run(ds, "plot_validation")
    plt = _plt()
    layers = list(ds.layer.values if layers is None else layers)
    n = len(layers) + 1
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.5), squeeze=False,
                             layout="constrained")
    x = ds.step.values
    aware = optimizer_aware(ds)
    for ax, name in zip(axes.flat, layers):
        d = ds.sel(layer=name)
        meas = d.K.values
        series = [(meas, {"color": "k", "lw": 1.6, "label": "measured σ1(W)"})]
        if _drawn(d, "K_pred_mean"):
            series.append((d.K_pred_mean.values, {"color": "C0", "lw": 1.2,
                                                  "label": SDE_OPT_LABEL if aware else SDE_LABEL}))
        if aware and _drawn(d, "K_pred_mean_sgd"):
            series.append((d.K_pred_mean_sgd.values, {**_SGD_STYLE, "label": SDE_SGD_LABEL}))
        if _drawn(d, "K_pathwise"):
            series.append((d.K_pathwise.values, {"color": "C1", "lw": 1.2, "ls": "--",
                                                 "label": "pathwise 2nd order"}))
        for y, kw in series:
            ax.plot(x, y, **kw)
        deg = d.degenerate.values.astype(bool)
        if deg.any():
            ax.plot(x[deg], meas[deg], "rx", ms=3, label="gap < tol")
        ax.set_title(f"layer {name}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("K = σ1(W)")
        _inset(ax, x, series, steps=inset_steps)
    ax = axes.flat[len(layers)]
    if _drawn(ds, "K_net_pred_lower"):
        band = (ds.K_net_pred_lower.values, ds.K_net_pred_upper.values)
        ax.fill_between(x, *band, color="C0", alpha=0.25, label="SDE 95% band")
    series = [(ds.K_net.values, {"color": "k", "lw": 1.6, "label": "measured Π K"})]
    if _drawn(ds, "logK_pred_mean"):
        series.append((np.exp(ds.logK_pred_mean.values),
                       {"color": "C0", "lw": 1.2, "label": NET_OPT_LABEL if aware else NET_LABEL}))
    if aware and _drawn(ds, "logK_pred_mean_sgd"):
        series.append((np.exp(ds.logK_pred_mean_sgd.values),
                       {**_SGD_STYLE, "label": NET_SGD_LABEL}))
    if _drawn(ds, "K_net_pathwise"):
        series.append((ds.K_net_pathwise.values, {"color": "C1", "lw": 1.2, "ls": "--",
                                                  "label": "pathwise"}))
    for y, kw in series:
        ax.plot(x, y, **kw)
    title = network_title(ds)
    ax.set_title(title, fontsize=10 if "\n" not in title else 9)
    ax.set_xlabel("step")
    ax.set_ylabel("K_net")
    _inset(ax, x, series, steps=inset_steps)
    for extra in list(axes.flat)[n:]:
        extra.set_visible(False)
    fig.suptitle(_title(ds, "Lipschitz constant: SDE theory vs measurement"
                        + _no_prediction_note(ds)), fontsize=11)
    _legend(fig, list(axes.flat)[:n])
    return fig


def plot_drift(ds: xr.Dataset, *, window: int = 25):
    """Decomposition of the drift of log K_net (paper Fig. 3): gradient flow, noise curvature
    (kappa_Z), Ito correction -sigma_Z^2/2, and the SDE's omitted discretisation term; moving
    averages over ``window`` steps, raw rates faint behind.

    For an optimizer other than plain SGD (:func:`optimizer_aware`) the optimizer's drift
    ``logK_drift_optimizer`` is shown as a further part, ``total μ_Z`` is labelled as the
    paper's SGD drift, and the integrated panel adds the optimizer-aware SDE."""
    ds = _one_run(ds, "plot_drift")
    plt = _plt()
    x = ds.step.values
    K = ds.K
    w = ds.dt / ds.net_dt  # layer time per unit of network time (1 with a single lr)
    flow = (w * ds.drift_flow / K).sum("layer", skipna=False).values
    kappa = ds.logK_noise_curvature.values
    ito = -0.5 * (w * ds.diffusion2 / K**2).sum("layer", skipna=False).values
    aware = optimizer_aware(ds) and "logK_drift_optimizer" in ds.data_vars
    parts = [
        ("gradient flow Σ μ_flow/K", flow, "C0"),
        ("noise curvature κ_Z", kappa, "C2"),
        ("Itô −Σ s²/2K²", ito, "C3"),
        ("total μ_Z (paper, SGD)" if aware else "total μ_Z", ds.logK_drift.values, "k"),
        ("discretisation (not in SDE)", ds.logK_discretization.values, "C4"),
    ]
    if aware:
        parts.append(("optimizer μ_opt = Σ μ_opt,ℓ/K_ℓ", ds.logK_drift_optimizer.values, "C5"))
    # a part that is undefined throughout (no per-sample information: the noise terms and the
    # total) is neither drawn nor listed, and no SDE sum is drawn without it
    have_total = bool(np.isfinite(parts[3][1]).any())
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, y, c in parts:
        if not np.isfinite(y).any():
            continue
        a.plot(x, y, color=c, alpha=0.15, lw=0.8)
        a.plot(x, moving_average(y, window), color=c, lw=1.5, label=label)
    a.axhline(0, color="0.6", lw=0.6)
    a.set_xlabel("step")
    a.set_ylabel("rate of log K_net [per unit time t = Σ lr]")
    a.set_title(f"drift of log K_net (moving average, {window} steps)", fontsize=10)
    a.legend(fontsize=7)
    dt = ds.net_dt.values
    for label, y, c in parts[:3] + parts[4:]:
        if np.isfinite(y).any():
            b.plot(x, np.cumsum(np.nan_to_num(y) * dt), color=c, lw=1.5, label=label)
    sgd = np.nan_to_num(parts[3][1]) + np.nan_to_num(parts[4][1])
    if have_total:
        b.plot(x, np.cumsum(sgd * dt), color="C1", lw=1.2, ls="--",
               label="SDE (paper, SGD) μ_Z + discretisation" if aware
               else "SDE μ_Z + discretisation")
    else:
        fig.suptitle(_no_prediction_note(ds).strip() or "no SDE drift: noise terms undefined",
                     fontsize=9)
    if aware and have_total:
        opt = sgd + np.nan_to_num(ds.logK_drift_optimizer.values)
        b.plot(x, np.cumsum(opt * dt), color="C0", lw=1.2, ls="-.",
               label="SDE (optimizer-aware) μ_Z + μ_opt + discretisation")
    b.plot(x, ds.logK.values - ds.logK.values[0], color="k", lw=1.6, label="measured Z(t) − Z(0)")
    b.set_xlabel("step")
    b.set_ylabel("integrated contribution to log K_net")
    b.set_title("integrated over time", fontsize=10)
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_noise_split(ds: xr.Dataset, *, window: int = 25):
    """Variance vs covariance contributions of the gradient noise, per layer (paper Fig. 3):
    noise-curvature drift and squared diffusion split into their var and cov parts."""
    ds = _one_run(ds, "plot_noise_split")
    if not _drawn(ds, "drift_noise"):
        raise ValueError("no noise terms to draw: " + str(ds.attrs.get(
            "noise", "the run holds no per-sample information")))
    plt = _plt()
    layers = list(ds.layer.values)
    fig, axes = plt.subplots(2, len(layers), figsize=(3.4 * len(layers), 5.6), squeeze=False)
    x = ds.step.values
    for j, name in enumerate(layers):
        d = ds.sel(layer=name)
        for i, (term, unit) in enumerate((("drift_noise", "K / unit time"),
                                          ("diffusion2", "K² / unit time"))):
            ax = axes[i, j]
            for part, c in (("", "k"), ("_var", "C0"), ("_cov", "C3")):
                y = d[term + part].values
                ax.plot(x, moving_average(y, window), color=c, lw=1.3,
                        label={"": "total", "_var": "variances", "_cov": "covariances"}[part])
            ax.axhline(0, color="0.6", lw=0.6)
            ax.set_title(f"{term}, layer {name}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel(unit, fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_band(ds: xr.Dataset, *, measured: Sequence[xr.Dataset] = (), label: str = "run"):
    """Predicted log-normal band of K_net (from ``ds``) with measured runs on top (paper Fig. 4/5).

    ``measured``: analysis Datasets of other runs (e.g. other sampling orders) whose ``K_net``
    is drawn over the band. For an optimizer other than plain SGD (:func:`optimizer_aware`) the
    band and median are the optimizer-aware prediction and the paper's SGD median is drawn as a
    fainter dotted line. A sweep (a ``run`` dimension, :func:`trajlab.open_analyses`) draws each
    run's measured K_net, median and band in its own colour, named by the run coordinate
    ``label`` (e.g. ``"run_batch_size"``).
    """
    if "run" in ds.dims and ds.sizes["run"] > 1:
        return _plot_band_runs(ds, label)
    ds = _one_run(ds, "plot_band")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8), layout="constrained")
    x = ds.step.values
    aware = optimizer_aware(ds)
    which = "SDE (optimizer-aware)" if aware else "SDE"
    if _drawn(ds, "K_net_pred_lower"):
        ax.fill_between(x, ds.K_net_pred_lower.values, ds.K_net_pred_upper.values, color="C0",
                        alpha=0.25, label=f"{which}: predicted 95% band")
    if _drawn(ds, "logK_pred_mean"):
        ax.plot(x, np.exp(ds.logK_pred_mean.values), color="C0", lw=1.3,
                label=f"{which}: predicted median")
    if aware and _drawn(ds, "logK_pred_mean_sgd"):
        ax.plot(x, np.exp(ds.logK_pred_mean_sgd.values), **_SGD_STYLE,
                label="SDE (paper, SGD): predicted median")
    ax.plot(x, ds.K_net.values, color="k", lw=1.4, label=f"measured ({label})")
    for i, other in enumerate(measured):
        ax.plot(other.step.values, other.K_net.values, color="C1", lw=0.7, alpha=0.6,
                label="other runs" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("K_net = Π K_ℓ")
    optimizer = ds.attrs.get("optimizer")
    title = (f"optimizer: {optimizer}" if optimizer else "") + _no_prediction_note(ds)
    if title:
        ax.set_title(title.strip(), fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _plot_band_runs(ds: xr.Dataset, label: str):
    """Each run of a sweep (``run`` dimension, :func:`trajlab.open_analyses`) in its own colour:
    measured K_net, the SDE's predicted median and 95% band. ``label``: the run coordinate that
    names the runs in the legend (e.g. ``"run_batch_size"``; default: the store names)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    cmap = plt.get_cmap("viridis")
    n = ds.sizes["run"]
    coord = (ds[label] if label != "run" and label in ds.coords and ds[label].dims == ("run",)
             else None)
    for i in range(n):
        d = ds.isel(run=i)
        ok = np.isfinite(np.asarray(d.K_net.values, dtype=np.float64))
        x = d.step.values[ok]
        color = cmap(0.85 * i / max(1, n - 1))
        name = (f"{label.removeprefix('run_')}={coord.values[i]}" if coord is not None
                else str(d.run.values).rstrip("/").split("/")[-1].removesuffix(".zarr"))
        ax.plot(x, d.K_net.values[ok], color=color, lw=1.4, label=name)
        if _drawn(d, "logK_pred_mean"):
            ax.plot(x, np.exp(d.logK_pred_mean.values[ok]), color=color, lw=1.0, ls="--")
        if _drawn(d, "K_net_pred_lower"):
            ax.fill_between(x, d.K_net_pred_lower.values[ok], d.K_net_pred_upper.values[ok],
                            color=color, alpha=0.12)
    ax.plot([], [], color="0.4", ls="--", label="SDE: predicted median")
    ax.fill_between([], [], [], color="0.4", alpha=0.12, label="SDE: 95% band")
    ax.set_xlabel("step")
    ax.set_ylabel("K_net = Π K_ℓ")
    ax.set_title(f"K_net of {n} runs: measured and predicted", fontsize=9)
    ax.legend(fontsize=7)
    return fig
