"""The four-panel figure of the validation study (:func:`plot_validation_study`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trajlab.studies.ensemble import BAR, SAMPLERS

__all__ = ["plot_validation_study"]


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
    labels = ["measured\nE[Z(T)-Z(0)]", "probe: Itô\nE[∫μ_Z dt]",
              "probe: Itô+discr.\nE[∫(μ_Z+d) dt]", "batch grad.:\nItô", "batch grad.:\nItô+discr."]
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
