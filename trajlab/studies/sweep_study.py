"""The skeleton of the hyper-parameter sweeps (studies 4-7): record or find the runs, analyse
them in one graph, tabulate :func:`~trajlab.studies.numbers.run_summary` per run, draw the
sweep and drift-bar figures, write the JSON. A sweep study declares a :class:`SweepStudy`
(what it adds) and registers it with :func:`sweep_entry`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr

from trajlab.recipes import TrainConfig
from trajlab.studies.common import base_config, collect, column, finish, loss_of, save_figure
from trajlab.studies.numbers import run_summary
from trajlab.studies.options import add_common_arguments, study_config, study_kwargs, values
from trajlab.studies.registry import Study
from trajlab.studies.sweep import Sweep, run_config

__all__ = ["VARIANCE_KEYS", "Rows", "SweepStudy", "run_sweep", "sweep_entry", "table"]

Rows = list[dict[str, Any]]

#: Summary-panel columns of the studies about the variance of K.
VARIANCE_KEYS = {"sigma_Z2_mean": "predicted σ_Z² (time mean)",
                 "realised_var_rate": "measured var of ΔZ per unit time"}


@dataclass(frozen=True)
class SweepStudy:
    """What one hyper-parameter sweep adds to the shared skeleton :func:`run_sweep`.

    ``numbers(sweep, rows, values)`` returns the study's numbers beyond ``per_run`` (it may add
    columns to ``rows``); ``verdict(num, rows, values)`` its lines; ``supported(num)`` the
    verdict flag (None: descriptive); ``reference(rows, values)`` a reference curve for the
    summary panel; ``value_of(run, analysis)`` a run's swept value (default: its stored
    configuration's ``param``).
    """

    name: str
    param: str
    axis: str
    title: str
    claim: str
    criterion: str
    summary_keys: dict[str, str]
    summary_ylabel: str
    numbers: Callable[[Sweep, Rows, list], dict[str, Any]]
    verdict: Callable[[dict[str, Any], Rows, list], list[str]]
    supported: Callable[[dict[str, Any]], bool | None]
    reference: Callable[[Rows, list], Any] | None = None
    value_of: Callable[[Path, xr.Dataset], float] | None = None
    logx: bool = False
    logy: bool = False


def table(sweep: Sweep) -> Rows:
    """:func:`~trajlab.studies.numbers.run_summary` of every run, with its loss."""
    rows = []
    for path, ds in zip(sweep.runs, sweep.datasets):
        loss = loss_of(path)[: ds.sizes["step"]]
        rows.append(run_summary(ds, loss))
    return rows


def _sweep_figures(out: Path, name: str, sweep: Sweep, rows: Rows, vals: list, *, param: str,
                   summary_keys: dict[str, str], summary_ylabel: str, logx: bool = False,
                   logy: bool = False, reference: Any = None, bars: bool = True) -> list[str]:
    from trajlab.plot.sweeps import plot_drift_bars, plot_sweep

    figs = [save_figure(plot_sweep(
        list(sweep.datasets), sweep.labels, param=param, values=vals,
        summary={lab: column(rows, k) for k, lab in summary_keys.items()},
        summary_ylabel=summary_ylabel, logx=logx, logy=logy, reference=reference),
        out / f"{name}.png")]
    if bars:
        figs.append(save_figure(plot_drift_bars(
            sweep.labels, {"gradient flow ∫Σμ_flow/K dt": column(rows, "int_flow"),
                           "noise curvature ∫κ_Z dt": column(rows, "int_kappa"),
                           "Itô ∫−Σs²/2K² dt": column(rows, "int_ito")},
            measured=column(rows, "delta_Z"), param=param), out / f"{name}_drift.png"))
    return figs


def _config_value(param: str) -> Callable[[Path, xr.Dataset], float]:
    return lambda p, ds: float(run_config(p).get(param, math.nan))


def run_sweep(study: SweepStudy, out: str | Path, vals: list, *,
              config: TrainConfig | None, runs: Sequence[str | Path] | None, scheduler: Any,
              progress: bool, echo: bool) -> dict[str, Any]:
    """Run ``study`` over the swept values ``vals``; writes ``<name>.json``, ``<name>.png`` and
    ``<name>_drift.png`` into ``out`` and returns the JSON-clean result."""
    t0 = time.perf_counter()
    out = Path(out)
    sweep, vals = collect(out, param=study.param, values=vals, config=base_config(config),
                          runs=runs, scheduler=scheduler, progress=progress,
                          value_of=study.value_of or _config_value(study.param))
    rows = table(sweep)
    num = {study.param: vals, "per_run": rows, **study.numbers(sweep, rows, vals)}
    figs = _sweep_figures(out, study.name, sweep, rows, vals, param=study.axis,
                          summary_keys=study.summary_keys, summary_ylabel=study.summary_ylabel,
                          logx=study.logx, logy=study.logy,
                          reference=study.reference(rows, vals) if study.reference else None)
    return finish(out, study.name, {
        "study": study.name, "title": study.title, "claim": study.claim,
        "supported": study.supported(num), "numbers": num, "figures": figs,
        "verdict": study.verdict(num, rows, vals), "criterion": study.criterion,
    }, t0, echo=echo)


def sweep_entry(function: Callable[..., dict[str, Any]], *, name: str, summary: str,
                flag: str, keyword: str, kind: type, default: Sequence, quick: Sequence,
                usage: str = "") -> Study:
    """The registry entry of a sweep study: the shared options (600 steps) plus ``flag`` (the
    swept values, ``default``; ``quick`` under ``--quick``), run as
    ``function(out, config=..., keyword=values, runs=..., ...)``."""
    dest = flag.lstrip("-").replace("-", "_")

    def arguments(p: argparse.ArgumentParser) -> None:
        add_common_arguments(p, steps=600)
        p.add_argument(flag, type=kind, nargs="+", default=list(default),
                       help="swept values (default: %(default)s)")

    def run(a: argparse.Namespace) -> dict[str, Any]:
        swept = values(getattr(a, dest), quick, a.quick)
        return function(a.out, config=study_config(a), **{keyword: swept}, **study_kwargs(a))

    return Study(name=name, summary=summary, add_arguments=arguments, run=run, usage=usage)
