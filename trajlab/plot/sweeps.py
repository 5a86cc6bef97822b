"""Figures that compare several analysed runs: sweeps of one hyper-parameter, sampling orders,
and the late phase of a long run. Each function takes analysis Datasets (and plain arrays of
summary numbers) and returns a matplotlib Figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from trajlab.plot.figures import _plt
from trajlab.plot.figures import moving_average as _moving_average

__all__ = ["plot_convergence", "plot_drift_bars", "plot_order_spread", "plot_sweep"]


def _colors(n: int):
    plt = _plt()
    cmap = plt.get_cmap("viridis")
    return [cmap(0.85 * i / max(1, n - 1)) for i in range(n)]


def plot_sweep(
    datasets: Sequence[xr.Dataset],
    labels: Sequence[str],
    *,
    param: str,
    summary: Mapping[str, Sequence[float]],
    values: Sequence[float],
    summary_ylabel: str,
    logx: bool = False,
    logy: bool = False,
    reference: tuple[str, Sequence[float]] | None = None,
    window: int = 25,
):
    """One hyper-parameter swept (paper Fig. 5 style), three panels.

    (a) measured K_net per run (solid) and the SDE's exp E[Z] (dashed); (b) the squared
    diffusion sigma_Z^2 of log K_net, moving average over ``window`` steps; (c) summary numbers
    against the swept ``values`` (``summary``: legend label -> one number per run; ``reference``:
    an optional dashed (label, numbers) line such as a 1/B law).
    """
    plt = _plt()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.9))
    for ds, lab, col in zip(datasets, labels, _colors(len(datasets))):
        x = ds.step.values
        a.plot(x, ds.K_net.values, color=col, lw=1.4, label=lab)
        a.plot(x, np.exp(ds.logK_pred_mean.values), color=col, lw=1.0, ls="--")
        b.plot(x, _moving_average(ds.logK_diffusion2.values, window), color=col, lw=1.3,
               label=lab)
    a.plot([], [], color="0.4", ls="--", label="SDE exp E[Z]")
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_ylabel("K_net = Π σ1(W_ℓ)  (log scale)")
    a.set_title(f"network bound per {param}", fontsize=10)
    a.legend(fontsize=7, title=param, title_fontsize=7)
    b.set_yscale("log")
    b.set_xlabel("step")
    b.set_ylabel("σ_Z² of log K_net [per unit time t = Σ lr]")
    b.set_title(f"diffusion of log K_net ({window}-step moving average)", fontsize=10)
    markers = "osd^v<>"
    for i, (lab, ys) in enumerate(summary.items()):
        c.plot(values, ys, marker=markers[i % len(markers)], lw=1.3, label=lab)
    if reference is not None:
        c.plot(values, reference[1], color="0.5", ls="--", lw=1.0, label=reference[0])
    if logx:
        c.set_xscale("log", base=2)
    if logy:
        c.set_yscale("log")
    c.set_xlabel(param)
    c.set_ylabel(summary_ylabel)
    c.set_title(f"summary over the run vs {param}", fontsize=10)
    c.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_drift_bars(labels: Sequence[str], terms: Mapping[str, Sequence[float]], *,
                    param: str, measured: Sequence[float] | None = None,
                    title: str = "integrated drift of log K_net"):
    """Integrated contributions to log K_net per run, as grouped bars, with the measured change.

    ``terms``: legend label -> one integral per run (e.g. gradient flow, kappa_Z, Ito).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.4 + 1.6 * len(labels), 4.4))
    n = len(terms) + (measured is not None)
    width = 0.8 / n
    x = np.arange(len(labels))
    for i, (lab, ys) in enumerate(terms.items()):
        ax.bar(x + (i - (n - 1) / 2) * width, ys, width, label=lab, color=f"C{i}")
    if measured is not None:
        ax.bar(x + (n - 1) / 2 * width, measured, width, color="k", label="measured ΔZ")
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_xticks(x, labels)
    ax.set_xlabel(param)
    ax.set_ylabel("contribution to log K_net (dimensionless)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
              frameon=False)
    fig.tight_layout()
    return fig


def plot_order_spread(datasets: Sequence[xr.Dataset]):
    """Same initialisation, different sampling orders (paper Fig. 4).

    (a) K_net of every order over the predicted 95% band of the first order; (b) the standard
    deviation of log K_net across orders against the predicted sd sqrt(int sigma_Z^2 dt)
    (mean over orders).
    """
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.9))
    ref = datasets[0]
    x = ref.step.values
    a.fill_between(x, ref.K_net_pred_lower.values, ref.K_net_pred_upper.values, color="C0",
                   alpha=0.2, label="predicted 95% band (order 0)")
    a.plot(x, np.exp(ref.logK_pred_mean.values), color="C0", lw=1.3,
           label="predicted median (order 0)")
    for i, ds in enumerate(datasets):
        a.plot(ds.step.values, ds.K_net.values, color="k" if i == 0 else "C1",
               lw=1.4 if i == 0 else 0.7, alpha=1 if i == 0 else 0.7,
               label="measured, order 0" if i == 0 else ("other orders" if i == 1 else None))
    a.set_xlabel("step")
    a.set_ylabel("K_net = Π σ1(W_ℓ)")
    a.set_title(f"{len(datasets)} sampling orders, one initialisation", fontsize=10)
    a.legend(fontsize=7)
    Z = np.stack([ds.logK.values for ds in datasets])
    sd = Z.std(axis=0, ddof=1)
    pred = np.sqrt(np.stack([ds.logK_pred_var.values for ds in datasets]).mean(axis=0))
    b.plot(x[1:], sd[1:], color="k", lw=1.4, label="measured sd of log K_net across orders")
    b.plot(x[1:], pred[1:], color="C0", lw=1.3, label="predicted sd √(∫σ_Z² dt)")
    b.set_yscale("log")
    b.set_xlabel("step")
    b.set_ylabel("standard deviation of log K_net")
    b.set_title("spread across orders vs prediction", fontsize=10)
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_convergence(ds: xr.Dataset, loss: np.ndarray, parts: Mapping[str, np.ndarray], *,
                     late_start: int, window: int):
    """A long run toward convergence: the training loss, and the magnitude of each drift term of
    log K_net (moving average over ``window`` steps), with the late phase shaded."""
    plt = _plt()
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    x = ds.step.values
    a.plot(x, loss, color="0.7", lw=0.5, label="batch loss")
    a.plot(x, _moving_average(loss, window), color="k", lw=1.4,
           label=f"{window}-step moving average")
    a.set_yscale("log")
    a.set_ylabel("cross-entropy (nats)")
    a.set_title("training loss", fontsize=10)
    a.legend(fontsize=7)
    for i, (lab, y) in enumerate(parts.items()):
        ma = _moving_average(y, window)
        b.plot(x, np.abs(ma), color=f"C{i}", lw=1.4, label=f"|{lab}|")
    b.set_yscale("log")
    b.set_xlabel("step")
    b.set_ylabel("|rate| of log K_net [per unit time t = Σ lr]")
    b.set_title(f"drift terms of log K_net, |{window}-step moving average|", fontsize=10)
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.axvspan(x[late_start], x[-1], color="C7", alpha=0.12, lw=0)
    b.text(x[late_start], b.get_ylim()[0], " late phase", fontsize=7, va="bottom")
    fig.tight_layout()
    return fig
