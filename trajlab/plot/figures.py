"""Figure functions: theory vs measurement, drift decomposition, noise split, prediction bands.

Per-layer figures scale to deep models: their panels wrap into a grid whose panels shrink as
layers are added (see :func:`grid`), long layer names are shortened in panel titles with a key
that gives each full name (:func:`layer_labels`), and the arithmetic on undefined values (NaN
terms, zero time steps) prints no warnings.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import xarray as xr

F = TypeVar("F", bound=Callable)


def quiet(fn: F) -> F:
    """Run a figure function without numpy's floating-point RuntimeWarnings (NaN terms of
    undefined steps, 0/0 at a zero learning rate), also where Dask computes them in its
    threads; those values are simply not drawn."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.filterwarnings(
                "ignore", category=RuntimeWarning,
                message=r".*(invalid value|divide by zero|overflow|Mean of empty slice|"
                        r"All-NaN|Degrees of freedom)")
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


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
                  "K_net", "K_net_batchnorm", "K", "drift_optimizer", "dt"),
}

#: Relative difference above which the optimizer-aware prediction (``K_pred_mean``,
#: ``logK_pred_mean``) counts as different from the paper's SGD one (``*_sgd``): the figures
#: then name it "optimizer-aware" and draw the SGD-only prediction as a second, fainter line.
SGD_RTOL = 1e-4

#: Legend labels of the predictions where a variable has no ``attrs["theory"]`` (analyses
#: written before it); otherwise :func:`prediction_label` names the theory.
SDE_LABEL = "SDE: K(0)+∫μ dt"
SDE_OPT_LABEL = "SDE (optimizer's): forward prediction of K"
SDE_SGD_LABEL = "SDE (paper, SGD): K(0)+∫μ dt"
NET_LABEL = "SDE: exp E[Z]"
NET_OPT_LABEL = "SDE (optimizer's): exp E[Z]"
NET_SGD_LABEL = "SDE (paper, SGD): exp E[Z]"

#: Style of the SGD-only prediction drawn behind the optimizer-aware one.
_SGD_STYLE = {"color": "C0", "lw": 1.0, "ls": ":", "alpha": 0.55}


def prediction_label(da: xr.DataArray, fallback: str, what: str) -> str:
    """Legend label of a prediction line: ``"<theory>: <what>"`` from the variable's
    ``attrs["theory"]`` (the SDE it integrates, e.g. "SDE for SGD (paper)"), else
    ``fallback``."""
    theory = da.attrs.get("theory")
    return f"{theory}: {what}" if isinstance(theory, str) and theory else fallback


# ----------------------------------------------------------------------------- layout
#: Longest layer label drawn in a panel title; longer names are shortened (with a key).
LABEL_CHARS = 18


def layer_labels(names: Sequence[str], *, max_chars: int = LABEL_CHARS
                 ) -> tuple[list[str], list[tuple[str, str]]]:
    """Short labels for layer names, and the key ``[(label, full name), ...]`` of every label
    that differs from its name.

    A dotted prefix common to every name is left out; a name still longer than ``max_chars``
    has its long snake_case parts abbreviated to their initials, then its other long words to
    three letters, then its middle replaced by "…". Labels that would collide become
    ``L0, L1, ...`` (the key gives every name).

    >>> layer_labels(["net.0.fc", "net.1.fc"])[0]
    ['0.fc', '1.fc']
    >>> layer_labels(["encoder.block.12.feed_forward_projection"], max_chars=14)[0]
    ['enc.blo.12.ffp']
    """
    names = [str(n) for n in names]
    parts = [n.split(".") for n in names]
    common = 0
    if len(names) > 1:
        while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
            common += 1
    labels = []
    for p in parts:
        rest = p[common:]
        label = ".".join(rest)
        if len(label) > max_chars:  # long snake_case words -> initials
            rest = [("".join(w[0] for w in x.split("_") if w) if "_" in x and len(x) > 6
                     else x) for x in rest]
            label = ".".join(rest)
        if len(label) > max_chars:  # other long words -> three letters
            rest = [x[:3] if len(x) > 4 and not x.isdigit() else x for x in rest]
            label = ".".join(rest)
        if len(label) > max_chars:
            head = (max_chars - 1) // 2
            label = label[:head] + "…" + label[-(max_chars - 1 - head):]
        labels.append(label)
    if len(set(labels)) < len(labels):
        labels = [f"L{i}" for i in range(len(names))]
    return labels, [(a, n) for a, n in zip(labels, names) if a != n]


def grid(n: int, *, max_cols: int = 10) -> tuple[int, int, float]:
    """(rows, columns, panel scale) of ``n`` panels: up to 3 columns for 9 panels or fewer,
    else a near-square grid of at most ``max_cols`` columns; the scale (1 for small grids)
    shrinks each panel so that 100 layers give a figure a screen can show."""
    if n <= 9:
        cols = min(3, n)
        return math.ceil(n / cols), cols, 1.0
    cols = min(max_cols, math.ceil(math.sqrt(n * 1.3)))
    rows = math.ceil(n / cols)
    return rows, cols, (0.75 if n <= 30 else 0.6)


#: Panels above which a grid gets a fixed layout: constrained layout's solver takes ~3x the
#: time of the whole drawing on 100+ panels (measured: 200 panels, 12 s vs 38 s to save).
FIXED_LAYOUT_PANELS = 30
_KEY_FONT, _KEY_ROW_IN, _KEY_CHAR_IN = 6, 0.115, 0.047


def _key_columns(fig_height: float, n: int) -> int:
    return math.ceil(n / max(8, int((fig_height - 1.0) / _KEY_ROW_IN)))


def _figure(plt, rows: int, cols: int, panel: tuple[float, float],
            key: list[tuple[str, str]], *, extra_height: float = 0.5):
    """(figure, axes) of a ``rows`` x ``cols`` grid of ``panel``-sized axes (inches).

    Up to :data:`FIXED_LAYOUT_PANELS` panels: constrained layout (legend and name key placed
    outside the panels by it). Beyond: a fixed layout with margins for the title, the tick
    labels, the legend below and the name key on the right."""
    w, h = panel
    if rows * cols <= FIXED_LAYOUT_PANELS:
        return plt.subplots(rows, cols, figsize=(w * cols, h * rows + extra_height),
                            squeeze=False, layout="constrained")
    top, bottom, left = 1.2, 0.95, 0.6
    height = h * rows + top + bottom
    key_w = 0.0
    if key:
        chars = max(len(f"{a} = {n}") for a, n in key)
        key_w = _key_columns(height, len(key)) * (chars * _KEY_CHAR_IN + 0.15) + 0.1
    right = 0.2 + key_w
    width = w * cols + left + right
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                        bottom=bottom / height, wspace=0.4, hspace=0.8)
    return fig, axes


def _fixed(fig) -> bool:
    return fig.get_layout_engine() is None


def _name_key(fig, key: list[tuple[str, str]]) -> None:
    """A legend on the right of the figure that gives the full name of every shortened layer
    label (outside the panels: by constrained layout, or in the fixed layout's margin)."""
    if not key:
        return
    from matplotlib.lines import Line2D

    blank = Line2D([], [], linestyle="none")
    where: dict = {"loc": "outside right upper"}
    if _fixed(fig):
        where = {"loc": "upper left", "bbox_to_anchor": (fig.subplotpars.right + 0.003,
                                                         fig.subplotpars.top)}
    fig.legend([blank] * len(key), [f"{a} = {n}" for a, n in key], **where,
               ncol=_key_columns(fig.get_figheight(), len(key)), fontsize=_KEY_FONT,
               frameon=False, handlelength=0, handletextpad=0, title="layers",
               title_fontsize=7)


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
    where: dict = {"loc": "outside lower center"}
    if _fixed(fig):  # in the margin below the panels
        where = {"loc": "lower center", "bbox_to_anchor": (
            (fig.subplotpars.left + fig.subplotpars.right) / 2, 0.003)}
    for ncol in range(len(entries), 0, -1):
        leg = fig.legend(list(entries.values()), list(entries.keys()), **where,
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


@quiet
def plot_validation(
    ds: xr.Dataset, *, layers: Sequence[str] | None = None, inset_steps: int = 50
):
    """Theory vs measured Lipschitz constant, per layer and for the network (paper Fig. 2).

    Per layer: measured K = sigma_1(W); the SDE's expected path with the drift evaluated along
    the recorded trajectory; the pathwise second-order reconstruction from the recorded updates
    (left out where undefined, e.g. runs recorded with ``every`` > 1). Network: measured prod K,
    the log-normal prediction exp(E[Z]) with its 95% band, and the pathwise product. Up to 9
    panels have an inset on the first ``inset_steps`` steps; one legend below all panels.
    Prediction lines are labelled by their variable's ``attrs["theory"]`` when it has one.

    Panels wrap into a grid (:func:`grid`: up to 3 columns for 8 layers, a near-square grid of
    smaller panels beyond); long layer names are shortened in the titles, with a key on the
    right giving each full name (:func:`layer_labels`).

    For an optimizer other than plain SGD (see :func:`optimizer_aware`) the drawn prediction is
    the forward prediction with the optimizer's SDE, and the paper's SGD prediction (``*_sgd``) is
    drawn as a fainter dotted line. The network panel's title says when ``K_net`` is not a
    Lipschitz bound of the network (``attrs['k_net']``) and what it covers.
    """
    ds = _one_run(ds, "plot_validation")
    plt = _plt()
    layers = [str(x) for x in (ds.layer.values if layers is None else layers)]
    labels, key = layer_labels(layers)
    n = len(layers) + 1
    rows, cols, scale = grid(n)
    small = scale < 1
    fig, axes = _figure(plt, rows, cols, (4.2 * scale, 3.2 * scale), key)
    x = ds.step.values
    aware = optimizer_aware(ds)
    for k, (ax, name) in enumerate(zip(axes.flat, layers)):
        d = ds.sel(layer=name)
        meas = d.K.values
        series = [(meas, {"color": "k", "lw": 1.6, "label": "measured σ1(W)"})]
        if _drawn(d, "K_pred_mean"):
            label = prediction_label(d.K_pred_mean, SDE_OPT_LABEL if aware else SDE_LABEL,
                                     "predicted mean of K")
            series.append((d.K_pred_mean.values, {"color": "C0", "lw": 1.2, "label": label}))
        if aware and _drawn(d, "K_pred_mean_sgd"):
            label = prediction_label(d.K_pred_mean_sgd, SDE_SGD_LABEL, "predicted mean of K")
            series.append((d.K_pred_mean_sgd.values, {**_SGD_STYLE, "label": label}))
        if _drawn(d, "K_pathwise"):
            series.append((d.K_pathwise.values, {"color": "C1", "lw": 1.2, "ls": "--",
                                                 "label": "pathwise 2nd order"}))
        for y, kw in series:
            ax.plot(x, y, **kw)
        deg = d.degenerate.values.astype(bool)
        if deg.any():
            ax.plot(x[deg], meas[deg], "rx", ms=3, label="gap < tol")
        ax.set_title(labels[k] if small else f"layer {labels[k]}", fontsize=8 if small else 10)
        _axis_labels(ax, k, rows, cols, n, "K = σ1(W)", small)
        if not small:
            _inset(ax, x, series, steps=inset_steps)
    ax = axes.flat[len(layers)]
    if _drawn(ds, "K_net_pred_lower"):
        band = (ds.K_net_pred_lower.values, ds.K_net_pred_upper.values)
        ax.fill_between(x, *band, color="C0", alpha=0.25,
                        label=prediction_label(ds.K_net_pred_lower, "SDE 95% band",
                                               "95% band of K_net"))
    series = [(ds.K_net.values, {"color": "k", "lw": 1.6, "label": "measured Π K"})]
    if _drawn(ds, "logK_pred_mean"):
        label = prediction_label(ds.logK_pred_mean, NET_OPT_LABEL if aware else NET_LABEL,
                                 "exp E[Z]")
        series.append((np.exp(ds.logK_pred_mean.values),
                       {"color": "C0", "lw": 1.2, "label": label}))
    if aware and _drawn(ds, "logK_pred_mean_sgd"):
        label = prediction_label(ds.logK_pred_mean_sgd, NET_SGD_LABEL, "exp E[Z]")
        series.append((np.exp(ds.logK_pred_mean_sgd.values), {**_SGD_STYLE, "label": label}))
    if _drawn(ds, "K_net_pathwise"):
        series.append((ds.K_net_pathwise.values, {"color": "C1", "lw": 1.2, "ls": "--",
                                                  "label": "pathwise"}))
    for y, kw in series:
        ax.plot(x, y, **kw)
    title = network_title(ds)
    ax.set_title(title, fontsize=(10 if "\n" not in title else 9) - (2 if small else 0))
    _axis_labels(ax, n - 1, rows, cols, n, "K_net", small)
    if not small:
        _inset(ax, x, series, steps=inset_steps)
    for extra in list(axes.flat)[n:]:
        extra.set_visible(False)
    fig.suptitle(_title(ds, "Lipschitz constant: SDE theory vs measurement"
                        + _no_prediction_note(ds)), fontsize=11)
    _legend(fig, list(axes.flat)[:n])
    _name_key(fig, key)
    return fig


def _axis_labels(ax, k: int, rows: int, cols: int, n: int, ylabel: str, small: bool) -> None:
    """Axis labels of panel ``k`` of a grid: every panel's in small grids; in large ones the
    x label on the lowest panel of each column and the y label on the first column only."""
    if small:
        ax.tick_params(labelsize=6)
        ax.yaxis.get_offset_text().set_fontsize(6)
        if k + cols >= n:
            ax.set_xlabel("step", fontsize=7)
        if k % cols == 0:
            ax.set_ylabel(ylabel, fontsize=7)
        return
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)


@quiet
def plot_drift(ds: xr.Dataset, *, window: int = 25):
    """Decomposition of the drift of log K_net (paper Fig. 3): gradient flow, noise curvature
    (kappa_Z), Ito correction -sigma_Z^2/2, and the SDE's omitted discretisation term; moving
    averages over ``window`` steps, raw rates faint behind.

    For an optimizer other than plain SGD (:func:`optimizer_aware`) the optimizer's drift
    ``logK_drift_optimizer`` (the pathwise reconstruction of what the realised updates added, a
    measurement, not a prediction) is shown as a further part, ``total μ_Z`` is labelled as the
    paper's SGD drift, and the integrated panel adds that pathwise reconstruction."""
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
        parts.append(("pathwise: realised optimizer drift Σ μ_opt,ℓ/K_ℓ",
                      ds.logK_drift_optimizer.values, "C5"))
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
               label="pathwise reconstruction: μ_Z + realised optimizer drift + discretisation")
    b.plot(x, ds.logK.values - ds.logK.values[0], color="k", lw=1.6, label="measured Z(t) − Z(0)")
    b.set_xlabel("step")
    b.set_ylabel("integrated contribution to log K_net")
    b.set_title("integrated over time", fontsize=10)
    b.legend(fontsize=7)
    fig.tight_layout()
    return fig


@quiet
def plot_noise_split(ds: xr.Dataset, *, window: int = 25):
    """Variance vs covariance contributions of the gradient noise, per layer (paper Fig. 3):
    noise-curvature drift and squared diffusion split into their var and cov parts.

    Each layer is a pair of panels (drift above, squared diffusion below); the pairs wrap into
    a grid (:func:`grid`), long layer names are shortened with a key on the right
    (:func:`layer_labels`), and one legend sits below all panels."""
    ds = _one_run(ds, "plot_noise_split")
    if not _drawn(ds, "drift_noise"):
        raise ValueError("no noise terms to draw: " + str(ds.attrs.get(
            "noise", "the run holds no per-sample information")))
    plt = _plt()
    layers = [str(v) for v in ds.layer.values]
    labels, key = layer_labels(layers)
    n = len(layers)
    if n <= 4:
        rows, cols, scale = 1, n, 1.0
    else:
        rows, cols, scale = grid(n)
        scale = min(scale, 0.8)
    small = scale < 1
    fig, axes = _figure(plt, 2 * rows, cols, (3.4 * scale, 2.6 * scale), key,
                        extra_height=0.6)
    x = ds.step.values
    for j, name in enumerate(layers):
        d = ds.sel(layer=name)
        r, c = divmod(j, cols)
        for i, (term, unit) in enumerate((("drift_noise", "K / unit time"),
                                          ("diffusion2", "K² / unit time"))):
            ax = axes[2 * r + i, c]
            for part, color in (("", "k"), ("_var", "C0"), ("_cov", "C3")):
                y = d[term + part].values
                ax.plot(x, moving_average(y, window), color=color, lw=1.3,
                        label={"": "total", "_var": "variances", "_cov": "covariances"}[part])
            ax.axhline(0, color="0.6", lw=0.6)
            ax.set_title(f"{term}, {labels[j]}" if small else f"{term}, layer {labels[j]}",
                         fontsize=7 if small else 9)
            if not small or (i == 1 and j + cols >= n):
                ax.set_xlabel("step", fontsize=7 if small else None)
            if not small or c == 0:
                ax.set_ylabel(unit, fontsize=7 if small else 8)
            ax.tick_params(labelsize=6 if small else 7)
            ax.yaxis.get_offset_text().set_fontsize(6 if small else 7)
    for j in range(n, rows * cols):  # empty places of the last row
        r, c = divmod(j, cols)
        axes[2 * r, c].set_visible(False)
        axes[2 * r + 1, c].set_visible(False)
    fig.suptitle(f"gradient noise: variances vs covariances (moving average, {window} steps)",
                 fontsize=10)
    _legend(fig, [axes[0, 0]])
    _name_key(fig, key)
    return fig



def _k_net_of_matrices(ds: xr.Dataset) -> tuple[np.ndarray, str]:
    """The measured K_net the SDE predicts: the product over weight matrices. In a BatchNorm
    chain K_net also holds the BatchNorm layers' eval-mode factors (``K_net_batchnorm``), which
    have no SDE terms (docs/math.md §4b): they are divided out here, and the label says so."""
    k = np.asarray(ds.K_net.values, dtype=np.float64)
    if "K_net_batchnorm" in ds:
        bn = np.asarray(ds.K_net_batchnorm.values, dtype=np.float64)
        if np.any(np.isfinite(bn) & (bn != 1.0)):
            return k / bn, ", weight matrices only: BatchNorm factors left out"
    return k, ""


@quiet
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
                        alpha=0.25, label=prediction_label(
                            ds.K_net_pred_lower, f"{which}: predicted 95% band",
                            "predicted 95% band"))
    if _drawn(ds, "logK_pred_mean"):
        ax.plot(x, np.exp(ds.logK_pred_mean.values), color="C0", lw=1.3,
                label=prediction_label(ds.logK_pred_mean, f"{which}: predicted median",
                                       "predicted median"))
    if aware and _drawn(ds, "logK_pred_mean_sgd"):
        ax.plot(x, np.exp(ds.logK_pred_mean_sgd.values), **_SGD_STYLE,
                label=prediction_label(ds.logK_pred_mean_sgd,
                                       "SDE (paper, SGD): predicted median", "predicted median"))
    k_net, note = _k_net_of_matrices(ds)
    ax.plot(x, k_net, color="k", lw=1.4, label=f"measured ({label}{note})")
    for i, other in enumerate(measured):
        ax.plot(other.step.values, _k_net_of_matrices(other)[0], color="C1", lw=0.7, alpha=0.6,
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
        k_net = _k_net_of_matrices(d)[0]
        ok = np.isfinite(k_net)
        x = d.step.values[ok]
        color = cmap(0.85 * i / max(1, n - 1))
        name = (f"{label.removeprefix('run_')}={coord.values[i]}" if coord is not None
                else str(d.run.values).rstrip("/").split("/")[-1].removesuffix(".zarr"))
        ax.plot(x, k_net[ok], color=color, lw=1.4, label=name)
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
