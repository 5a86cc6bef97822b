"""Study 4 (paper Fig. 5): batch size vs the variance of K (sigma_Z^2 ∝ 1/B?)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trajlab.recipes import TrainConfig
from trajlab.studies.common import column, fmt, fmt_list
from trajlab.studies.numbers import monotone, slope
from trajlab.studies.sweep_study import VARIANCE_KEYS, SweepStudy, run_sweep, sweep_entry

__all__ = ["STUDY", "batch_size_sweep"]

_STUDY = SweepStudy(
    name="batch_size", param="batch_size", axis="batch size B",
    title="batch size vs the variance of K (paper Fig. 5)",
    claim="smaller batches give larger diffusion of K: σ_Z² ∝ 1/B",
    criterion="slope of log σ_Z² vs log B in [-1.3, -0.7] and measured variance decreasing in B",
    summary_keys=VARIANCE_KEYS, summary_ylabel="variance of log K_net per unit time",
    logx=True, logy=True,
    value_of=lambda p, ds: float(np.median(ds.batch_size.values)),
    numbers=lambda sweep, rows, B: {
        "slope_sigma_Z2_vs_B": slope(B, column(rows, "sigma_Z2_mean")),
        "slope_realised_var_vs_B": slope(B, column(rows, "realised_var_rate")),
        "B_times_sigma_Z2": [b * s for b, s in zip(B, column(rows, "sigma_Z2_mean"))],
        "sigma_Z2_trend": monotone(column(rows, "sigma_Z2_mean")),
        "realised_var_trend": monotone(column(rows, "realised_var_rate"))},
    reference=lambda rows, B: (
        "∝ 1/B (through the middle run)",
        [column(rows, "sigma_Z2_mean")[len(B) // 2] * B[len(B) // 2] / b for b in B]),
    verdict=lambda num, rows, B: [
        (f"B = {', '.join(fmt(b) for b in B)}: time-mean σ_Z² = "
        f"{fmt_list(column(rows, 'sigma_Z2_mean'))} (log-log slope "
        f"{num['slope_sigma_Z2_vs_B']:.2f}; 1/B law: -1); measured step variance of log K_net "
        f"{fmt_list(column(rows, 'realised_var_rate'))} "
        f"(slope {num['slope_realised_var_vs_B']:.2f})"),
        f"ΔZ = {fmt_list(column(rows, 'delta_Z'), '+.2f')}; measured/predicted step variance "
        + ", ".join(f"{m / p:.2f}" for m, p in zip(column(rows, "realised_var_rate"),
                                                   column(rows, "sigma_Z2_mean"))),
    ],
    supported=lambda num: (-1.3 <= num["slope_sigma_Z2_vs_B"] <= -0.7
                           and num["realised_var_trend"] == "decreasing"),
)


def batch_size_sweep(out: str | Path, *, config: TrainConfig | None = None,
                     batch_sizes: Sequence[int] = (8, 16, 32, 64, 128),
                     runs: Sequence[str | Path] | None = None, scheduler: Any = "threads",
                     progress: bool = False, echo: bool = True) -> dict[str, Any]:
    """Study 4 (paper Fig. 5): batch size vs the diffusion of log K_net at fixed lr and steps.
    Writes ``batch_size.json``, ``batch_size.png`` and ``batch_size_drift.png``."""
    return run_sweep(_STUDY, out, list(batch_sizes), config=config, runs=runs,
                     scheduler=scheduler, progress=progress, echo=echo)


STUDY = sweep_entry(
    batch_size_sweep, name="batch_size",
    summary="Study 4 (paper Fig. 5): batch size vs the variance of K (sigma_Z^2 ∝ 1/B?)",
    flag="--batch-sizes", keyword="batch_sizes", kind=int, default=[8, 16, 32, 64, 128],
    quick=[8, 32],
    usage="  --out studies/batch_size\n  --out studies/batch_size --quick\n"
          "  --out my --runs my_sweep_dir/\n"
          "Writes batch_size.json, batch_size.png and batch_size_drift.png into --out.",
)
