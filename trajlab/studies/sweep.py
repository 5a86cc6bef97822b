"""Sweeps of recorded runs: record a list of configurations, analyse them, reuse what exists.

The studies of :mod:`trajlab.studies` are all "record some runs, analyse each, compare".
This module owns the I/O of that: :func:`record_sweep` records one run store per
:class:`~trajlab.recipes.TrainConfig` (skipping stores that already hold the same
configuration), :func:`find_runs` turns user-given paths (run stores or folders of them) into a
list of run stores, and :func:`analyse_runs` analyses them all into ``<out>/analysis/`` with one
:func:`trajlab.analyze` call (one Dask graph; a finished analysis of the same run is opened, not
recomputed). :func:`run_config` reads back the
configuration a run was recorded with, so a sweep parameter can be read from foreign stores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from trajlab.analysis import analyze
from trajlab.analysis.engine import scheduler_context
from trajlab.recipes import TrainConfig, record_digits
from trajlab.store import StoreError, open_run

__all__ = [
    "Sweep",
    "analyse_runs",
    "find_runs",
    "jsonable",
    "record_sweep",
    "run_config",
    "scheduler",
    "write_json",
]


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Analysed runs of one study, in sweep order.

    Attributes
    ----------
    labels : one short label per run (legend entries).
    runs : run-store paths.
    datasets : their analyses (xarray Datasets, lazily backed by ``<out>/analysis/*.zarr``).
    """

    labels: tuple[str, ...]
    runs: tuple[Path, ...]
    datasets: tuple[xr.Dataset, ...]

    def __len__(self) -> int:
        return len(self.runs)


# ----------------------------------------------------------------------------- run stores
def _is_run_store(path: Path) -> bool:
    try:
        open_run(path)
    except (StoreError, FileNotFoundError, KeyError, ValueError, OSError):
        return False
    return True


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run stores named by ``paths``: each is a run store, or a folder whose children are.

    Raises
    ------
    FileNotFoundError : a path is neither a run store nor a folder holding one.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if _is_run_store(p):
            found.append(p)
            continue
        children = sorted(c for c in p.iterdir() if c.is_dir() and _is_run_store(c)) \
            if p.is_dir() else []
        if not children:
            raise FileNotFoundError(f"{str(p)!r} is not a trajlab run store nor a folder of them")
        found.extend(children)
    return found


def run_config(run: str | Path) -> dict[str, Any]:
    """The training configuration stored with a run (``metadata["config"]`` of the recipes),
    or ``{}`` for runs recorded without one."""
    return dict(open_run(run).meta.user.get("config", {}))


def _same_config(store: Path, cfg: TrainConfig) -> bool:
    try:
        stored = run_config(store)
        complete = open_run(store).n_steps == cfg.steps // cfg.every
    except (StoreError, FileNotFoundError, KeyError, ValueError, OSError):
        return False
    wanted = json.loads(json.dumps(dataclasses.asdict(cfg)))
    return complete and stored == wanted


def record_sweep(out: str | Path, configs: Mapping[str, TrainConfig], *,
                 progress: bool = False) -> list[Path]:
    """Record one digits run per configuration into ``<out>/runs/<name>.zarr``.

    A store that already holds the same configuration (all of its steps) is kept; any other
    store at that path is replaced, together with its stale analysis.
    """
    root = Path(out) / "runs"
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, cfg in configs.items():
        path = root / f"{name}.zarr"
        if not _same_config(path, cfg):
            shutil.rmtree(_analysis_path(Path(out), path), ignore_errors=True)
            record_digits(path, cfg, overwrite=True, progress=progress)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- analyses
def _analysis_path(out: Path, run: Path, options: Mapping[str, Any] | None = None) -> Path:
    """``<out>/analysis/<folder>-<run>[-<option>-<value>...].zarr``: one store per run and
    analysis options."""
    tag = "".join(f"-{k}-{v}" for k, v in sorted((options or {}).items()))
    return out / "analysis" / f"{run.parent.name}-{run.stem}{tag}{run.suffix}"


@contextlib.contextmanager
def scheduler(name: Any = "threads") -> Iterator[Any]:
    """The Dask scheduler for a sweep's analyses: a local scheduler name, an address, a
    ``distributed.Client``, or "cluster" (one LocalCluster shared by every analysis)."""
    with scheduler_context(None if name == "cluster" else name) as where:
        yield where


def analyse_runs(runs: Sequence[Path], out: str | Path, *, labels: Sequence[str] | None = None,
                 scheduler: Any = "threads", progress: bool = False, **options: Any) -> Sweep:
    """Analyse every run into ``<out>/analysis/``, all in one :func:`trajlab.analyze` graph.

    A finished analysis of the same run and options is opened, an interrupted one resumed; an
    analysis with other settings (e.g. of an older recording of that path) is redone.
    ``scheduler`` is passed to :func:`trajlab.analyze` (a ``distributed.Client`` or an address
    runs the whole sweep on that cluster); ``options`` too (``gradient=``, ...).
    """
    out = Path(out)
    (out / "analysis").mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in runs]
    targets = [_analysis_path(out, r, options) for r in runs]
    kw = dict(out=targets, scheduler=scheduler, progress=progress, **options)
    try:
        datasets = analyze(runs, **kw)
    except StoreError:  # some analysis has other settings: redo those (the rest are reused)
        datasets = analyze(runs, overwrite=True, **kw)
    labels = tuple(labels) if labels is not None else tuple(r.stem for r in runs)
    return Sweep(labels=labels, runs=tuple(runs), datasets=tuple(datasets))


# ----------------------------------------------------------------------------- JSON
def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars and arrays as Python numbers and lists, non-finite numbers as
    None, tuples as lists and paths as strings (dict keys as strings)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | Path, result: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``result`` as JSON (numpy scalars converted, non-finite numbers as null)."""
    clean = jsonable(dict(result))
    Path(path).write_text(json.dumps(clean, indent=2) + "\n")
    return clean
