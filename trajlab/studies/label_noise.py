"""Study 5: label-noise fraction vs gradient noise and Lipschitz growth."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trajlab.recipes import TrainConfig
from trajlab.studies.common import column, fmt, fmt_list
from trajlab.studies.numbers import monotone
from trajlab.studies.sweep_study import VARIANCE_KEYS, SweepStudy, run_sweep, sweep_entry

__all__ = ["STUDY", "label_noise_sweep"]

_STUDY = SweepStudy(
    name="label_noise", param="label_noise", axis="label-noise fraction",
    title="label-noise fraction",
    claim="more label noise -> larger gradient noise -> larger Lipschitz growth and variance",
    criterion="σ_Z² and ΔZ both increase with the label-noise fraction",
    summary_keys=VARIANCE_KEYS, summary_ylabel="variance of log K_net per unit time",
    logy=True,
    numbers=lambda sweep, rows, f: {
        "sigma_Z2_trend": monotone(column(rows, "sigma_Z2_mean")),
        "delta_Z_trend": monotone(column(rows, "delta_Z")),
        "realised_var_trend": monotone(column(rows, "realised_var_rate"))},
    verdict=lambda num, rows, f: [
        (f"label noise {', '.join(fmt(x) for x in f)}: σ_Z² "
        f"{fmt_list(column(rows, 'sigma_Z2_mean'))} ({num['sigma_Z2_trend']}); measured step "
        f"variance {fmt_list(column(rows, 'realised_var_rate'))} ({num['realised_var_trend']})"),
        (f"growth ΔZ = log K_net(T)/K_net(0): {fmt_list(column(rows, 'delta_Z'), '+.3f')} "
        f"({num['delta_Z_trend']}); ∫κ_Z dt {fmt_list(column(rows, 'int_kappa'), '.3f')}; final "
        f"loss {fmt_list(column(rows, 'loss_end'), '.3f')}"),
    ],
    supported=lambda num: (num["sigma_Z2_trend"] == "increasing"
                           and num["delta_Z_trend"] == "increasing"),
)


def label_noise_sweep(out: str | Path, *, config: TrainConfig | None = None,
                      fractions: Sequence[float] = (0.0, 0.2, 0.4),
                      runs: Sequence[str | Path] | None = None, scheduler: Any = "threads",
                      progress: bool = False, echo: bool = True) -> dict[str, Any]:
    """Study 5: label-noise fraction vs gradient noise and Lipschitz growth. Writes
    ``label_noise.json``, ``label_noise.png`` and ``label_noise_drift.png``."""
    return run_sweep(_STUDY, out, [float(x) for x in fractions], config=config,
                     runs=runs, scheduler=scheduler, progress=progress, echo=echo)


STUDY = sweep_entry(
    label_noise_sweep, name="label_noise",
    summary="Study 5: label-noise fraction vs gradient noise and Lipschitz growth",
    flag="--label-noise", keyword="fractions", kind=float, default=[0, 0.2, 0.4],
    quick=[0.0, 0.4],
    usage="  --out studies/label_noise\n  --out studies/label_noise --quick\n"
          "  --out my --runs my_sweep_dir/\n"
          "Writes label_noise.json, label_noise.png and label_noise_drift.png into --out.",
)
