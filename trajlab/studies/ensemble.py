"""Pure statistics of the validation study (MATH.md §4a) on ensembles of runs that differ only
in sampling order: :class:`EnsembleSeries` (network terms of n runs on a common step grid) and
the checks :func:`mean_check`, :func:`variance_check`, :func:`variance_horizon` and
:func:`sampler_stats`. No I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr

from trajlab.sde import integrate

__all__ = [
    "BAR",
    "LEVEL",
    "SAMPLERS",
    "EnsembleSeries",
    "mean_check",
    "sampler_stats",
    "variance_check",
    "variance_horizon",
]

#: The two batch samplers, in the order the study runs them.
SAMPLERS: tuple[str, str] = ("with_replacement", "reshuffle")
#: The agreement bar of issue 4: prediction and measurement within this factor of each other.
BAR = 1.5
#: Confidence level of every band the study reports.
LEVEL = 0.95


@dataclass(frozen=True)
class EnsembleSeries:
    """Network terms of ``n`` runs on a common step grid; every array is (run, row).

    Integrals (``int_*``) are left-point sums over earlier rows: ``int_x[:, r]`` is
    ``sum_{s < r} x[:, s] * lr[s]``, so ``int_x[:, 0] == 0`` and ``Z[:, r] - Z[:, 0]`` is the
    matching measured change.
    """

    step: np.ndarray  # (T,) optimizer-step index of each row
    time: np.ndarray  # (T,) t = sum of lr over earlier rows
    Z: np.ndarray  # log K_net at each row (weights before that row's update)
    int_mu: np.ndarray  # int mu_Z dt
    int_s2: np.ndarray  # int sigma_Z^2 dt (full form)
    int_s2_blockdiag: np.ndarray  # int sigma_Z^2 dt (block-diagonal, paper form)
    int_disc: np.ndarray  # int (discretisation rate) dt
    int_kappa: np.ndarray  # int kappa_Z dt (noise-curvature part of mu_Z)
    nonfinite_rates: int  # rate values that were not finite (counted as 0 in the integrals)

    @property
    def n_runs(self) -> int:
        return int(self.Z.shape[0])

    @classmethod
    def from_datasets(cls, datasets: Sequence[xr.Dataset]) -> EnsembleSeries:
        """Stack analyses of runs with the same steps and learning rates."""
        if len(datasets) < 2:
            raise ValueError(f"an ensemble needs at least 2 runs, got {len(datasets)}")
        step = np.asarray(datasets[0].step.values)
        net_dt = np.asarray(datasets[0]["net_dt"].values, dtype=np.float64)
        for ds in datasets[1:]:
            if not np.array_equal(ds.step.values, step):
                raise ValueError("runs of an ensemble must hold the same recorded steps")
            if not np.array_equal(ds["net_dt"].values, net_dt):
                raise ValueError("runs of an ensemble must use the same learning rates")
        dt = torch.from_numpy(net_dt)
        bad = 0
        ints: dict[str, list[np.ndarray]] = {}
        keys = {"int_mu": "logK_drift", "int_s2": "logK_diffusion2",
                "int_s2_blockdiag": "logK_diffusion2_blockdiag",
                "int_disc": "logK_discretization", "int_kappa": "logK_noise_curvature"}
        for ds in datasets:
            for name, var in keys.items():
                rate = np.asarray(ds[var].values, dtype=np.float64)
                finite = np.isfinite(rate)
                bad += int((~finite[:-1]).sum())
                rate = torch.from_numpy(np.where(finite, rate, 0.0))
                ints.setdefault(name, []).append(integrate(rate, dt, at="start").numpy())
        Z = np.stack([np.asarray(ds["logK"].values, dtype=np.float64) for ds in datasets])
        return cls(step=step, time=integrate(torch.ones_like(dt), dt, at="start").numpy(), Z=Z,
                   nonfinite_rates=bad, **{k: np.stack(v) for k, v in ints.items()})

    def at(self, row: int = -1) -> dict[str, np.ndarray]:
        """Per-run values at ``row``: ``delta_Z`` and the integrals, each (run,)."""
        return {"delta_Z": self.Z[:, row] - self.Z[:, 0], "int_mu": self.int_mu[:, row],
                "int_s2": self.int_s2[:, row], "int_s2_blockdiag": self.int_s2_blockdiag[:, row],
                "int_disc": self.int_disc[:, row], "int_kappa": self.int_kappa[:, row]}


# ============================================================================ statistics
def _chi2_ppf(q: float, df: int) -> float:
    try:
        from scipy.stats import chi2

        return float(chi2.ppf(q, df))
    except ImportError:  # Wilson–Hilferty, good to ~1% for df >= 3
        from statistics import NormalDist

        z = NormalDist().inv_cdf(q)
        return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _summary(x: np.ndarray) -> dict[str, float]:
    """Mean and its standard error over runs."""
    x = np.asarray(x, dtype=np.float64)
    return {"mean": float(x.mean()), "se": float(x.std(ddof=1) / math.sqrt(x.size))}


def mean_check(delta_Z: np.ndarray, predictions: dict[str, np.ndarray], *,
               bar: float = BAR) -> dict[str, Any]:
    """Check (1): mean measured change against mean predicted change, per prediction.

    Parameters
    ----------
    delta_Z : (run,) measured ``Z(T) - Z(0)``.
    predictions : name -> (run,) predicted change of each run (its own ``int mu_Z dt``, ...).
    bar : agreement factor.

    Returns
    -------
    dict
        ``measured`` {mean, se}; per prediction: ``predicted`` {mean, se}, ``ratio`` (mean
        measured / mean predicted), ``ratio_se`` (delta method), ``residual`` {mean, se} of the
        paired difference measured - predicted (the part the prediction misses, with its
        sampling error), ``residual_z`` (residual mean / se) and ``within_bar``.
    """
    out: dict[str, Any] = {"measured": _summary(delta_Z), "bar": bar}
    m = float(np.mean(delta_Z))
    for name, pred in predictions.items():
        p = float(np.mean(pred))
        ps = _summary(pred)
        res = _summary(np.asarray(delta_Z) - np.asarray(pred))
        ratio = m / p if p != 0 else math.inf
        ratio_se = abs(ratio) * math.hypot(out["measured"]["se"] / m if m else math.inf,
                                           ps["se"] / p if p else math.inf)
        out[name] = {
            "predicted": ps,
            "ratio": ratio,
            "ratio_se": ratio_se,
            "residual": res,
            "residual_z": res["mean"] / res["se"] if res["se"] > 0 else math.inf,
            "within_bar": bool(1 / bar <= ratio <= bar),
        }
    return out


def variance_check(martingale: np.ndarray, predictions: dict[str, np.ndarray], *,
                   bar: float = BAR, level: float = LEVEL) -> dict[str, Any]:
    """Check (2): across-run variance of ``M`` against the mean predicted variance.

    The sample variance of n Gaussian values is ``Var * chi2_{n-1} / (n-1)``, so the ratio
    ``r = var(M) / E[int sigma^2]`` has relative sd ``sqrt(2 / (n-1))`` and the ``level``
    interval of the true ratio is ``r (n-1) / chi2_{n-1}((1 +- level) / 2)``. The sampling error
    of the predicted mean (a few percent) is left out.

    Returns
    -------
    dict
        ``measured_var``, ``rel_sd``; per prediction: ``predicted`` {mean, se}, ``ratio``,
        ``ratio_ci`` [lo, hi], ``within_bar`` (the ratio itself within [1/bar, bar]) and
        ``consistent_with_bar`` (the interval meets [1/bar, bar]).
    """
    m = np.asarray(martingale, dtype=np.float64)
    n = m.size
    var = float(m.var(ddof=1))
    lo_q = _chi2_ppf((1 + level) / 2, n - 1) / (n - 1)
    hi_q = _chi2_ppf((1 - level) / 2, n - 1) / (n - 1)
    out: dict[str, Any] = {"measured_var": var, "measured_mean": float(m.mean()),
                           "n_runs": n, "rel_sd": math.sqrt(2 / (n - 1)), "level": level,
                           "bar": bar}
    for name, pred in predictions.items():
        p = float(np.mean(pred))
        r = var / p if p > 0 else math.inf
        ci = [r / lo_q, r / hi_q]
        out[name] = {"predicted": _summary(pred), "ratio": r, "ratio_ci": ci,
                     "within_bar": bool(1 / bar <= r <= bar),
                     "consistent_with_bar": bool(ci[0] <= bar and ci[1] >= 1 / bar)}
    return out


def variance_horizon(Z: np.ndarray, predicted_var: np.ndarray, *, bar: float = BAR,
                     level: float = LEVEL, resolution: float = 0.0) -> dict[str, Any]:
    """Check (3): ``Var_runs[Z(t)]`` against the mean ``int sigma_Z^2 dt``, row by row.

    Parameters
    ----------
    Z : (run, row) log K_net; all runs share ``Z[:, 0]`` (one initialisation).
    predicted_var : (run, row) each run's ``int_0^t sigma_Z^2 dt``.
    resolution : smallest meaningful standard deviation of Z (rounding of the stored values).

    Returns
    -------
    dict
        ``burn_in_rows``: leading rows where the predicted sd is at most ``100 * resolution``
        (at least row 0, where both sides are exactly 0): there the ratio is rounding, not
        dynamics. ``parting_row``: the first later row whose ``level`` chi-square interval of the
        ratio ``Var / pred`` lies wholly outside [1/bar, bar], i.e. the two have parted by more
        than ``bar`` beyond sampling noise (None if never). ``first_exit_row``: the first later
        row where the point ratio leaves [1/bar, bar] (noisy: relative sd ``sqrt(2/(n-1))``).
        ``parting_direction``: "above" or "below". ``ratio_max`` and its row ``ratio_max_row``.
        ``ratio_end``, ``ratio_ci_end``. ``curves``: ``var_Z``, ``pred_var``, ``ratio``,
        ``ratio_lo``, ``ratio_hi`` per row.
    """
    Z = np.asarray(Z, dtype=np.float64)
    n = Z.shape[0]
    var = Z.var(axis=0, ddof=1)
    pred = np.asarray(predicted_var, dtype=np.float64).mean(axis=0)
    tiny = pred <= (100 * resolution) ** 2
    burn = int(np.argmin(tiny)) if not tiny.all() else int(tiny.size)
    burn = max(burn, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(pred > 0, var / pred, np.nan)
    lo_q = _chi2_ppf((1 + level) / 2, n - 1) / (n - 1)
    hi_q = _chi2_ppf((1 - level) / 2, n - 1) / (n - 1)
    r_lo, r_hi = ratio / lo_q, ratio / hi_q
    rows = np.arange(ratio.size)
    valid = rows >= burn
    parted = valid & ((r_hi < 1 / bar) | (r_lo > bar))
    exited = valid & ((ratio < 1 / bar) | (ratio > bar))
    first = (lambda mask: int(np.argmax(mask)) if mask.any() else None)
    part = first(parted)
    after = np.where(valid, ratio, np.nan)
    top = int(np.nanargmax(after)) if np.isfinite(after).any() else None
    return {
        "burn_in_rows": burn,
        "parting_row": part,
        "parting_direction": None if part is None else ("above" if r_lo[part] > bar
                                                        else "below"),
        "ratio_max": None if top is None else float(ratio[top]),
        "ratio_max_row": top,
        "first_exit_row": first(exited),
        "ratio_end": float(ratio[-1]),
        "ratio_ci_end": [float(r_lo[-1]), float(r_hi[-1])],
        "bar": bar,
        "level": level,
        "curves": {"var_Z": var, "pred_var": pred, "ratio": ratio, "ratio_lo": r_lo,
                   "ratio_hi": r_hi},
    }


def sampler_stats(series: dict[str, EnsembleSeries], *, bar: float, resolution: float
                   ) -> dict[str, Any]:
    """Checks (1)–(4) for one sampler; ``series`` maps gradient ("batch"/"auto") to ensembles
    (the horizon check uses "auto", the probe)."""
    out: dict[str, Any] = {"n_runs": series["auto"].n_runs}
    for grad, s in series.items():
        end = s.at(-1)
        preds = {"ito": end["int_mu"], "ito_plus_discretization": end["int_mu"] + end["int_disc"]}
        M = end["delta_Z"] - end["int_mu"]
        out[grad] = {
            "mean": mean_check(end["delta_Z"], preds, bar=bar),
            "discretization_integral": _summary(end["int_disc"]),
            "noise_curvature_integral": _summary(end["int_kappa"]),
            "martingale": variance_check(M, {"full": end["int_s2"],
                                             "blockdiag": end["int_s2_blockdiag"]}, bar=bar),
            "martingale_minus_discretization": variance_check(
                M - end["int_disc"], {"full": end["int_s2"]}, bar=bar),
            "nonfinite_rates": s.nonfinite_rates,
        }
    hz = variance_horizon(series["auto"].Z, series["auto"].int_s2, bar=bar,
                          resolution=resolution)
    s = series["auto"]
    for k in ("burn_in_rows", "parting_row", "first_exit_row", "ratio_max_row"):
        row = hz[k]
        hz[k.replace("_row", "_step")] = None if row is None or row >= s.step.size \
            else int(s.step[row])
    out["horizon"] = hz
    # What the probe changes: the flow terms differ, the noise terms are the same numbers.
    b, a = series["batch"].at(-1), series["auto"].at(-1)
    out["flow_bias"] = {
        "batch_minus_probe": _summary(b["int_mu"] - a["int_mu"]),
        "minus_noise_curvature": _summary(-a["int_kappa"]),
    }
    return out
