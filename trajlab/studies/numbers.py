"""Pure numbers of the paper studies, on analysis Datasets (no I/O, no figures).

Each function takes one analysis (or several) and returns plain numbers, so it applies to any
analysis, not only to the studies' own runs:

=======================  ==============================================================
:func:`drift_parts`       per-step drift rates of log K_net split by source
:func:`realised_variance` measured step variance of log K_net against sigma_Z^2
:func:`theory_numbers`    paper Fig. 2 in numbers: prediction and pathwise vs measured K
:func:`drift_budget`      paper Fig. 3 in numbers: which drift term dominates, when
:func:`fig3_checks`       paper Fig. 3's findings (i)-(iii) on :func:`drift_budget`'s numbers
:func:`order_spread`      paper Fig. 4 in numbers: spread across sampling orders vs the band
:func:`run_summary`       one run's key numbers for a sweep table
=======================  ==============================================================

Conventions. Time is ``t = sum of lr``; row ``r`` of an analysis holds the weights before update
``r``, so ``Z[-1] - Z[0]`` is compared with rates integrated over rows ``0 .. T-2``. All
integrals treat non-finite rates as 0 and say how many there were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from trajlab.plot.figures import moving_average

__all__ = [
    "PART_NAMES",
    "drift_budget",
    "drift_parts",
    "fig3_checks",
    "integral",
    "monotone",
    "order_spread",
    "realised_variance",
    "run_summary",
    "slope",
    "step_dt",
    "theory_numbers",
]

#: Display names of the drift parts of :func:`drift_parts`.
PART_NAMES = {"flow": "gradient flow", "kappa": "noise curvature κ_Z", "ito": "Itô term"}


def step_dt(ds: xr.Dataset) -> np.ndarray:
    """The time step (learning rate) of every row, float64."""
    return np.asarray(ds["net_dt"].values, dtype=np.float64)


def integral(rate: np.ndarray, dt: np.ndarray, rows: slice = slice(None)) -> float:
    """Left-point integral of ``rate`` over ``rows`` (the last row is excluded: it has no
    measured successor); non-finite rates count as 0."""
    r, d = np.asarray(rate[:-1])[rows], np.asarray(dt[:-1])[rows]
    return float(np.sum(np.where(np.isfinite(r), r, 0.0) * d))


def drift_parts(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """Per-step rates of the drift of log K_net, split by source (each (step,)).

    ``flow`` = sum_l drift_flow/K (gradient flow), ``kappa`` = kappa_Z (noise curvature),
    ``ito`` = -sum_l diffusion2/(2 K^2) (Ito correction), ``total`` = mu_Z (= their sum), and
    ``discretization`` (the finite-step term the SDE leaves out).
    """
    K = ds.K.values
    return {
        "flow": np.nansum(ds.drift_flow.values / K, axis=1),
        "kappa": np.asarray(ds.logK_noise_curvature.values, dtype=np.float64),
        "ito": -0.5 * np.nansum(ds.diffusion2.values / K**2, axis=1),
        "total": np.asarray(ds.logK_drift.values, dtype=np.float64),
        "discretization": np.asarray(ds.logK_discretization.values, dtype=np.float64),
    }


def realised_variance(ds: xr.Dataset, *, window: int = 25) -> dict[str, float]:
    """Measured step-to-step variance of log K_net per unit time, against the prediction.

    The one-step change of Z has variance ``sigma_Z^2 dt``; the measured counterpart is the sum
    of squared increments around their ``window``-step moving average (which removes the drift)
    divided by the elapsed time. Returns ``measured`` and ``predicted`` (time-mean sigma_Z^2,
    full form) and ``predicted_blockdiag``, all per unit time, and ``ratio``.
    """
    Z = np.asarray(ds.logK.values, dtype=np.float64)
    dt = step_dt(ds)
    dZ = np.diff(Z)
    resid = dZ - moving_average(dZ, window)
    T = float(dt[:-1].sum())
    meas = float(np.nansum(resid**2) / T)
    pred = integral(ds.logK_diffusion2.values, dt) / T
    pred_b = integral(ds.logK_diffusion2_blockdiag.values, dt) / T
    return {"measured": meas, "predicted": pred, "predicted_blockdiag": pred_b,
            "ratio": meas / pred if pred > 0 else math.nan}


def theory_numbers(ds: xr.Dataset) -> dict[str, Any]:
    """Paper Fig. 2 in numbers: the SDE prediction and the pathwise reconstruction against the
    measured K, per layer and for K_net.

    Returns
    -------
    dict
        ``layers``: per layer K at start and end, relative errors at the end
        ``pred_rel_err_end`` ((K_pred_mean - K) / K) and ``pathwise_rel_err_end``, and the largest
        |relative error| of the pathwise reconstruction over the run. ``network``: the same for
        K_net (prediction exp E[Z]), ``inside_band_fraction`` (steps after the first with
        K_net inside the predicted 95% band), ``z_end`` ((Z - E[Z]) / sd at the end) and
        ``degenerate_fraction`` (steps whose spectral gap was below tolerance in any layer).
    """
    K = ds.K.values
    pred = ds.K_pred_mean.values
    path = ds.K_pathwise.values
    layers = {}
    for j, name in enumerate(ds.layer.values):
        rel_path = (path[:, j] - K[:, j]) / K[:, j]
        layers[str(name)] = {
            "K_start": K[0, j], "K_end": K[-1, j],
            "pred_rel_err_end": (pred[-1, j] - K[-1, j]) / K[-1, j],
            "pathwise_rel_err_end": rel_path[-1],
            "pathwise_rel_err_max": float(np.nanmax(np.abs(rel_path))),
        }
    knet = ds.K_net.values
    mean = ds.logK_pred_mean.values
    var = ds.logK_pred_var.values
    inside = (knet >= ds.K_net_pred_lower.values) & (knet <= ds.K_net_pred_upper.values)
    sd_end = math.sqrt(var[-1]) if var[-1] > 0 else math.nan
    return {
        "layers": layers,
        "network": {
            "K_net_start": knet[0], "K_net_end": knet[-1],
            "pred_rel_err_end": (math.exp(mean[-1]) - knet[-1]) / knet[-1],
            "pathwise_rel_err_end": (ds.K_net_pathwise.values[-1] - knet[-1]) / knet[-1],
            "inside_band_fraction": float(inside[1:].mean()),
            "band_end": [ds.K_net_pred_lower.values[-1], ds.K_net_pred_upper.values[-1]],
            "z_end": (ds.logK.values[-1] - mean[-1]) / sd_end,
            "degenerate_fraction": float(ds.degenerate.values.any(axis=1).mean()),
        },
    }



def drift_budget(ds: xr.Dataset, *, late_fraction: float = 0.5, window: int = 100
                 ) -> dict[str, Any]:
    """Paper Fig. 3 in numbers: which drift term of log K_net dominates, early and late.

    Parameters
    ----------
    late_fraction : the last ``late_fraction`` of the steps is the late phase; the first
        ``1 - late_fraction`` the early phase.
    window : moving-average window (steps) for the per-step dominance count.

    Returns
    -------
    dict
        ``integrated`` {whole, early, late}: integral of each part (flow, kappa, ito, total)
        and the measured change of Z over that phase. ``late_mean_rate``: each part's mean rate
        in the late phase. ``noise_share`` {early, late}: (|kappa| + |ito|) / (|flow| + |kappa|
        + |ito|) of the integrals. ``dominant_fraction_late``: fraction of late steps where each
        part has the largest |moving average|. ``kappa`` {first_10pct, last_10pct}: mean
        kappa_Z. ``noise_split``: per layer and for the network, the share of the variances in
        drift_noise and diffusion2 (the covariance share is one minus it).
    """
    parts = drift_parts(ds)
    dt = step_dt(ds)
    Z = np.asarray(ds.logK.values, dtype=np.float64)
    T = Z.size
    late = round(T * (1 - late_fraction))
    phases = {"whole": slice(0, T - 1), "early": slice(0, late), "late": slice(late, T - 1)}
    integrated = {}
    for ph, rows in phases.items():
        d = {k: integral(parts[k], dt, rows) for k in ("flow", "kappa", "ito", "total")}
        d["measured_delta_Z"] = float(Z[min(rows.stop, T - 1)] - Z[rows.start])
        integrated[ph] = d

    def share(d):
        noise = abs(d["kappa"]) + abs(d["ito"])
        tot = noise + abs(d["flow"])
        return noise / tot if tot > 0 else math.nan

    dur_late = float(dt[late:T - 1].sum())
    ma = np.stack([np.abs(moving_average(parts[k], window)) for k in ("flow", "kappa", "ito")])
    top = np.argmax(ma[:, late:], axis=0)
    tenth = max(1, T // 10)
    K = ds.K.values
    split: dict[str, Any] = {}
    for term in ("drift_noise", "diffusion2"):
        tot = ds[term].values
        var = ds[term + "_var"].values
        split[term] = {str(n): integral(var[:, j], dt) / integral(tot[:, j], dt)
                       for j, n in enumerate(ds.layer.values)}
    # Network level: kappa_Z and the block-diagonal sigma_Z^2, each split by the variance part.
    net_var = integral(np.nansum(ds.drift_noise_var.values / K, axis=1), dt)
    s2_var = integral(np.nansum(ds.diffusion2_var.values / K**2, axis=1), dt)
    split["network"] = {
        "kappa_Z_var_share": net_var / integral(parts["kappa"], dt),
        "sigma_Z2_blockdiag_var_share": s2_var / integral(
            np.nansum(ds.diffusion2.values / K**2, axis=1), dt),
    }
    return {
        "late_start_step": int(ds.step.values[late]),
        "integrated": integrated,
        "late_mean_rate": {k: integrated["late"][k] / dur_late for k in ("flow", "kappa", "ito",
                                                                         "total")},
        "noise_share": {"early": share(integrated["early"]), "late": share(integrated["late"])},
        "dominant_fraction_late": {k: float((top == i).mean())
                                   for i, k in enumerate(("flow", "kappa", "ito"))},
        "kappa": {"first_10pct": float(np.nanmean(parts["kappa"][:tenth])),
                  "last_10pct": float(np.nanmean(parts["kappa"][-tenth:]))},
        "noise_split_var_share": split,
        "window": window,
        "nonfinite_rates": int(sum((~np.isfinite(parts[k][:-1])).sum()
                                   for k in ("flow", "kappa", "ito"))),
    }


def order_spread(datasets: Sequence[xr.Dataset]) -> dict[str, Any]:
    """Paper Fig. 4 in numbers: runs from one initialisation with different sampling orders.

    Returns the across-order sd of Z = log K_net at the end (``sd_Z_end``) against the
    predicted sd sqrt(int sigma_Z^2 dt) (mean over orders, ``pred_sd_end``) and their ratio;
    the fraction of orders whose final K_net lies inside the first order's predicted 95% band
    (``inside_ref_band_fraction``) and the same for each order's own band
    (``inside_own_band_fraction``); the mean measured change of Z against the mean predicted
    change; the range of final K_net; ``sd_ratio_max`` (largest sd ratio after the first 10 rows)
    and ``below_half_from_step``, the first step after the first 10 rows where the measured sd
    falls below half the predicted one (-1: never).
    """
    if len(datasets) < 2:
        raise ValueError(f"need at least 2 sampling orders, got {len(datasets)}")
    Z = np.stack([ds.logK.values for ds in datasets])
    mean = np.stack([ds.logK_pred_mean.values for ds in datasets])
    var = np.stack([ds.logK_pred_var.values for ds in datasets])
    ref = datasets[0]
    lo, hi = ref.K_net_pred_lower.values[-1], ref.K_net_pred_upper.values[-1]
    knet = np.exp(Z[:, -1])
    own = [(ds.K_net_pred_lower.values[-1] <= k <= ds.K_net_pred_upper.values[-1])
           for ds, k in zip(datasets, knet)]
    sd = float(Z[:, -1].std(ddof=1))
    pred_sd = float(np.sqrt(var[:, -1]).mean())
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = Z.std(axis=0, ddof=1) / np.sqrt(var).mean(axis=0)
    start = min(10, ratio.size - 1)
    low = np.flatnonzero(ratio[start:] < 0.5)
    parted = int(ref.step.values[start + low[0]]) if low.size else None
    return {
        "n_orders": len(datasets),
        "same_start": bool(np.allclose(Z[:, 0], Z[0, 0])),
        "sd_Z_end": sd, "pred_sd_end": pred_sd, "sd_ratio": sd / pred_sd,
        "sd_ratio_max": float(np.nanmax(ratio[start:])),
        "below_half_from_step": -1 if parted is None else parted,
        "inside_ref_band_fraction": float(((knet >= lo) & (knet <= hi)).mean()),
        "inside_own_band_fraction": float(np.mean(own)),
        "ref_band_end": [lo, hi],
        "K_net_end_range": [float(knet.min()), float(knet.max())],
        "mean_delta_Z": float((Z[:, -1] - Z[:, 0]).mean()),
        "mean_pred_delta_Z": float((mean[:, -1] - Z[:, 0]).mean()),
    }


def run_summary(ds: xr.Dataset, loss: np.ndarray | None = None, *, window: int = 25
                ) -> dict[str, float]:
    """Key numbers of one run for a sweep table: K_net at start and end, the measured change of
    Z and its predicted change, the integrated drift parts, the time-mean sigma_Z^2 and the
    measured step variance of Z (:func:`realised_variance`), mean layer diffusion s^2/K^2, and
    the final loss (mean over the last 10% of steps)."""
    parts = drift_parts(ds)
    dt = step_dt(ds)
    Z = ds.logK.values
    rv = realised_variance(ds, window=window)
    T = float(dt[:-1].sum())
    out = {
        "K_net_start": float(np.exp(Z[0])), "K_net_end": float(np.exp(Z[-1])),
        "delta_Z": float(Z[-1] - Z[0]),
        # forward predictions (docs/math.md 8): the paper's SGD SDE and the optimizer's SDE
        "pred_delta_Z": float(ds.logK_pred_mean_sgd.values[-1] - Z[0]),
        "forward_pred_delta_Z": float(ds.logK_pred_mean.values[-1] - Z[0]),
        # the drift budget along the run (flow from the batch gradient at unprobed steps)
        "int_mu_Z": integral(parts["total"], dt),
        "int_flow": integral(parts["flow"], dt), "int_kappa": integral(parts["kappa"], dt),
        "int_ito": integral(parts["ito"], dt),
        "pathwise_delta_Z": float(np.log(ds.K_net_pathwise.values[-1]) - Z[0]),
        "sigma_Z2_mean": rv["predicted"], "sigma_Z2_blockdiag_mean": rv["predicted_blockdiag"],
        "realised_var_rate": rv["measured"],
        "layer_rel_diffusion_mean": float(np.nanmean(
            ds.diffusion2.values / ds.K.values**2)),
        "duration": T,
        "batch_size": float(np.median(ds.batch_size.values)),
    }
    if loss is not None:
        n = max(1, loss.size // 10)
        out["loss_end"] = float(np.nanmean(loss[-n:]))
    return out


def fig3_checks(num: dict[str, Any]) -> dict[str, bool]:
    """Paper Fig. 3's findings (i)-(iii) (PAPER.md) on :func:`drift_budget`'s numbers."""
    whole, late = num["integrated"]["whole"], num["integrated"]["late"]
    ns = num["noise_split_var_share"]["network"]
    return {
        "i_flow_primary": bool(abs(whole["flow"]) > abs(whole["kappa"]) + abs(whole["ito"])),
        "ii_covariances_dominate": bool(ns["kappa_Z_var_share"] < 0.5
                                        and ns["sigma_Z2_blockdiag_var_share"] < 0.5),
        "iii_kappa_significant_late": bool(
            late["kappa"] > 0 and late["kappa"] >= 0.05 * abs(late["measured_delta_Z"])),
    }


def monotone(xs: Sequence[float]) -> str:
    """"increasing", "decreasing" (strictly) or "not monotone"."""
    d = np.diff(np.asarray(xs, dtype=np.float64))
    if (d > 0).all():
        return "increasing"
    if (d < 0).all():
        return "decreasing"
    return "not monotone"


def slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])

