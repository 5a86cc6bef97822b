"""Study 6: initialisation scale vs K trajectories and drift terms (descriptive)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trajlab.recipes import TrainConfig
from trajlab.studies.common import column, fmt, fmt_list
from trajlab.studies.numbers import monotone
from trajlab.studies.sweep_study import SweepStudy, run_sweep, sweep_entry

__all__ = ["STUDY", "init_scale_sweep"]

_STUDY = SweepStudy(
    name="init_scale", param="init_scale", axis="initialisation scale",
    title="initialisation scale",
    claim="the initialisation scale sets K(0) and changes the later growth of K and the "
          "balance of the drift terms (descriptive: no direction stated)",
    criterion="descriptive study",
    summary_keys={"delta_Z": "measured ΔZ",
                  "pred_delta_Z": "SDE for SGD (paper), forward prediction",
                  "int_flow": "∫ gradient flow", "int_kappa": "∫ κ_Z"},
    summary_ylabel="change of log K_net over the run", logx=True,
    numbers=lambda sweep, rows, s: {
        "K_net_start_trend": monotone(column(rows, "K_net_start")),
        "delta_Z_trend": monotone(column(rows, "delta_Z")),
        "sigma_Z2_trend": monotone(column(rows, "sigma_Z2_mean"))},
    verdict=lambda num, rows, s: [
        f"init scale {', '.join(fmt(x) for x in s)}: K_net "
        + ", ".join(f"{r['K_net_start']:.3g}->{r['K_net_end']:.3g}" for r in rows)
        + f"; ΔZ {fmt_list(column(rows, 'delta_Z'), '+.3f')} ({num['delta_Z_trend']})",
        "integrated flow / κ_Z / Itô: " + "; ".join(
            f"{r['int_flow']:+.3f} / {r['int_kappa']:+.3f} / {r['int_ito']:+.3f}" for r in rows)
        + f"; σ_Z² {fmt_list(column(rows, 'sigma_Z2_mean'))}",
    ],
    supported=lambda num: None,
)


def init_scale_sweep(out: str | Path, *, config: TrainConfig | None = None,
                     scales: Sequence[float] = (0.5, 1.0, 2.0),
                     runs: Sequence[str | Path] | None = None, scheduler: Any = "threads",
                     progress: bool = False, echo: bool = True) -> dict[str, Any]:
    """Study 6: initialisation scale vs the K trajectories and the drift terms. Writes
    ``init_scale.json``, ``init_scale.png`` and ``init_scale_drift.png``."""
    return run_sweep(_STUDY, out, [float(x) for x in scales], config=config, runs=runs,
                     scheduler=scheduler, progress=progress, echo=echo)


STUDY = sweep_entry(
    init_scale_sweep, name="init_scale",
    summary="Study 6: initialisation scale vs K trajectories and drift terms",
    flag="--init-scales", keyword="scales", kind=float, default=[0.5, 1, 2],
    quick=[0.5, 2.0],
    usage="  --out studies/init_scale\n  --out studies/init_scale --quick\n"
          "  --out my --runs my_sweep_dir/\n"
          "Writes init_scale.json, init_scale.png and init_scale_drift.png into --out.",
)
