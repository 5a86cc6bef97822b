"""Calibration of the log K SDE over many runs that differ only in sampling order (MATH.md §4a).

The study of issue 4: ``n_runs`` runs from one initialisation per sampler (independent batches
drawn with replacement, then random reshuffling), each recorded with a full-data gradient probe
and analysed by :func:`trajlab.analysis.analyze` twice (flow term from the batch gradient, and
from the probe). Across runs it compares

1. the mean of ``Z(T) - Z(0)`` with the mean of ``int mu_Z dt``, with and without the
   discretisation term;
2. the variance of the martingale part ``M = Z(T) - Z(0) - int mu_Z dt`` with the mean of
   ``int sigma_Z^2 dt`` (full and block-diagonal forms);
3. ``Var[Z(t)]`` with the mean of ``int sigma_Z^2 dt`` step by step, and the horizon at which
   they part;
4. the same under random reshuffling, where the batch-gradient flow term is biased, with the flow
   term from the batch gradient and from the full-data probe.

Time is ``t = sum of lr``. Row ``r`` of an analysis holds the weights *before* update ``r``, so
``Z`` at row ``R`` is compared with the rates integrated over rows ``0 .. R-1`` (left-point, Itô).

The layout: :func:`record_runs` and :func:`analyse_runs` (I/O: every run of the study in one
analysis graph per gradient choice), pure statistics on arrays (:func:`mean_check`,
:func:`variance_check`, :func:`variance_horizon`), :func:`plot_validation_study`,
:func:`verdict_lines`, and :func:`run_validation` wiring them together.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr

from trajlab.analysis.engine import scheduler_context
from trajlab.recipes import TrainConfig, record_digits
from trajlab.sde import integrate
from trajlab.store import open_run

__all__ = [
    "BAR",
    "SAMPLERS",
    "EnsembleSeries",
    "analyse_runs",
    "mean_check",
    "plot_validation_study",
    "record_runs",
    "run_validation",
    "variance_check",
    "variance_horizon",
    "verdict_lines",
]

#: The two batch samplers, in the order the study runs them.
SAMPLERS: tuple[str, str] = ("with_replacement", "reshuffle")
#: The agreement bar of issue 4: prediction and measurement within this factor of each other.
BAR = 1.5
#: Confidence level of every band the study reports.
LEVEL = 0.95

_GRADIENTS = ("batch", "auto")  # flow term from the batch gradient / from the full-data probe


# ============================================================================ ensemble arrays
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


def _sampler_stats(series: dict[str, EnsembleSeries], *, bar: float, resolution: float
                   ) -> dict[str, Any]:
    """Checks (1)–(3) for one sampler; ``series`` maps gradient ("batch"/"auto") to ensembles."""
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


# ============================================================================ recording (I/O)
@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads, restoring the previous setting."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def record_runs(out_dir: str | Path, base: TrainConfig, n_runs: int, *,
                progress: bool = False) -> dict[str, list[Path]]:
    """Record ``n_runs`` digits runs per sampler into ``<out_dir>/runs/<sampler>-<i>.zarr``
    (overwritten), differing only in ``sampling_seed`` (0 .. n_runs-1) and the sampler.

    Returns {sampler: run-store paths}.
    """
    from tqdm import tqdm  # plain text bars: no ipywidgets needed in notebooks

    runs: dict[str, list[Path]] = {s: [] for s in SAMPLERS}
    bar = tqdm(total=len(SAMPLERS) * n_runs, disable=not progress, desc="recording runs",
               unit="run")
    for sampler in SAMPLERS:
        for i in range(n_runs):
            path = Path(out_dir) / "runs" / f"{sampler}-{i:03d}.zarr"
            record_digits(path, base.replace(sampler=sampler, sampling_seed=i), overwrite=True,
                          progress=False)
            runs[sampler].append(path)
            bar.update(1)
    bar.close()
    return runs


def analyse_runs(runs: dict[str, list[Path]], out_dir: str | Path, *, scheduler: Any,
                 progress: bool = False,
                 gradients: Sequence[Literal["batch", "auto"]] = _GRADIENTS,
                 ) -> dict[str, dict[str, list[xr.Dataset]]]:
    """Analyse every run of every sampler in one :func:`~trajlab.analysis.analyze` graph per
    gradient choice, into ``<out_dir>/analysis/`` (finished analyses are reused).

    Returns {sampler: {gradient: in-memory analysis Datasets, in run order}}.
    """
    from trajlab.studies.sweep import analyse_runs as analyse_sweep

    paths = [p for s in SAMPLERS for p in runs[s]]
    out: dict[str, dict[str, list[xr.Dataset]]] = {s: {} for s in SAMPLERS}
    for g in gradients:
        sweep = analyse_sweep(paths, out_dir, scheduler=scheduler, progress=progress,
                              gradient=g)
        datasets = iter(ds.load() for ds in sweep.datasets)
        for s in SAMPLERS:
            out[s][g] = [next(datasets) for _ in runs[s]]
    return out


# ============================================================================ figure
def _zoom(ax, vals: Sequence[dict[str, float]]) -> None:
    """Cut the y axis to the bars' error range so that differences of a few percent show."""
    lo = min(v["mean"] - 2 * v["se"] for v in vals)
    hi = max(v["mean"] + 2 * v["se"] for v in vals)
    pad = 0.3 * (hi - lo) + 1e-12
    ax.set_ylim(lo - pad, hi + pad)


def plot_validation_study(result: dict[str, Any], path: str | Path) -> Path:
    """Four panels for checks (1)–(4) of ``result`` (from :func:`run_validation`); PNG at path."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global figure state

    fig = Figure(figsize=(13, 9.5), layout="constrained")
    (ax1, ax2), (ax3, ax4) = fig.subplots(2, 2)
    wr, rs = result["with_replacement"], result["reshuffle"]
    cfg = result["config"]

    # (1) mean change, independent batches
    m = wr["auto"]["mean"]
    mb = wr["batch"]["mean"]
    labels = ["measured\nE[Z(T)-Z(0)]", "probe: Itô\nE[∫μ_Z dt]", "probe: Itô+discr.\n"
              "E[∫(μ_Z+d) dt]", "batch grad.:\nItô", "batch grad.:\nItô+discr."]
    vals = [m["measured"], m["ito"]["predicted"], m["ito_plus_discretization"]["predicted"],
            mb["ito"]["predicted"], mb["ito_plus_discretization"]["predicted"]]
    x = np.arange(len(vals))
    ax1.bar(x, [v["mean"] for v in vals], yerr=[1.96 * v["se"] for v in vals], capsize=4,
            color=["0.3", "C0", "C1", "C2", "C2"])
    ax1.set_xticks(x, labels, fontsize=8)
    _zoom(ax1, vals)
    ax1.set_ylabel("change of Z = log K_net over the run  [nats]\n(axis cut; bars ±1.96 s.e.)")
    ax1.set_title(f"(1) mean drift, independent batches ({wr['n_runs']} runs, "
                  f"{cfg['steps']} steps)\nratio measured/Itô {m['ito']['ratio']:.3f}, "
                  f"/(Itô+discr.) {m['ito_plus_discretization']['ratio']:.3f}", fontsize=9)
    res = m["ito"]["residual"]
    ax1.text(0.02, 0.97, f"unexplained E[ΔZ-∫μ] = {res['mean']:.4f} ± {res['se']:.4f}\n"
             f"discretisation ∫d = {wr['auto']['discretization_integral']['mean']:.4f}",
             transform=ax1.transAxes, va="top", fontsize=8)

    # (2) martingale variance
    groups = [("indep., probe", wr["auto"]["martingale"]),
              ("indep., batch grad.", wr["batch"]["martingale"]),
              ("reshuffle, probe", rs["auto"]["martingale"])]
    xs = np.arange(len(groups))
    w = 0.27
    meas = [g["measured_var"] for _, g in groups]
    full = [g["full"]["predicted"]["mean"] for _, g in groups]
    blk = [g["blockdiag"]["predicted"]["mean"] for _, g in groups]
    lo = [g["measured_var"] / g["full"]["ratio"] * g["full"]["ratio_ci"][0] for _, g in groups]
    hi = [g["measured_var"] / g["full"]["ratio"] * g["full"]["ratio_ci"][1] for _, g in groups]
    ax2.bar(xs - w, meas, w, color="0.3", label="Var_runs[M], M = ΔZ - ∫μ_Z dt",
            yerr=[np.array(meas) - np.array(lo), np.array(hi) - np.array(meas)], capsize=3)
    ax2.bar(xs, full, w, color="C0", label="E[∫σ_Z² dt], full form")
    ax2.bar(xs + w, blk, w, color="C3", label="E[∫σ_Z² dt], block-diagonal")
    ax2.set_xticks(xs, [f"{n}\nratio {g['full']['ratio']:.2g}" for n, g in groups], fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("variance of Z at T  [nats²]")
    ax2.set_title("(2) martingale part vs predicted variance\n(error bar: 95% χ² band of the "
                  "variance)", fontsize=9)
    ax2.legend(fontsize=8)

    # (3) Var[Z(t)] vs int sigma^2
    cur = result["curves"]
    first = max(result[s]["horizon"]["burn_in_rows"] for s in SAMPLERS)  # after the burn-in
    steps = np.asarray(cur["step"])[first:]
    for name, c, ls in (("with_replacement", "C0", "-"), ("reshuffle", "C2", "--")):
        cv = cur[name]
        ax3.plot(steps, np.asarray(cv["var_Z"])[first:], color=c, ls=ls,
                 label=f"Var_runs[Z(t)], {name}")
        ax3.plot(steps, np.asarray(cv["pred_var"])[first:], color=c, ls=":", lw=2,
                 label=f"E[∫σ_Z² dt], {name}")
    pv = np.asarray(cur["with_replacement"]["pred_var"])[first:]
    ax3.fill_between(steps, pv / BAR, pv * BAR, color="C0", alpha=0.12,
                     label=f"×/÷ {BAR} around the with_replacement prediction")
    hz = wr["horizon"]
    for name, c in (("with_replacement", "C0"), ("reshuffle", "C2")):
        hz = result[name]["horizon"]
        if hz["parting_step"] is not None:
            ax3.axvline(hz["parting_step"], color=c, lw=1.2,
                        label=f"{name}: parted beyond the 95% band, step {hz['parting_step']}")
    ax3.set_xscale("log")
    ax3.set_yscale("log")
    ax3.set_xlabel(f"optimizer step  (t = step × lr, lr = {cfg['lr']})")
    ax3.set_ylabel("variance of Z(t) across runs  [nats²]")
    ax3.set_title(f"(3) ensemble variance vs ∫σ_Z² dt ({wr['n_runs']} runs per sampler; "
                  f"parted = 95% χ² band of the ratio outside [1/{BAR}, {BAR}])", fontsize=9)
    ax3.legend(fontsize=7, loc="upper left")

    # (4) reshuffle: batch vs probe
    rm_b, rm_a = rs["batch"]["mean"], rs["auto"]["mean"]
    vals4 = [rm_a["measured"], rm_b["ito"]["predicted"],
             rm_b["ito_plus_discretization"]["predicted"], rm_a["ito"]["predicted"],
             rm_a["ito_plus_discretization"]["predicted"]]
    labels4 = ["measured\nE[ΔZ]", "batch grad.\n∫μ_Z", "batch grad.\n∫(μ_Z+d)",
               "probe\n∫μ_Z", "probe\n∫(μ_Z+d)"]
    x4 = np.arange(len(vals4))
    ax4.bar(x4, [v["mean"] for v in vals4], yerr=[1.96 * v["se"] for v in vals4], capsize=4,
            color=["0.3", "C2", "C2", "C1", "C1"])
    ax4.set_xticks(x4, labels4, fontsize=8)
    _zoom(ax4, vals4)
    ax4.set_ylabel("change of Z = log K_net over the run  [nats]\n(axis cut; bars ±1.96 s.e.)")
    fb = rs["flow_bias"]
    ax4.set_title(f"(4) random reshuffling ({rs['n_runs']} runs): flow term from batch gradient "
                  f"vs full-data probe\nE[∫(μ_batch-μ_probe)] = "
                  f"{fb['batch_minus_probe']['mean']:.4f}, -E[∫κ_Z] = "
                  f"{fb['minus_noise_curvature']['mean']:.4f}", fontsize=9)
    fig.suptitle("Validation of the log K_net SDE across runs that differ only in sampling order "
                 f"(digits, {cfg['model']} {cfg['hidden']}, B = {cfg['batch_size']}, "
                 f"{cfg['dtype']})", fontsize=11)
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path


# ============================================================================ verdict
def verdict_lines(result: dict[str, Any]) -> list[str]:
    """A few lines: what the paper (MATH.md §4a) claims, and what this study measured."""
    wr, rs = result["with_replacement"], result["reshuffle"]
    m, v = wr["auto"]["mean"], wr["auto"]["martingale"]
    hz = wr["horizon"]
    ok = lambda b: "PASS" if b else "FAIL"
    mb = wr["batch"]["martingale"]["full"]
    mbm = wr["batch"]["mean"]
    fb = rs["flow_bias"]
    hr = rs["horizon"]
    return [
        f"(1) mean, independent batches: E[ΔZ] = {m['measured']['mean']:.4f} ± "
        f"{m['measured']['se']:.4f}; E[∫μ_Z] = {m['ito']['predicted']['mean']:.4f} (ratio "
        f"{m['ito']['ratio']:.3f}, {ok(m['ito']['within_bar'])}); + discretisation "
        f"{m['ito_plus_discretization']['predicted']['mean']:.4f} (ratio "
        f"{m['ito_plus_discretization']['ratio']:.3f}, "
        f"{ok(m['ito_plus_discretization']['within_bar'])}); unexplained without the term "
        f"{m['ito']['residual']['mean']:.4f} ± {m['ito']['residual']['se']:.4f} (z = "
        f"{m['ito']['residual_z']:.1f}), with it {m['ito_plus_discretization']['residual_z']:.1f}"
        f". With batch-gradient terms (debiased), Itô + discretisation misses by "
        f"{mbm['ito_plus_discretization']['residual']['mean']:.4f} (z = "
        f"{mbm['ito_plus_discretization']['residual_z']:.1f})",
        f"(2) martingale variance / E[∫σ_Z²]: full {v['full']['ratio']:.2f} "
        f"(95% {v['full']['ratio_ci'][0]:.2f}–{v['full']['ratio_ci'][1]:.2f}, "
        f"{ok(v['full']['within_bar'])}), block-diagonal {v['blockdiag']['ratio']:.2f} "
        f"({ok(v['blockdiag']['within_bar'])}); paper toy: 1.5. With the flow term from the "
        f"batch gradient instead of the probe the ratio is {mb['ratio']:.3g}: the batch "
        f"gradient already holds the noise, so the probe is required for this check",
        f"(3) Var[Z(t)] / E[∫σ_Z²] at the end: {hz['ratio_end']:.3f} (paper toy: 0.03 after 500 "
        f"steps); the point ratio first leaves [1/{BAR}, {BAR}] at step {hz['first_exit_step']} "
        + (f"(sampling noise), the two part beyond the 95% band at step {hz['parting_step']} "
           f"({hz['parting_direction']} the prediction)" if hz["parting_step"] is not None
           else "(sampling noise); they do not part beyond the 95% band within the run")
        + f"; largest ratio {hz['ratio_max']:.2f} at step {hz['ratio_max_step']}",
        f"(4) reshuffle: E[ΔZ] = {rs['auto']['mean']['measured']['mean']:.4f}; batch-gradient "
        f"Itô {rs['batch']['mean']['ito']['predicted']['mean']:.4f} (ratio "
        f"{rs['batch']['mean']['ito']['ratio']:.3f}), probe Itô "
        f"{rs['auto']['mean']['ito']['predicted']['mean']:.4f} (ratio "
        f"{rs['auto']['mean']['ito']['ratio']:.3f}), probe + discretisation ratio "
        f"{rs['auto']['mean']['ito_plus_discretization']['ratio']:.3f}; flow bias batch - probe "
        f"{fb['batch_minus_probe']['mean']:.4f} ± {fb['batch_minus_probe']['se']:.4f} vs "
        f"-∫κ_Z {fb['minus_noise_curvature']['mean']:.4f} (paper: about -(noise curvature)); "
        f"martingale variance ratio {rs['auto']['martingale']['full']['ratio']:.2f}; "
        + (f"Var[Z(t)] parts from ∫σ_Z² at step {hr['parting_step']} "
           f"({hr['parting_direction']})" if hr["parting_step"] is not None
           else "Var[Z(t)] does not part from ∫σ_Z² within the run")
        + f" (one epoch = {rs.get('epoch_steps')} steps)",
    ]


# ============================================================================ the study
def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def run_validation(
    out_dir: str | Path,
    *,
    n_runs: int = 16,
    steps: int = 300,
    lr: float = 0.05,
    batch_size: int = 32,
    model: Literal["mlp", "convnet"] = "mlp",
    hidden: int = 32,
    dtype: Literal["float32", "float64"] = "float64",
    probe_every: int = 1,
    scheduler: Any = None,
    progress: bool = True,
    init_seed: int = 0,
    bar: float = BAR,
    torch_threads: int | None = 1,
) -> dict[str, Any]:
    """Run the validation study of issue 4 and write ``validation.json`` and ``validation.png``.

    Parameters
    ----------
    out_dir : folder for the run stores (``runs/``), the JSON summary and the figure.
    n_runs : runs per sampler (at least 2; issue 4 asks for 16 or more).
    steps, lr, batch_size, model, hidden, dtype : the :class:`~trajlab.recipes.TrainConfig` of
        every run; runs differ only in ``sampling_seed`` (0 .. n_runs-1) and the sampler.
    probe_every : full-data gradient every k steps in every run. Keep 1: the flow term of
        ``mu_Z`` must use the full-data gradient at every step for the martingale check (2) to
        mean anything (with the batch gradient it already contains the noise) and for (4).
    scheduler : where the analyses run: every run is analysed in one
        :func:`~trajlab.analysis.analyze` graph per gradient choice, into
        ``<out_dir>/analysis/``. None starts one LocalCluster for the whole study; "threads",
        "synchronous", "processes", a scheduler address or a ``distributed.Client`` as in
        ``analyze``.
    progress : progress bars (recording, analysis).
    init_seed : the one initialisation all runs share.
    bar : agreement factor for the pass/fail flags.
    torch_threads : intra-op torch threads while recording (restored afterwards); 1 is fastest
        for these small models. None leaves the setting alone.

    Returns
    -------
    dict
        JSON-serialisable: ``config``, ``runtime_s``, per sampler (``with_replacement``,
        ``reshuffle``) ``n_runs``, per gradient (``batch``, ``auto`` = probe) the checks
        ``mean`` (1, :func:`mean_check`), ``martingale`` (2, :func:`variance_check`), and
        ``horizon`` (3, :func:`variance_horizon` without its curves), ``flow_bias`` (4);
        ``verdict`` (lines) and ``curves`` (per-step ``step``, ``time`` and per sampler
        ``var_Z``, ``pred_var``, ``pred_var_blockdiag``, ``ratio``, ``mean_Z``,
        ``pred_mean``).

    Examples
    --------
    >>> res = run_validation("validation-out", n_runs=4, steps=40)  # doctest: +SKIP
    >>> print("\\n".join(res["verdict"]))  # doctest: +SKIP
    """
    if n_runs < 2:
        raise ValueError(f"n_runs must be at least 2 (variances across runs), got {n_runs}")
    if probe_every < 1:
        raise ValueError("probe_every must be >= 1: checks (2) and (4) need the full-data "
                         "gradient")
    out_dir = Path(out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    base = TrainConfig(model=model, hidden=hidden, steps=steps, lr=lr, batch_size=batch_size,
                       dtype=dtype, probe_every=probe_every, init_seed=init_seed,
                       optimizer="sgd")
    t0 = time.perf_counter()
    with _torch_threads(torch_threads):
        runs = record_runs(out_dir, base, n_runs, progress=progress)
    with scheduler_context(scheduler) as where:  # one cluster for both analyses
        analyses = analyse_runs(runs, out_dir, scheduler=where, progress=progress)
    t_runs = time.perf_counter() - t0

    eps = float(np.finfo(np.float64 if dtype == "float64" else np.float32).eps)
    series = {s: {g: EnsembleSeries.from_datasets(analyses[s][g]) for g in _GRADIENTS}
              for s in SAMPLERS}
    result: dict[str, Any] = {
        "config": {**asdict(base), "n_runs": n_runs, "sampling_seeds": list(range(n_runs)),
                   "samplers": list(SAMPLERS), "bar": bar,
                   "scheduler": scheduler if isinstance(scheduler, (str, type(None)))
                   else type(scheduler).__name__},
        "definitions": {
            "time": "t = sum of lr; row r holds the weights before update r",
            "delta_Z": "Z(row T-1) - Z(row 0), T = steps (the last recorded weights)",
            "integrals": "left-point sums of the rates over rows 0..T-2, matching delta_Z",
            "auto": "flow term of mu_Z from the full-data probe gradient (gradient='auto')",
            "batch": "flow term of mu_Z from the batch gradient (gradient='batch')",
            "martingale": "M = delta_Z - int mu_Z dt",
            "ratio_ci": f"{LEVEL:.0%} chi-square interval of the true variance ratio",
        },
    }
    curves: dict[str, Any] = {"step": series["with_replacement"]["auto"].step,
                              "time": series["with_replacement"]["auto"].time}
    for s in SAMPLERS:
        resolution = eps * float(np.abs(series[s]["auto"].Z).max())
        st = _sampler_stats(series[s], bar=bar, resolution=resolution)
        hz_curves = st["horizon"].pop("curves")
        ens = series[s]["auto"]
        curves[s] = {**{k: hz_curves[k] for k in ("var_Z", "pred_var", "ratio")},
                     "pred_var_blockdiag": ens.int_s2_blockdiag.mean(0),
                     "mean_Z": ens.Z.mean(0),
                     "pred_mean": ens.Z[:, 0].mean() + ens.int_mu.mean(0),
                     "pred_mean_plus_discretization":
                         ens.Z[:, 0].mean() + (ens.int_mu + ens.int_disc).mean(0)}
        result[s] = st
    result["reshuffle"]["epoch_steps"] = open_run(
        out_dir / "runs" / f"reshuffle-{0:03d}.zarr").meta.dataset_size // batch_size
    result["runtime_s"] = {"record_and_analyse": t_runs,
                           "total": time.perf_counter() - t0}
    result["curves"] = curves
    result = _jsonable(result)
    result["verdict"] = verdict_lines(result)
    plot_validation_study(result, out_dir / "validation.png")
    result["runtime_s"]["total"] = time.perf_counter() - t0
    (out_dir / "validation.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    if progress:
        print("\n".join(result["verdict"]))
    return result
