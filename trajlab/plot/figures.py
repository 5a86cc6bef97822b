"""Figure functions: theory vs measurement, drift decomposition, noise split, prediction bands."""

from __future__ import annotations

import math
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
    "plot_validation": ("K", "K_pred_mean", "K_pathwise", "degenerate", "K_net",
                        "K_net_pred_lower", "K_net_pred_upper", "logK_pred_mean",
                        "K_net_pathwise"),
    "plot_drift": ("K", "dt", "net_dt", "drift_flow", "diffusion2", "logK_noise_curvature",
                   "logK_drift", "logK_discretization", "logK"),
    "plot_noise_split": ("drift_noise", "drift_noise_var", "drift_noise_cov", "diffusion2",
                         "diffusion2_var", "diffusion2_cov"),
    "plot_band": ("K_net_pred_lower", "K_net_pred_upper", "logK_pred_mean", "K_net"),
}


def needed_variables(figure: str, ds: xr.Dataset) -> list[str]:
    """The variables of ``ds`` that figure function ``figure`` reads."""
    return [k for k in NEEDS[figure] if k in ds.data_vars]


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


def plot_validation(
    ds: xr.Dataset, *, layers: Sequence[str] | None = None, inset_steps: int = 50
):
    """Theory vs measured Lipschitz constant, per layer and for the network (paper Fig. 2).

    Per layer: measured K = sigma_1(W); the SDE's expected path K(0) + int mu dt with the drift
    evaluated along the recorded trajectory; the pathwise second-order reconstruction from the
    recorded updates. Network: measured prod K, the log-normal prediction exp(E[Z]) with its 95%
    band, and the pathwise product. Each panel has an inset on the first ``inset_steps`` steps.
    """
    plt = _plt()
    layers = list(ds.layer.values if layers is None else layers)
    n = len(layers) + 1
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    x = ds.step.values
    for ax, name in zip(axes.flat, layers):
        d = ds.sel(layer=name)
        meas = d.K.values
        series = [
            (meas, dict(color="k", lw=1.6, label="measured σ1(W)")),
            (d.K_pred_mean.values, dict(color="C0", lw=1.2, label="SDE: K(0)+∫μ dt")),
            (d.K_pathwise.values, dict(color="C1", lw=1.2, ls="--",
                                       label="pathwise 2nd order")),
        ]
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
    band = (ds.K_net_pred_lower.values, ds.K_net_pred_upper.values)
    ax.fill_between(x, *band, color="C0", alpha=0.25, label="SDE 95% band")
    series = [
        (ds.K_net.values, dict(color="k", lw=1.6, label="measured Π K")),
        (np.exp(ds.logK_pred_mean.values), dict(color="C0", lw=1.2, label="SDE: exp E[Z]")),
        (ds.K_net_pathwise.values, dict(color="C1", lw=1.2, ls="--", label="pathwise")),
    ]
    for y, kw in series:
        ax.plot(x, y, **kw)
    ax.set_title("network bound K_net = Π K_ℓ", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("K_net")
    _inset(ax, x, series, steps=inset_steps)
    for extra in list(axes.flat)[n:]:
        extra.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    h2, l2 = ax.get_legend_handles_labels()
    seen = dict(zip(labels + l2, handles + h2))
    fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=min(6, len(seen)),
               fontsize=8, frameon=False)
    fig.suptitle("Lipschitz constant: SDE theory vs measurement", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    return fig


def plot_drift(ds: xr.Dataset, *, window: int = 25):
    """Decomposition of the drift of log K_net (paper Fig. 3): gradient flow, noise curvature
    (kappa_Z), Ito correction -sigma_Z^2/2, and the SDE's omitted discretisation term; moving
    averages over ``window`` steps, raw rates faint behind."""
    plt = _plt()
    x = ds.step.values
    K = ds.K
    w = ds.dt / ds.net_dt  # layer time per unit of network time (1 with a single lr)
    flow = (w * ds.drift_flow / K).sum("layer").values
    kappa = ds.logK_noise_curvature.values
    ito = -0.5 * (w * ds.diffusion2 / K**2).sum("layer").values
    parts = [
        ("gradient flow Σ μ_flow/K", flow, "C0"),
        ("noise curvature κ_Z", kappa, "C2"),
        ("Itô −Σ s²/2K²", ito, "C3"),
        ("total μ_Z", ds.logK_drift.values, "k"),
        ("discretisation (not in SDE)", ds.logK_discretization.values, "C4"),
    ]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, y, c in parts:
        a.plot(x, y, color=c, alpha=0.15, lw=0.8)
        a.plot(x, moving_average(y, window), color=c, lw=1.5, label=label)
    a.axhline(0, color="0.6", lw=0.6)
    a.set_xlabel("step")
    a.set_ylabel("rate of log K_net [per unit time t = Σ lr]")
    a.set_title(f"drift of log K_net (moving average, {window} steps)", fontsize=10)
    a.legend(fontsize=7)
    for label, y, c in parts[:3] + parts[4:]:
        b.plot(x, np.cumsum(np.nan_to_num(y) * ds.net_dt.values), color=c, lw=1.5, label=label)
    total = sum(np.nan_to_num(p[1]) for p in (parts[3], parts[4]))
    b.plot(x, np.cumsum(total * ds.net_dt.values), color="C1", lw=1.2, ls="--",
           label="SDE μ_Z + discretisation")
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
    is drawn over the band.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    x = ds.step.values
    ax.fill_between(x, ds.K_net_pred_lower.values, ds.K_net_pred_upper.values, color="C0",
                    alpha=0.25, label="predicted 95% band")
    ax.plot(x, np.exp(ds.logK_pred_mean.values), color="C0", lw=1.3, label="predicted median")
    ax.plot(x, ds.K_net.values, color="k", lw=1.4, label=f"measured ({label})")
    for i, other in enumerate(measured):
        ax.plot(other.step.values, other.K_net.values, color="C1", lw=0.7, alpha=0.6,
                label="other runs" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("K_net = Π K_ℓ")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
