"""What every paper study shares: the base configuration, recording or finding and analysing
its runs (:func:`collect`), saving figures, and writing and printing the result
(:func:`finish`). Studies hold only their own numbers, figures and verdict text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from trajlab.recipes import TrainConfig
from trajlab.store import open_run
from trajlab.studies.sweep import (
    Sweep,
    analyse_runs,
    find_runs,
    record_sweep,
    run_config,
    write_json,
)
from trajlab.studies.sweep import (
    scheduler as sweep_scheduler,
)

__all__ = [
    "BASE",
    "base_config",
    "collect",
    "column",
    "finish",
    "fmt",
    "fmt_list",
    "loss_of",
    "save_figure",
    "yes",
]

#: Base configuration of every study: a float64 ReLU MLP 64-32-32-10 on the digits, plain SGD
#: with independent batches (the SDE's sampling assumption), all steps recorded.
#: probe_every=10: the forward predictions need the expected gradient (docs/math.md 8).
BASE = TrainConfig(model="mlp", hidden=32, steps=600, batch_size=32, lr=0.05, dtype="float64",
                   sampler="with_replacement", probe_every=10)


def base_config(config: TrainConfig | None) -> TrainConfig:
    """``config``, or :data:`BASE` when None."""
    return BASE if config is None else config


def save_figure(fig, path: Path) -> str:
    """Save ``fig`` as PNG at ``path``, close it, and return the file name."""
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def loss_of(run: Path) -> np.ndarray:
    """The recorded training loss of a run, float64."""
    return np.asarray(open_run(run).root.loss.values, dtype=np.float64)


def fmt(v: float) -> str:
    """A swept value as written in labels and verdicts."""
    return f"{v:g}"


def fmt_list(values: Sequence[float], spec: str = ".3g") -> str:
    """Comma-separated values, each formatted with ``spec``."""
    return ", ".join(f"{v:{spec}}" for v in values)


def column(rows: Sequence[dict[str, Any]], key: str) -> list:
    """One column of a sweep table (a list of per-run dicts)."""
    return [r[key] for r in rows]


def yes(b: bool) -> str:
    return "yes" if b else "no"


def collect(out: Path, *, param: str | None, values: Sequence[Any], config: TrainConfig,
            runs: Sequence[str | Path] | None, scheduler: Any, progress: bool,
            value_of: Callable[[Path, xr.Dataset], float] | None = None,
            make: Callable[[Any], TrainConfig] | None = None) -> tuple[Sweep, list]:
    """Record (or find) and analyse the runs of a study; returns the sweep sorted by value.

    Parameters
    ----------
    out : the study's folder (``runs/`` and ``analysis/`` go there).
    param : the swept TrainConfig field, or None for a study of one configuration.
    values : the swept values (ignored when ``runs`` is given).
    config : the base configuration.
    runs : existing run stores or folders of them: analysed instead of recording.
    value_of : reads a run's swept value (default: its stored configuration's ``param``).
    make : builds the configuration of one value (default: ``config.replace(param=value)``).
    """
    if runs:
        paths = find_runs(runs)
    else:
        if make is None:
            make = (lambda v: config) if param is None else (
                lambda v: config.replace(**{param: v}))
        configs = {(str(v) if param is None else f"{param}-{fmt(v)}"): make(v)
                   for v in values}
        paths = record_sweep(out, configs, progress=progress)
    with sweep_scheduler(scheduler) as where:
        sweep = analyse_runs(paths, out, scheduler=where, progress=progress)
    if param is None:
        return sweep, [None] * len(sweep)
    vals = []
    for p, ds in zip(sweep.runs, sweep.datasets):
        if value_of is not None:
            vals.append(value_of(p, ds))
        else:
            v = run_config(p).get(param)
            if v is None:
                raise ValueError(f"run {str(p)!r} has no stored {param!r} (recorded without "
                                 "trajlab.recipes); cannot place it in this sweep")
            vals.append(v)
    order = np.argsort(vals, kind="stable")
    sweep = Sweep(labels=tuple(f"{fmt(vals[i])}" for i in order),
                  runs=tuple(sweep.runs[i] for i in order),
                  datasets=tuple(sweep.datasets[i] for i in order))
    return sweep, [vals[i] for i in order]


def finish(out: Path, name: str, result: dict[str, Any], started: float, *,
           echo: bool) -> dict[str, Any]:
    """Add the runtime, write ``<out>/<name>.json``, print the verdict (``echo``), and return
    the JSON-clean result."""
    result["runtime_s"] = time.perf_counter() - started
    clean = write_json(out / f"{name}.json", result)
    if echo:
        print(f"== {name}: {result['title']}")
        print(f"   paper: {result['claim']}")
        for line in result["verdict"]:
            print(f"   ours:  {line}")
        print(f"   -> {out / (name + '.json')}, figures: {', '.join(result['figures'])} "
              f"({result['runtime_s']:.0f} s)")
    return clean
