"""``trajlab.analyze``: run stores in, the paper's dynamics out, as xarray Datasets.

The work is one Dask graph over every analysed run: (layer, step-chunk) nodes feed one chunk
node per step chunk, which computes the network terms and (with ``out=``) writes every variable
of that chunk into the run's analysis store, then its done-marker. A killed analysis resumes
with the unfinished chunks only; the series-wide integrals are computed at the end from the
stored per-step terms.
"""

from __future__ import annotations

import datetime as _dt
import glob as _glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from dask import delayed

from trajlab.analysis import engine
from trajlab.analysis.assemble import (
    INTEGRAL_INPUTS,
    build_dataset,
    dataset_attrs,
    integrals,
    store_specs,
)
from trajlab.analysis.plan import AnalysisOptions, Plan, make_plan
from trajlab.analysis.tasks import chunk_values, layer_chunk, network_chunk
from trajlab.errors import StoreError
from trajlab.store import Run, open_run
from trajlab.store.analysis_store import AnalysisStore
from trajlab.store.lock import StoreLock
from trajlab.store.metadata import AnalysisMeta
from trajlab.store.target import check_writable, inspect


@dataclass
class _Job:
    """One run's analysis inside a (possibly many-run) graph."""

    run: Run
    plan: Plan
    out: Any
    out_options: dict | None
    store: AnalysisStore | None = None
    pending: tuple[int, ...] = ()


# ----------------------------------------------------------------------------- graph nodes
def _layer_node(plan: Plan, li: int, rows: tuple[int, int]) -> dict[str, np.ndarray]:
    engine.single_threaded_in_workers()
    return layer_chunk(plan, li, rows)


def _chunk_node(plan: Plan, out, out_options, ci: int, layer_results) -> Any:
    rows = plan.chunks[ci]
    net = network_chunk(plan, rows, list(layer_results))
    vals = chunk_values(plan, rows, list(layer_results), net)
    if out is None:
        return ci, vals
    AnalysisStore.open(out, storage_options=out_options, mode="r+").write_chunk(
        ci, plan.relative(rows), vals)
    return ci, None


def _estimate_seconds(plans: Sequence[Plan]) -> float:
    """Rough single-core cost of the vectorised kernels (calibrated on a 2-core VM): a thin
    SVD and a few products per layer-step, plus a fixed cost per node."""
    total = 0.0
    for p in plans:
        for lm in p.layers:
            m, n = lm.shape
            r = min(m, n)
            per_row = 3e-9 * m * n * r + 4e-9 * p.sample_capacity * (m + n) * r + 2e-5
            total += p.n_rows * per_row
        total += len(p.chunks) * (len(p.layers) + 1) * 5e-3
    return total


# ----------------------------------------------------------------------------- public API
def analyze(
    run: Run | str | Sequence[Run | str],
    *,
    out: Any = None,
    layers: Sequence[str] | None = None,
    steps: slice | tuple[int, int] | None = None,
    scheduler: Any = "auto",
    workers: int | None = None,
    chunk_rows: int | None = None,
    gradient: str = "auto",
    population: int | str | None = "auto",
    gap_tol: float = 1e-3,
    conv_definition: str = "matrix",
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict | None = None,
    torch_threads: int = 1,
    on_schedule: Any = None,
) -> xr.Dataset | list[xr.Dataset]:
    """Compute the SDE terms of recorded runs (MATH.md §1–§5) as xarray Datasets.

    Parameters
    ----------
    run : Run or path/URL of a run store, or a sequence of them
        Many runs are analysed in one Dask graph (each resumable on its own); the result is
        then a list of Datasets in the same order (see :func:`open_analyses` to combine them).
    out : path/URL, or a sequence of them (one per run), optional
        Analysis store(s). Finished chunks are written as they complete; an unfinished analysis
        of the same run (same run id and rows) and options is resumed; a finished one is opened.
        Nothing that is not a trajlab analysis store is ever overwritten or written into.
    layers : layer names (default: every recorded layer). Network terms use these layers.
    steps : slice or (start, stop) of step indices, stop exclusive (default: all committed).
    scheduler : "auto" (default: in-process threads for small analyses, a LocalCluster when the
        estimated work pays for one), None (a LocalCluster), "threads", "processes",
        "synchronous", a scheduler address ("tcp://host:8786") or a ``distributed.Client``.
    workers : worker processes of the LocalCluster (threads of the "threads" scheduler).
    chunk_rows : recorded steps per graph node (default: chosen from the layer sizes).
    gradient : "auto" (full-data probe gradient where recorded, batch gradient elsewhere),
        "batch", or "probe" (same as auto; use it to state intent).
    population : finite-population correction N for sampling without replacement. "auto":
        the run's dataset size when its sampler is "reshuffle", else none.
    gap_tol : relative spectral gap below which a step is flagged ``degenerate``.
    conv_definition : "matrix" (default): convolution K and SDE terms use the reshaped kernel
        (MATH.md §6a), exact for the recorded sketch. "operator": additionally compute the exact
        operator norm of each convolution (``K_operator``, ``K_net_operator``; §6b).
    overwrite : replace an existing analysis store (never anything else).
    progress : progress bar on the terminal.
    storage_options : fsspec options for ``out``.
    torch_threads : torch intra-op threads per graph node (default 1: Dask parallelises).
    on_schedule : called with a description of where the graph runs, once it is chosen (the
        CLI prints it).

    Returns
    -------
    xr.Dataset (or a list of them for a sequence of runs)
        dims (step, layer[, sample]); coords step, time, layer; per-layer and network variables
        with their meanings in ``attrs["description"]``; lazily loaded from ``out`` when given.

    Examples
    --------
    >>> ds = trajlab.analyze("run.zarr", out="analysis.zarr")  # doctest: +SKIP
    >>> ds.K.sel(layer="fc1").plot()  # doctest: +SKIP
    """
    many = isinstance(run, (list, tuple))
    runs = [open_run(r) for r in (run if many else [run])]
    if many and not runs:
        raise ValueError("analyze([]) got no runs")
    if out is None:
        outs: list[Any] = [None] * len(runs)
    elif many:
        if not isinstance(out, (list, tuple)) or len(out) != len(runs):
            raise ValueError("with several runs, out= must be a list with one analysis store "
                             "per run (or None)")
        outs = list(out)
    else:
        outs = [out]
    if any(o is not None for o in outs):
        keys = [os.path.realpath(os.fspath(o)) if isinstance(o, (str, os.PathLike)) else id(o)
                for o in outs if o is not None]
        if len(set(keys)) != len(keys):
            raise ValueError("two runs were given the same analysis store in out=")
    jobs = []
    for r, o in zip(runs, outs):
        pop = population
        if pop == "auto":
            pop = r.meta.dataset_size if r.meta.sampler == "reshuffle" else None
        opts = AnalysisOptions(gradient=gradient, population=pop, gap_tol=gap_tol,
                               conv_definition=conv_definition)
        jobs.append(_Job(r, make_plan(r, layers, steps, chunk_rows, opts), o, storage_options))
    if not (isinstance(torch_threads, int) and torch_threads >= 1):
        raise ValueError(f"torch_threads must be an integer >= 1, got {torch_threads!r}")
    locks = [StoreLock(j.out, what="analysis") for j in jobs if j.out is not None]
    try:
        for lock in locks:
            lock.acquire()
        for j in jobs:
            if j.out is not None:
                j.store = _prepare_store(j, overwrite)
                j.pending = tuple(np.flatnonzero(~j.store.done()).tolist())
            else:
                j.pending = tuple(range(len(j.plan.chunks)))
        results = _compute(jobs, scheduler, workers, progress, torch_threads, on_schedule)
        datasets = [_finish(j, results.get(i, {})) for i, j in enumerate(jobs)]
    finally:
        for lock in locks:
            lock.release()
    return datasets if many else datasets[0]


def _compute(jobs: list[_Job], scheduler, workers, progress, torch_threads,
             on_schedule=None) -> dict:
    """Run the graph of every pending chunk of every job; in-memory results by job."""
    todo = [(i, j) for i, j in enumerate(jobs)
            if j.pending and not (j.store is not None and j.store.meta.complete)]
    if not todo:
        return {}
    if scheduler == "auto":
        scheduler = engine.choose_scheduler(_estimate_seconds([j.plan for _, j in todo]))
    if on_schedule is not None:
        on_schedule(engine.describe(scheduler, workers))
    nodes, owners = [], []
    for i, j in todo:
        p = j.plan
        for ci in j.pending:
            rows = p.chunks[ci]
            lnodes = [delayed(_layer_node, pure=False)(p, li, rows) for li in range(len(p.layers))]
            nodes.append(delayed(_chunk_node, pure=False)(p, j.out, j.out_options, ci, lnodes))
            owners.append(i)
    with engine.scheduler_context(scheduler, workers=workers,
                                  torch_threads=torch_threads) as where:
        outs = engine.run_graph(nodes, where, progress=progress, desc="analysing")
    results: dict[int, dict] = {}
    for i, (ci, vals) in zip(owners, outs):
        if vals is not None:
            results.setdefault(i, {})[ci] = vals
    return results


def _prepare_store(job: _Job, overwrite: bool) -> AnalysisStore:
    """Create, resume or reuse the job's analysis store; refuse what must not be touched."""
    plan, out = job.plan, job.out
    target = inspect(out, storage_options=job.out_options)
    check_writable(target, "analysis", overwrite=True, resume=True)  # never non-analysis data
    if target.state == "analysis":
        try:
            store = AnalysisStore.open(out, storage_options=job.out_options, mode="r+")
        except StoreError:
            if not overwrite:
                raise
        else:
            if store.meta.state == "layout":
                return _create(job, target)  # killed while being laid out: ours, no data
            if store.meta.signature() == plan.meta(created="", version="").signature():
                return store  # resume, or reuse a finished analysis
            if not overwrite:
                raise StoreError(_mismatch(out, store.meta, plan))
    return _create(job, target)


def _mismatch(out, old: AnalysisMeta, plan: Plan) -> str:
    if old.run_id != plan.run_id:
        why = (f"it was computed from a different recording (run id {old.run_id}) than the run "
               f"now at {plan.store!r} (run id {plan.run_id}): the run was re-recorded since")
    elif old.rows != plan.rows:
        why = (f"it covers rows {old.rows[0]}..{old.rows[1]} (steps {old.steps[0]}.."
               f"{old.steps[1]}), the request rows {plan.rows[0]}..{plan.rows[1]} (steps "
               f"{plan.steps[0]}..{plan.steps[1]}); the run may have grown since")
    else:
        why = "it was computed with other layers or options"
    return (f"{out!r} holds an analysis that does not match this request: {why}. Pass "
            "overwrite=True (--overwrite) to recompute it, or choose another path")


def _create(job: _Job, target) -> AnalysisStore:
    from trajlab import __version__

    plan, run = job.plan, job.run
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta = plan.meta(created=created, version=__version__)
    import dataclasses

    meta = dataclasses.replace(meta, run_info=_run_info(run))
    specs = {"step": (("step",), "int64", "optimizer-step index"),
             **store_specs(plan.options.operator)}
    sizes = {"step": plan.n_rows, "layer": len(plan.layers), "sample": plan.sample_capacity}
    store = AnalysisStore.create(target, meta, specs, sizes, len(plan.chunks))
    store.write_all({"step": run.steps[plan.rows[0]:plan.rows[1]]})
    return store


def _run_info(run: Run) -> dict[str, Any]:
    m = run.meta
    info: dict[str, Any] = {"sampler": m.sampler, "every": m.every,
                            "dataset_size": m.dataset_size, "created": m.created}
    for k, v in (m.user or {}).items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            info.setdefault(k, v)
    return info


def _finish(job: _Job, chunk_results: dict[int, dict]) -> xr.Dataset:
    plan, run = job.plan, job.run
    if job.store is None:
        T = plan.n_rows
        vals: dict[str, np.ndarray] = {}
        for ci, cv in sorted(chunk_results.items()):
            sl = plan.relative(plan.chunks[ci])
            for k, v in cv.items():
                if k not in vals:
                    vals[k] = np.empty((T, *v.shape[1:]), dtype=v.dtype)
                vals[k][sl] = v
        vals.update(integrals(vals, every=plan.every))
        meta = plan.meta(created="", version="").to_dict()
        return build_dataset(vals, steps=run.steps[plan.rows[0]:plan.rows[1]],
                             layers=plan.names, attrs=dataset_attrs(run, meta))
    store = job.store
    if not store.meta.complete:
        store.write_all(integrals(store.read(list(INTEGRAL_INPUTS)), every=plan.every))
        store.mark_complete()
    return open_analysis(job.out, storage_options=job.out_options, run=run)


def open_analysis(store: Any, *, storage_options: dict | None = None, run: Run | None = None
                  ) -> xr.Dataset:
    """Open an analysis store written by :func:`analyze` lazily (Dask-backed).

    Parameters
    ----------
    store : path/URL of the analysis store.
    storage_options : fsspec options for ``store`` (also tried for the run store).
    run : the analysed Run, if already open (its attributes describe the result).

    Raises
    ------
    FileNotFoundError : nothing at ``store``.
    trajlab.StoreError : not an analysis store, an unfinished one (rerun ``analyze`` with the
        same arguments to resume it) or one written by an older trajlab (recompute it).
    """
    st = AnalysisStore.open(store, storage_options=storage_options)
    if not st.meta.complete:
        raise StoreError(
            f"the analysis in {store!r} is unfinished (interrupted); rerun trajlab.analyze with "
            "the same arguments to resume it"
        )
    ds = st.dataset(storage_options=storage_options)
    ds = ds.set_coords([c for c in ("step", "time") if c in ds])
    ds = ds.assign_coords(layer=list(st.meta.layers))
    if run is None:
        try:
            run = open_run(st.meta.run, storage_options=storage_options)
            if run.meta.identity != st.meta.run_id:
                run = None  # the run was re-recorded since: describe from the analysis only
        except Exception:  # noqa: BLE001 - the run may have moved; the results stand alone
            run = None
    ds.attrs.update(dataset_attrs(run, st.meta.to_dict()))
    if run is None:
        ds.attrs.update({k: v for k, v in st.meta.run_info.items()
                         if k in ("every", "sampler")})
    return ds


def open_analyses(paths: str | Sequence[Any], *, storage_options: dict | None = None,
                  dim: str = "run") -> xr.Dataset:
    """Open many analysis stores as one Dataset with a ``run`` dimension.

    Parameters
    ----------
    paths : a glob pattern (``"sweep/*.analysis.zarr"``) or a sequence of stores.
    dim : name of the new dimension.

    Returns
    -------
    xr.Dataset
        Each analysis along ``run`` (labelled by its path), with coordinates on ``run`` from
        each run's metadata (sampler, every, dataset size and every scalar of the recorder's
        ``metadata=``, e.g. lr, batch_size, seeds, optimizer), ready for ``groupby``. Runs with
        different layers or lengths are aligned on ``layer`` and ``step`` with NaN where a run
        has no value (outer join).

    Examples
    --------
    >>> ds = trajlab.open_analyses("sweep/*.analysis.zarr")  # doctest: +SKIP
    >>> ds.logK_diffusion2.mean("step").groupby("batch_size").mean()  # doctest: +SKIP
    """
    if isinstance(paths, (str, os.PathLike)):
        found = sorted(_glob.glob(os.fspath(paths)))
        if not found:
            raise FileNotFoundError(f"no analysis store matches {os.fspath(paths)!r}")
        paths = found
    paths = list(paths)
    if not paths:
        raise ValueError("open_analyses got no stores")
    parts, infos = [], []
    for p in paths:
        st = AnalysisStore.open(p, storage_options=storage_options)
        ds = open_analysis(p, storage_options=storage_options)
        parts.append(ds.drop_vars("time"))
        infos.append({**st.meta.run_info, "run_id": st.meta.run_id})
    keys = sorted({k for i in infos for k in i})
    combined = xr.concat(parts, dim=dim, join="outer", combine_attrs="drop_conflicts",
                         coords="minimal", compat="override")
    combined = combined.assign_coords({dim: [str(p) for p in paths]})
    for k in keys:
        vals = [i.get(k) for i in infos]
        if all(v is None or isinstance(v, (int, float, str, bool)) for v in vals):
            arr = np.array([np.nan if v is None and any(isinstance(x, (int, float)) and not
                                                       isinstance(x, bool) for x in vals)
                            else v for v in vals], dtype=object)
            try:
                arr = arr.astype(float) if all(isinstance(v, (int, float)) and not
                                               isinstance(v, bool) or v is None
                                               for v in vals) else arr.astype(str)
            except (TypeError, ValueError):
                arr = arr.astype(str)
            combined = combined.assign_coords({k: (dim, arr)})
    return combined


def simulate_paths(ds: xr.Dataset, *, n_paths: int = 200, seed: int = 0) -> xr.DataArray:
    """Euler–Maruyama paths of the network SDE dZ = mu dt + sigma_Z dB with the recorded
    coefficients (MATH.md §4), for distribution plots. The drift is the one of
    ``logK_pred_mean`` (the optimizer that was used).

    Parameters
    ----------
    ds : an analysis Dataset (``trajlab.analyze`` / ``open_analysis``).
    n_paths : number of paths.  seed : seed of the paths' own generator (no global RNG).

    Returns
    -------
    xr.DataArray (path, step) of K_net = exp(Z) at the start of each recorded step.
    """
    import torch

    from trajlab.sde import euler_maruyama

    mu = np.nan_to_num(np.asarray(ds["logK_drift"].values, dtype=np.float64))
    mu = mu + np.nan_to_num(np.asarray(ds["logK_drift_optimizer"].values, dtype=np.float64))
    s2 = np.nan_to_num(np.asarray(ds["logK_diffusion2"].values, dtype=np.float64))
    dt = np.asarray(ds["net_dt"].values, dtype=np.float64)
    z0 = float(ds["logK"].values[0])
    paths = euler_maruyama(z0, torch.from_numpy(mu[:-1]), torch.from_numpy(s2[:-1]),
                           torch.from_numpy(dt[:-1]), n_paths=n_paths, seed=seed)
    return xr.DataArray(np.exp(paths.numpy()), dims=("path", "step"),
                        coords={"step": ds["step"].values},
                        attrs={"description": "K_net along Euler-Maruyama paths of the SDE"})
