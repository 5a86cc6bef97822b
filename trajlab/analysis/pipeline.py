"""``trajlab.analyze``: run stores in, the paper's dynamics out, as xarray Datasets.

The work is one Dask graph over every analysed run: (layer, step-chunk) nodes feed one chunk
node per step chunk, which computes the network terms and (with ``out=``) writes every variable
of that chunk into the run's analysis store, then its done-marker. A killed analysis resumes
with the unfinished chunks only. With ``out=``, laying out a new store and the series-wide
integrals (computed from the stored per-step terms once every chunk is written) are graph nodes
of their run too, so that the per-run work of a sweep is spread over the workers; the caller
only plans, checks the targets under their locks, and opens the results.
"""

from __future__ import annotations

import datetime as _dt
import glob as _glob
import os
import sys
import warnings
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
from trajlab.analysis.tasks import chunk_values, layer_chunk, network_chunk, plan_run
from trajlab.analysis.variables import VARIABLES
from trajlab.errors import StoreCorruptError, StoreError
from trajlab.store import Run, open_run
from trajlab.store.analysis_store import AnalysisStore
from trajlab.store.lock import StoreLock
from trajlab.store.metadata import AnalysisMeta
from trajlab.store.names import CHUNKS_ARRAY
from trajlab.store.target import check_writable, inspect, show

#: Variables written whole once every step chunk is done (the series-wide integrals).
INTEGRATED = frozenset(k for k, v in VARIABLES.items() if v.stage == "integrated")


@dataclass
class _Job:
    """One run's analysis inside a (possibly many-run) graph."""

    run: Run
    plan: Plan
    out: Any
    out_options: dict | None
    store: AnalysisStore | None = None  # an existing store to resume or reuse
    pending: tuple[int, ...] = ()
    create: bool = False  # lay out a new store (in the graph)

    @property
    def complete(self) -> bool:
        return self.store is not None and self.store.meta.complete


# ----------------------------------------------------------------------------- graph nodes
# Per run: [create] -> layer nodes (layer, chunk) -> chunk nodes -> [finish]; the bracketed
# ones only with an analysis store. Store layout and the series-wide integrals run in the graph
# too, so that a sweep's per-run work is spread over the workers.
def _create_node(plan: Plan, out, out_options, run_info: dict[str, Any]) -> None:
    """Lay out a new analysis store for ``plan`` at ``out`` (replacing an analysis store only:
    the caller has checked the target under its lock)."""
    _create(plan, run_info, inspect(out, storage_options=out_options))


def _layer_node(plan: Plan, li: int, rows: tuple[int, int], threads: int, home_pid: int,
                created: None = None) -> dict[str, np.ndarray]:
    engine.node_threads(threads, home_pid)
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


def _finish_node(plan: Plan, out, out_options, chunk_results) -> tuple[None, None]:
    """Once every chunk of the run is written: the series-wide integrals, then ``complete``."""
    store = AnalysisStore.open(out, storage_options=out_options, mode="r+")
    if not store.meta.complete:
        store.write_all(integrals(store.read(list(INTEGRAL_INPUTS)), every=plan.every))
        store.mark_complete()
    return None, None


def _estimate_seconds(plans: Sequence[Plan]) -> float:
    """Single-core seconds of the analysis graph, from costs measured on a 2-core VM
    (benchmarks/analysis.py): per layer-step, the resolvent kernel's dense linear algebra on
    the smaller side r of an (m, n) layer (~2.5e-10 s * r^2 max(m, n)), its passes over the
    (m, n) arrays and the reads (~5e-8 s * m n), its per-sample work (~3e-8 s * B (m + n));
    per node, ~15 ms of reads and kernel calls (layer nodes) and ~20 ms (chunk nodes:
    network terms and writes)."""
    total = 0.0
    for p in plans:
        for lm in p.layers:
            m, n = lm.shape
            per_row = (2.5e-10 * min(m, n) ** 2 * max(m, n) + 5e-8 * m * n
                       + 3e-8 * p.sample_capacity * (m + n) + 2e-5)
            total += p.n_rows * per_row
        total += len(p.chunks) * (0.015 * len(p.layers) + 0.02)
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
    optimizer: str | None = None,
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
    scheduler : "auto" (default: in-process threads, unless a LocalCluster is predicted to
        finish first, its start-up included: :func:`trajlab.analysis.engine.choose_scheduler`),
        None (a LocalCluster), "threads", "processes",
        "synchronous", a scheduler address ("tcp://host:8786") or a ``distributed.Client``.
    workers : worker processes of the LocalCluster (threads of the "threads" scheduler).
    chunk_rows : recorded steps per graph node (default: one stored chunk of the run, or an
        even part of one for large layers; see the benchmarks README).
    gradient : "auto" (full-data probe gradient where recorded, batch gradient elsewhere),
        "batch", or "probe" (same as auto; use it to state intent).
    population : finite-population correction N for sampling without replacement. "auto":
        the run's dataset size when its sampler is "reshuffle", else none.
    gap_tol : relative spectral gap below which a step is flagged ``degenerate``.
    conv_definition : "matrix" (default): convolution K and SDE terms use the reshaped kernel
        (MATH.md §6a), exact for the recorded sketch. "operator": additionally compute the exact
        operator norm of each convolution (``K_operator``, ``K_net_operator``; §6b).
    optimizer : the optimizer whose SDE the default prediction integrates ("sgd", "momentum",
        "nesterov", "adam", "adamw"; see :class:`trajlab.analysis.AnalysisOptions`); None
        (default): the one the run recorded.
    overwrite : replace an existing analysis store (never anything else).
    progress : progress bar on the terminal.
    storage_options : fsspec options for ``out`` and for the runs given as URLs
        (``"s3://bucket/run.zarr"``; a :class:`Run` keeps the options it was opened with).
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
    runs = [_open_run(r, storage_options) for r in (run if many else [run])]
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
                               conv_definition=conv_definition, optimizer=optimizer)
        jobs.append(_Job(r, make_plan(r, layers, steps, chunk_rows, opts), o, storage_options))
        if StoreLock(r.store, what="recorder").live_writer():
            warnings.warn(f"trajlab: {show(r.store)} is still being recorded (a live recorder "
                          f"holds its lock): analysing its {r.n_steps} committed steps; analyse "
                          "again once the recording ends for the rest", UserWarning, stacklevel=2)
    if not (isinstance(torch_threads, int) and torch_threads >= 1):
        raise ValueError(f"torch_threads must be an integer >= 1, got {torch_threads!r}")
    locks = [StoreLock(j.out, what="analysis") for j in jobs if j.out is not None]
    try:
        for lock in locks:
            lock.acquire()
        for j in jobs:
            j.pending = tuple(range(len(j.plan.chunks)))
            if j.out is not None:
                j.store = _prepare_store(j, overwrite)
                j.create = j.store is None
                if j.store is not None:
                    pending = _pending(j, overwrite)
                    if pending is None:  # damaged beyond resuming, and overwrite=True
                        j.store, j.create = None, True
                    else:
                        j.pending = pending
                    if progress and j.pending and not j.store.meta.complete:
                        print(f"resuming {j.out}: {len(j.pending)} of {len(j.plan.chunks)} "
                              "chunks left", file=sys.stderr)
        opened: dict[int, xr.Dataset] = {}
        results = _compute(jobs, scheduler, workers, progress, torch_threads, on_schedule,
                           opened)
        datasets = [opened[i] if i in opened else _finish(j, results.get(i, {}))
                    for i, j in enumerate(jobs)]
    finally:
        for lock in locks:
            lock.release()
    return datasets if many else datasets[0]


def _open_run(run: Run | Any, storage_options: dict | None) -> Run:
    """``open_run``, with ``storage_options`` for a URL (never for a local path, which takes
    none)."""
    from trajlab.store.target import local_path

    url = isinstance(run, (str, os.PathLike)) and local_path(run) is None
    if not url or storage_options is None:
        return open_run(run)
    return open_run(run, storage_options=storage_options)


def _compute(jobs: list[_Job], scheduler, workers, progress, torch_threads,
             on_schedule=None, opened: dict | None = None) -> dict:
    """Run the graph of every unfinished job; in-memory results by job. A job with a store is
    opened into ``opened`` as soon as its finish node completes (on a cluster, while the
    workers go on with the other runs)."""
    todo = [(i, j) for i, j in enumerate(jobs) if not j.complete]
    if not todo:
        return {}
    if scheduler == "auto":
        scheduler = engine.choose_scheduler(_estimate_seconds([j.plan for _, j in todo]),
                                            workers)
    if on_schedule is not None:
        on_schedule(engine.describe(scheduler, workers))
    nodes, owners, finishers = [], [], {}
    home = os.getpid()
    for i, j in todo:
        p = j.plan
        created = None
        if j.create:
            created = delayed(_create_node, pure=False)(p, j.out, j.out_options,
                                                        _run_info(j.run))
        chunk_nodes = []
        for ci in j.pending:
            rows = p.chunks[ci]
            lnodes = [delayed(_layer_node, pure=False)(p, li, rows, torch_threads, home,
                                                       created)
                      for li in range(len(p.layers))]
            chunk_nodes.append(delayed(_chunk_node, pure=False)(p, j.out, j.out_options, ci,
                                                                lnodes))
        if j.out is not None:
            finishers[len(nodes) + len(chunk_nodes)] = i
            chunk_nodes.append(delayed(_finish_node, pure=False)(p, j.out, j.out_options,
                                                                 chunk_nodes))
        nodes += chunk_nodes
        owners += [i] * len(chunk_nodes)
    with _workers_exit_with_us(scheduler), engine.scheduler_context(
            scheduler, workers=workers, torch_threads=torch_threads) as where:
        def on_result(k: int, _) -> None:
            if k in finishers and opened is not None:
                j = jobs[finishers[k]]
                opened[finishers[k]] = open_analysis(j.out, storage_options=j.out_options,
                                                     run=j.run)

        outs = engine.run_graph(nodes, where, progress=progress, desc="analysing",
                                on_result=on_result)
    results: dict[int, dict] = {}
    for i, (ci, vals) in zip(owners, outs):
        if vals is not None:
            results.setdefault(i, {})[ci] = vals
    return results


def _workers_exit_with_us(scheduler: Any):
    """For Dask's "processes" scheduler: each worker process exits as soon as this process is
    gone (killed, even with SIGKILL). Its workers hold both ends of the pool's task queue, so
    on their own they would wait for the next task forever. Any initializer the user set in
    ``dask.config`` ("multiprocessing.initializer") still runs."""
    import contextlib
    import functools

    import dask

    if scheduler != "processes":
        return contextlib.nullcontext()
    user = dask.config.get("multiprocessing.initializer", None)
    return dask.config.set({"multiprocessing.initializer": functools.partial(
        exit_with_parent, os.getpid(), user)})


def exit_with_parent(parent: int, then: Any = None) -> None:
    """Initializer of a worker process: exit when process ``parent`` is gone.

    On Linux the kernel kills the worker when its parent dies (``PR_SET_PDEATHSIG``); on every
    platform a daemon thread also checks the parent twice a second. ``then``: a further
    initializer to run."""
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
        except Exception:  # noqa: BLE001 - the watch below remains
            pass
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the request above took effect

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="trajlab-parent-watch", daemon=True).start()
    if then is not None:
        then()


def _prepare_store(job: _Job, overwrite: bool) -> AnalysisStore | None:
    """The job's analysis store to resume or reuse, or None when a new one is to be laid out
    (by the graph); refuses what must not be touched."""
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
                return None  # killed while being laid out: ours, no data
            if store.meta.signature() == plan.meta(created="", version="").signature():
                return store  # resume, or reuse a finished analysis
            if not overwrite:
                raise StoreError(_mismatch(out, store.meta, plan))
    return None


def _pending(job: _Job, overwrite: bool) -> tuple[int, ...] | None:
    """The step chunks of an existing store still to compute: those not done, and those that
    :meth:`AnalysisStore.verify` finds missing or damaged (a warning names them). A finished
    store with damage goes back to unfinished first (its integrals are then recomputed too);
    a damaged ``step`` coordinate is rewritten from the run, and so is ``step`` when a chunk
    manifest row is bad (its step chunk is recomputed too, which rebinds every chunk of it).
    An array whose metadata is gone cannot be resumed: None with ``overwrite`` (lay out a new
    store), else an error that says to recompute with overwrite."""
    store = job.store
    assert store is not None
    problems = store.verify(integrals=INTEGRATED)
    lost = [p for p in problems if p.chunk is None]
    if lost and overwrite:
        return None
    if lost:
        more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
        raise StoreCorruptError(
            f"the analysis store {show(job.out)} is damaged beyond resuming: {lost[0].message}"
            f"{more}; recompute it with overwrite=True (`trajlab analyze RUN --out "
            f"{job.out} --overwrite`)")
    done = store.done()
    if problems:
        shown = "; ".join(p.message for p in problems[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        warnings.warn(f"trajlab: the analysis store {show(job.out)} has {len(problems)} missing "
                      f"or damaged chunk(s); recomputing them: {shown}{more}", UserWarning,
                      stacklevel=3)
        store.mark_unfinished()
        for p in problems:  # (a bad manifest row: every array of its step chunk, step too)
            if p.array not in ("step", *INTEGRATED) and p.chunk is not None \
                    and p.chunk < done.size:
                done[p.chunk] = False
        if any(p.array in ("step", CHUNKS_ARRAY) for p in problems):
            store.write_all({"step": job.run.root_rows(["step"], job.plan.rows)["step"]})
    return tuple(np.flatnonzero(~done).tolist())


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
    return (f"{show(out)} holds an analysis that does not match this request: {why}. Pass "
            "overwrite=True (--overwrite) to recompute it, or choose another path")


def _create(plan: Plan, run_info: dict[str, Any], target) -> AnalysisStore:
    import dataclasses

    from trajlab._version import __version__

    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta = dataclasses.replace(plan.meta(created=created, version=__version__),
                               run_info=run_info)
    specs = {"step": (("step",), "int64", "optimizer-step index"),
             **store_specs(plan.options.operator)}
    sizes = {"step": plan.n_rows, "layer": len(plan.layers), "sample": plan.sample_capacity}
    store = AnalysisStore.create(target, meta, specs, sizes, len(plan.chunks))
    # read with zarr, not through the run's Dask-backed view: this runs inside a graph node,
    # where a nested compute would wait for the worker it runs on
    store.write_all({"step": plan_run(plan).root_rows(["step"], plan.rows)["step"]})
    return store


def _run_info(run: Run) -> dict[str, Any]:
    """What the run's metadata says about it: the coordinates of :func:`open_analyses`.

    Scalars of the recorder's ``metadata=``, and those of a dict in it (the ``config`` of
    :mod:`trajlab.recipes`: lr, batch_size, seeds, optimizer, ...), flattened one level; a
    top-level key wins over a nested one of the same name.
    """
    m = run.meta
    info: dict[str, Any] = {"sampler": m.sampler, "every": m.every,
                            "dataset_size": m.dataset_size, "created": m.created}
    user = m.user or {}

    def scalar(v: Any) -> bool:
        return isinstance(v, (str, int, float, bool)) or v is None

    for k, v in user.items():
        if scalar(v):
            info.setdefault(k, v)
    for v in user.values():
        if isinstance(v, dict):
            for k, x in v.items():
                if scalar(x):
                    info.setdefault(k, x)
    return info


def _finish(job: _Job, chunk_results: dict[int, dict]) -> xr.Dataset:
    plan, run = job.plan, job.run
    if job.out is None:
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
        return build_dataset(vals, steps=run.root_rows(["step"], plan.rows)["step"],
                             layers=plan.names, attrs=dataset_attrs(run, meta))
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
    # the small coordinates are read now, with zarr: building the step index from their lazy
    # arrays would run a Dask compute (on a distributed client: a round trip per store)
    coords = st.read([c for c in ("step", "time") if c in ds])
    ds = ds.assign_coords({"step": coords["step"], "layer": list(st.meta.layers)})
    if "time" in coords:
        ds = ds.assign_coords(time=("step", coords["time"]))
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
    from trajlab.analysis.assemble import annotate

    return annotate(ds)  # each prediction, SDE term and reconstruction names its theory


def open_analyses(paths: str | Sequence[Any], *, storage_options: dict | None = None,
                  dim: str = "run") -> xr.Dataset:
    """Open many analysis stores as one Dataset with a ``run`` dimension (lazily).

    Parameters
    ----------
    paths : a glob pattern (``"sweep/*.analysis.zarr"``) or a sequence of stores.
    storage_options : fsspec options for the stores.
    dim : name of the new dimension.

    Returns
    -------
    xr.Dataset
        Each analysis along ``run`` (labelled by its path, in the order given; a glob is
        sorted), with coordinates on ``run`` from each run's metadata: ``sampler``, ``every``,
        ``dataset_size``, ``run_id`` and every scalar of the recorder's ``metadata=`` (e.g. lr,
        batch_size, seeds, optimizer), including the fields of a :class:`trajlab.recipes.
        TrainConfig` stored there as ``metadata={"config": ...}`` (``lr``, ``batch_size``,
        ``sampling_seed``, ``optimizer``, ...), ready for ``groupby``. A key that is also the
        name of an analysis variable gets the prefix ``run_`` (``run_lr``, ``run_batch_size``:
        the per-step ``lr`` and ``batch_size`` variables stay as they are). A key that some runs
        lack is NaN (numbers) or "None" (text) for them; integers stay integers when every
        run has one. ``time`` becomes a (run, step)
        coordinate: each run has its own clock. Dataset attributes that differ between the
        analyses become ``run_<attr>`` text coordinates (``run_k_net``, ``run_noise``;
        ``run_store`` for each analysed run store's path); equal ones stay attributes.

        Runs with different layers, lengths or batch sizes are aligned: ``step`` is the sorted
        union of the runs' steps, ``layer`` the union of their layers in order of first
        appearance, ``sample`` as long as the largest batch; a run has NaN wherever it has no
        value. Boolean flags (``degenerate``, ``flow_full_gradient``) then become float (1.0 /
        0.0, NaN where missing), as integers do in xarray; they stay boolean when every run has
        the same steps, layers and sample capacity.

    Examples
    --------
    >>> ds = trajlab.open_analyses("sweep/*.analysis.zarr")  # doctest: +SKIP
    >>> ds.logK_diffusion2.mean("step").groupby("run_batch_size").mean()  # doctest: +SKIP
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
        ds = open_analysis(p, storage_options=storage_options).reset_coords("time")
        if "sample" in ds.dims:
            ds = ds.assign_coords(sample=np.arange(ds.sizes["sample"]))
        parts.append(ds)
        infos.append({**st.meta.run_info, "run_id": st.meta.run_id})
    parts = _aligned(parts)
    combined = xr.concat(parts, dim=dim, join="exact", combine_attrs="drop_conflicts",
                         coords="minimal", compat="override")
    combined = combined.set_coords("time").assign_coords({dim: [str(p) for p in paths]})
    taken = set(combined.variables) | set(combined.dims)
    for k in sorted({k for i in infos for k in i}):
        arr = _coordinate([i.get(k) for i in infos])
        if arr is not None:
            name = f"{dim}_{k}" if k in taken else k  # never replace an analysis variable
            combined = combined.assign_coords({name: (dim, arr)})
    for k in sorted({k for ds in parts for k in ds.attrs}):  # what differs stays per run
        values = [ds.attrs.get(k) for ds in parts]
        name = f"{dim}_store" if k == dim else f"{dim}_{k}"
        if (k in combined.attrs or (k != dim and k in combined.coords)
                or name in combined.variables or all(v == values[0] for v in values)):
            continue
        combined = combined.assign_coords({name: (dim, np.array([str(v) for v in values]))})
    return combined


def _aligned(parts: list[xr.Dataset]) -> list[xr.Dataset]:
    """Reindex analyses onto common ``step``, ``layer`` and ``sample`` coordinates (NaN where
    a run has no value; boolean flags then become float)."""
    steps = np.unique(np.concatenate([ds["step"].values for ds in parts]))
    layers = list(dict.fromkeys(str(x) for ds in parts for x in ds["layer"].values))
    samples = np.arange(max(ds.sizes.get("sample", 0) for ds in parts))
    target = {"step": steps, "layer": layers, "sample": samples}

    def same(ds: xr.Dataset) -> bool:
        return all(d not in ds.dims or np.array_equal(ds[d].values, v)
                   for d, v in target.items())

    if all(same(ds) for ds in parts):
        return parts
    out = []
    for ds in parts:
        flags = [k for k, v in ds.data_vars.items() if v.dtype == bool]
        ds = ds.assign({k: ds[k].astype(np.float64) for k in flags})
        out.append(ds.reindex({d: v for d, v in target.items() if d in ds.dims}))
    return out


def _coordinate(values: list[Any]) -> np.ndarray | None:
    """One ``run`` coordinate from each run's value: int (all integers), float (numbers, NaN
    where missing), bool, else str; None when no run has a scalar value."""
    if not all(v is None or isinstance(v, (int, float, str, bool, np.generic)) for v in values):
        return None
    present = [v for v in values if v is not None]
    if not present:
        return None
    if len(present) == len(values) and all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.array(values, dtype=bool)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
           for v in values):
        return np.array(values, dtype=np.int64)
    if all(isinstance(v, (int, float, np.integer, np.floating))
           and not isinstance(v, (bool, np.bool_)) for v in present):
        return np.array([np.nan if v is None else float(v) for v in values])
    return np.array([str(v) for v in values])


def simulate_paths(ds: xr.Dataset, *, n_paths: int = 200, seed: int = 0) -> xr.DataArray:
    """Paths of log K_net whose law at every step is the default forward prediction's
    (``logK_pred_mean``, ``logK_pred_var``: the SDE of the optimizer that was used, docs/math.md
    §8), for distribution plots: Euler–Maruyama steps of dZ = mu dt + sigma dB with mu dt and
    sigma² dt the prediction's increments of mean and variance. For SGD this is the paper's SDE
    (MATH.md §4); with momentum or Adam the noise a step injects is carried forward by the
    prediction, so its increments, not each step's own diffusion, drive the paths. Never the
    realised update (the pathwise reconstruction).

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

    if "run" in ds.dims:
        raise ValueError(f"simulate_paths takes one run; this dataset holds {ds.sizes['run']} "
                         "along 'run' (trajlab.open_analyses): pick one with ds.isel(run=i) "
                         "or ds.sel(run=...)")
    # like logK_pred_mean: an undefined prediction (no probe, no per-sample information) makes
    # the paths NaN from there on, never a silently noise-free simulation
    mean = np.asarray(ds["logK_pred_mean"].values, dtype=np.float64)
    var = np.asarray(ds["logK_pred_var"].values, dtype=np.float64)
    dt = np.asarray(ds["net_dt"].values, dtype=np.float64)[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = np.diff(mean) / dt
        s2 = np.maximum(np.diff(var), 0.0) / dt
    z0 = float(mean[0])
    paths = euler_maruyama(z0, torch.from_numpy(mu), torch.from_numpy(s2),
                           torch.from_numpy(dt), n_paths=n_paths, seed=seed)
    theory = ds["logK_pred_mean"].attrs.get("theory", "the default forward prediction")
    return xr.DataArray(np.exp(paths.numpy()), dims=("path", "step"),
                        coords={"step": ds["step"].values},
                        attrs={"description": f"K_net along paths whose law at each step is "
                               f"the forward prediction's ({theory})", "theory": theory})
