"""``trajlab.analyze``: a run store in, the paper's dynamics out, as an xarray Dataset.

The work is a Dask graph over (layer, step-chunk) nodes feeding one network node per chunk. With
``out=`` every finished node writes its own Zarr chunks and a done-marker into the analysis
store, so an analysis that is killed resumes without recomputing finished nodes; the series-wide
integrals (pathwise reconstruction, predicted mean and variance of log K) are computed at the end
from the stored per-step terms.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr
import zarr
import zarr.codecs
from dask import delayed

from trajlab.analysis.engine import run_graph, scheduler_context
from trajlab.analysis.tasks import AnalysisOptions, layer_chunk, network_chunk
from trajlab.analysis.variables import (
    LAYER_TASK_KEYS,
    LAYER_VARIABLES,
    NETWORK_TASK_KEYS,
    NETWORK_VARIABLES,
)
from trajlab.store import Run, StoreError, open_run
from trajlab.store.io import write_many
from trajlab.store.run_store import store_exists

ANALYSIS_FORMAT_VERSION = 1
_BOOL_KEYS = ("degenerate", "flow_full_gradient")
_COMPRESSOR = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What to compute; small and picklable (it travels with every graph node)."""

    store: Any
    storage_options: dict | None
    layers: tuple[str, ...]
    groups: tuple[tuple[str, str], ...]  # (group, sketch) per layer
    convs: tuple[Any, ...]  # Conv2d geometry per layer (None for Linear)
    rows: tuple[int, int]
    chunk_rows: int
    options: AnalysisOptions

    @property
    def chunks(self) -> list[tuple[int, int]]:
        r0, r1 = self.rows
        return [(a, min(a + self.chunk_rows, r1)) for a in range(r0, r1, self.chunk_rows)]

    @property
    def layer_keys(self) -> tuple[str, ...]:
        extra = ("K_operator",) if self.options.conv_definition == "operator" else ()
        return LAYER_TASK_KEYS + extra

    @property
    def network_keys(self) -> tuple[str, ...]:
        extra = ("K_net_operator",) if self.options.conv_definition == "operator" else ()
        return NETWORK_TASK_KEYS + extra

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    def signature(self) -> dict[str, Any]:
        """What must match for a stored analysis to be resumed."""
        return {
            "run": str(self.store),
            "rows": list(self.rows),
            "layers": list(self.layers),
            "chunk_rows": self.chunk_rows,
            "options": dataclasses.asdict(self.options),
        }


def _plan(run: Run, layers, steps, chunk_rows, options: AnalysisOptions) -> _Plan:
    if run.n_steps == 0:
        raise ValueError(f"{run.store!r} has no committed steps to analyse")
    names = tuple(run.layers if layers is None else layers)
    if not names:
        raise ValueError("layers=[] selects nothing; pass None to analyse every recorded layer")
    for n in names:
        run.layer_meta(n)  # KeyError naming the recorded layers
    all_steps = run.steps
    if steps is None:
        rows = (0, run.n_steps)
    else:
        if isinstance(steps, slice):
            lo = all_steps[0] if steps.start is None else steps.start
            hi = all_steps[-1] + 1 if steps.stop is None else steps.stop
        else:
            lo, hi = steps
        sel = np.flatnonzero((all_steps >= lo) & (all_steps < hi))
        if sel.size == 0:
            raise ValueError(
                f"steps [{lo}, {hi}) select no recorded step; this run holds steps "
                f"{all_steps[0]}..{all_steps[-1]}"
            )
        rows = (int(sel[0]), int(sel[-1]) + 1)
    n = rows[1] - rows[0]
    bs = run.root.batch_size.values[rows[0]:rows[1]]
    if (bs < 2).all():
        raise ValueError(
            "every selected step has batch size 1: the gradient-noise terms need batch size >= 2 "
            "(MATH.md §1); record with larger batches. (Steps with batch size 1 among others are "
            "analysed without noise terms, which are NaN there.)"
        )
    if chunk_rows is None:
        chunk_rows = min(run.meta.chunk_steps, max(8, math.ceil(n / 8)))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    groups = tuple((run.layer_meta(n).group, run.layer_meta(n).sketch) for n in names)
    convs = tuple(run.layer_meta(n).conv or None for n in names)
    return _Plan(run.store, run.storage_options, names, groups, convs, rows, int(chunk_rows),
                 options)


# ----------------------------------------------------------------------------- store layout
def _create_store(out, storage_options, plan: _Plan, run: Run, overwrite: bool) -> zarr.Group:
    meta = {
        "kind": "analysis",
        "format_version": ANALYSIS_FORMAT_VERSION,
        "complete": False,
        "layout": "partial",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **plan.signature(),
    }
    kw: dict[str, Any] = {"mode": "w" if overwrite else "w-", "zarr_format": 3,
                          "attributes": {"trajlab": meta}}
    if storage_options is not None:
        kw["storage_options"] = storage_options
    # The group document is written atomically with its metadata first; "layout" turns "ready"
    # once every array exists, so a store killed while being laid out is laid out anew.
    g = zarr.open_group(out, **kw)
    T, L, c = plan.n_rows, len(plan.layers), plan.chunk_rows
    bmax = int(run._group["indices"].shape[1])

    def arr(name, shape, chunks, dims, dtype="float64", desc=""):
        fill = {"bool": False, "uint8": 0, "int64": -1}.get(dtype, np.nan)
        return g.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                              dimension_names=dims, compressors=[_COMPRESSOR],
                              attributes={"description": desc})

    arr("step", (T,), (T,), ("step",), "int64", "optimizer-step index")[:] = run.steps[
        plan.rows[0]:plan.rows[1]]
    for k in plan.layer_keys:
        arr(k, (T, L), (c, 1), ("step", "layer"), "bool" if k in _BOOL_KEYS else "float64",
            LAYER_VARIABLES[k])
    arr("noise_proj", (T, L, bmax), (c, 1, bmax), ("step", "layer", "sample"), "float64",
        "per-sample noise projection c_i = u1^T Omega_i v1")
    for k in plan.network_keys:
        arr(k, (T,), (c,), ("step",), "float64", NETWORK_VARIABLES[k])
    arr("_done", (len(plan.chunks), L + 1), (1, 1), ("chunk", "node"), "uint8",
        "1 = this (step chunk, layer or network) node is written")
    g.attrs["trajlab"] = {**meta, "layout": "ready"}
    return g


def _open_store(out, storage_options, mode="r"):
    kw: dict[str, Any] = {"mode": mode}
    if storage_options is not None:
        kw["storage_options"] = storage_options
    return zarr.open_group(out, **kw)


def _store_rel(plan: _Plan, rows: tuple[int, int]) -> slice:
    return slice(rows[0] - plan.rows[0], rows[1] - plan.rows[0])


# ----------------------------------------------------------------------------- graph nodes
def _layer_node(plan: _Plan, out, out_options, ci: int, li: int) -> dict[str, np.ndarray]:
    rows = plan.chunks[ci]
    sl = _store_rel(plan, rows)
    g = _open_store(out, out_options, "r+") if out is not None else None
    if g is not None and g["_done"][ci, li]:
        res = {k: g[k][sl, li] for k in plan.layer_keys}
        res["noise_proj"] = g["noise_proj"][sl, li, :]
        return res
    _single_threaded_in_workers()
    group, sketch = plan.groups[li]
    res = layer_chunk(plan.store, plan.storage_options, group, sketch, rows, plan.options,
                      plan.convs[li])
    if g is not None:
        arrays = dict(g.arrays())
        write_many([(arrays[k], (sl, li), res[k]) for k in plan.layer_keys]
                   + [(arrays["noise_proj"], (sl, li, slice(None)), res["noise_proj"])])
        g["_done"][ci, li] = 1  # after the data: a node is done only once all of it is written
    return res


def _network_node(plan: _Plan, out, out_options, ci: int, layer_results) -> Any:
    rows = plan.chunks[ci]
    sl = _store_rel(plan, rows)
    L = len(plan.layers)
    g = _open_store(out, out_options, "r+") if out is not None else None
    if g is not None and g["_done"][ci, L]:
        return ci
    res = network_chunk(plan.store, plan.storage_options, rows, plan.options,
                        list(layer_results))
    if g is None:
        return ci, res, [{k: r[k] for k in plan.layer_keys} for r in layer_results]
    arrays = dict(g.arrays())
    write_many([(arrays[k], sl, res[k]) for k in plan.network_keys])
    g["_done"][ci, L] = 1
    return ci


def _single_threaded_in_workers() -> None:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


# ----------------------------------------------------------------------------- integrals
def _integrals(K, inc, drift, logK, mu, s2, s2b, disc, lr, every) -> dict[str, np.ndarray]:
    """Series-wide quantities at the start of each row (first row = initial values)."""
    dt = lr * every
    T = K.shape[0]

    def cum(rate):  # value at the start of each row: sum over earlier rows
        x = np.where(np.isfinite(rate), rate, 0.0) * (dt if rate.ndim == 1 else dt[:, None])
        return np.concatenate([np.zeros((1, *x.shape[1:])), np.cumsum(x, 0)[:-1]], 0)

    out: dict[str, np.ndarray] = {"time": np.concatenate([[0.0], np.cumsum(dt)[:-1]])}
    if every == 1:
        steps_inc = np.where(np.isfinite(inc), inc, 0.0)
        kp = K[0][None, :] + np.concatenate([np.zeros((1, K.shape[1])),
                                             np.cumsum(steps_inc, 0)[:-1]], 0)
    else:
        kp = np.full_like(K, np.nan)
    out["K_pathwise"] = kp
    out["K_pred_mean"] = K[0][None, :] + cum(drift)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["K_net_pathwise"] = np.prod(kp, axis=1)
    out["logK_pred_mean"] = logK[0] + cum(mu)
    out["logK_pred_var"] = cum(s2)
    out["logK_pred_var_blockdiag"] = cum(s2b)
    out["logK_discretization_integral"] = cum(disc)
    sd = np.sqrt(out["logK_pred_var"])
    out["K_net_pred_lower"] = np.exp(out["logK_pred_mean"] - 1.96 * sd)
    out["K_net_pred_upper"] = np.exp(out["logK_pred_mean"] + 1.96 * sd)
    assert out["time"].shape[0] == T
    return out


def _integrate_into(g: zarr.Group, plan: _Plan) -> None:
    vals = {k: g[k][:] for k in ("K", "pathwise_increment", "drift")}
    net = {k: g[k][:] for k in ("logK", "logK_drift", "logK_diffusion2",
                                "logK_diffusion2_blockdiag", "logK_discretization", "lr")}
    res = _integrals(vals["K"], vals["pathwise_increment"], vals["drift"], net["logK"],
                     net["logK_drift"],
                     net["logK_diffusion2"], net["logK_diffusion2_blockdiag"],
                     net["logK_discretization"], net["lr"], plan.options.every)
    c = plan.chunk_rows
    for k, v in res.items():
        dims = ("step", "layer") if v.ndim == 2 else ("step",)
        desc = LAYER_VARIABLES.get(k) or NETWORK_VARIABLES.get(k) or "time t = sum of lr * every"
        a = g.create_array(k, shape=v.shape, chunks=(c, *v.shape[1:]), dtype="float64",
                           fill_value=np.nan, dimension_names=dims, compressors=[_COMPRESSOR],
                           attributes={"description": desc}, overwrite=True)
        a[:] = v
    meta = dict(g.attrs["trajlab"])
    meta["complete"] = True
    g.attrs["trajlab"] = meta


# ----------------------------------------------------------------------------- public API
def analyze(
    run: Run | str,
    *,
    out: Any = None,
    layers: Sequence[str] | None = None,
    steps: slice | tuple[int, int] | None = None,
    scheduler: Any = None,
    workers: int | None = None,
    chunk_rows: int | None = None,
    gradient: str = "auto",
    population: int | str | None = "auto",
    gap_tol: float = 1e-3,
    conv_definition: str = "matrix",
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict | None = None,
) -> xr.Dataset:
    """Compute the SDE terms of a recorded run (MATH.md §1–§5) as an xarray Dataset.

    Parameters
    ----------
    run : Run or path/URL of a run store.
    out : path/URL, optional
        Analysis store. Finished chunks are written as they complete; an existing, unfinished
        analysis of the same run and options is resumed; a finished one is opened.
    layers : module names (default: every recorded layer). Network terms use these layers.
    steps : slice or (start, stop) of step indices, stop exclusive (default: all committed).
    scheduler : None (a LocalCluster sized to the machine), "threads", "processes",
        "synchronous", a scheduler address ("tcp://host:8786") or a ``distributed.Client``.
    workers : worker processes of the default LocalCluster.
    chunk_rows : recorded steps per graph node.
    gradient : "auto" (full-data probe gradient where recorded, batch gradient elsewhere),
        "batch", or "probe" (same as auto; use it to state intent).
    population : finite-population correction N for sampling without replacement. "auto":
        the run's dataset size when its sampler is "reshuffle", else none.
    gap_tol : relative spectral gap below which a step is flagged ``degenerate``.
    conv_definition : "matrix" (default): Conv2d K and SDE terms use the reshaped kernel
        (MATH.md §6a), exact for the recorded sketch. "operator": additionally compute the exact
        operator norm of each convolution (``K_operator``, ``K_net_operator``; §6b), a true
        Lipschitz bound but more expensive.
    overwrite : replace an existing analysis store with different options.
    progress : progress bar on the terminal.
    storage_options : fsspec options for ``out``.

    Returns
    -------
    xr.Dataset
        dims (step, layer[, sample]); coords step, time (cumulative lr), layer; per-layer and
        network variables with their meanings in ``attrs["description"]``; lazily loaded from
        ``out`` when given.

    Examples
    --------
    >>> ds = trajlab.analyze("run.zarr", out="analysis.zarr")  # doctest: +SKIP
    >>> ds.K.sel(layer="fc1").plot()  # doctest: +SKIP
    """
    run = open_run(run)
    if gradient not in ("auto", "batch", "probe"):
        raise ValueError(f"gradient must be 'auto', 'batch' or 'probe', got {gradient!r}")
    if population == "auto":
        population = run.meta.dataset_size if run.meta.sampler == "reshuffle" else None
    if conv_definition not in ("matrix", "operator"):
        raise ValueError(
            f"conv_definition must be 'matrix' or 'operator', got {conv_definition!r}"
        )
    options = AnalysisOptions(gradient=gradient, population=population, gap_tol=gap_tol,
                              every=run.meta.every, conv_definition=conv_definition)
    plan = _plan(run, layers, steps, chunk_rows, options)
    g = None
    if out is not None:
        g = _prepare_store(out, storage_options, plan, run, overwrite)
        if g.attrs["trajlab"].get("complete"):
            return open_analysis(out, storage_options=storage_options, run=run)
    L = len(plan.layers)
    nodes = []
    for ci in range(len(plan.chunks)):
        lnodes = [delayed(_layer_node, pure=False)(plan, out, storage_options, ci, li)
                  for li in range(L)]
        nodes.append(delayed(_network_node, pure=False)(plan, out, storage_options, ci, lnodes))
    with scheduler_context(scheduler, workers=workers) as where:
        results = run_graph(nodes, where, progress=progress, desc="analysing")
    if g is not None:
        _integrate_into(_open_store(out, storage_options, "r+"), plan)
        return open_analysis(out, storage_options=storage_options, run=run)
    return _in_memory_dataset(plan, run, results)


def _prepare_store(out, storage_options, plan: _Plan, run: Run, overwrite: bool) -> zarr.Group:
    if store_exists(out, storage_options=storage_options) and not overwrite:
        g = _open_store(out, storage_options, "r+")
        meta = g.attrs.asdict().get("trajlab")
        if meta is None or meta.get("kind") != "analysis":
            raise StoreError(
                f"{out!r} exists and is not a trajlab analysis store; choose another path "
                "or pass overwrite=True"
            )
        if meta.get("layout", "ready") != "ready":
            return _create_store(out, storage_options, plan, run, overwrite=True)
        if {k: meta.get(k) for k in plan.signature()} != plan.signature():
            raise StoreError(
                f"{out!r} holds an analysis with other settings (run, steps, layers or "
                "options); pass overwrite=True to replace it or choose another path"
            )
        return g  # resume an interrupted analysis, or open a finished one
    return _create_store(out, storage_options, plan, run, overwrite=True)


def _in_memory_dataset(plan: _Plan, run: Run, results) -> xr.Dataset:
    T, L = plan.n_rows, len(plan.layers)
    layer = {k: np.full((T, L), np.nan) for k in plan.layer_keys}
    for k in _BOOL_KEYS:
        layer[k] = np.zeros((T, L), dtype=bool)
    net = {k: np.full(T, np.nan) for k in plan.network_keys}
    for ci, res, lres in results:
        sl = _store_rel(plan, plan.chunks[ci])
        for k in plan.network_keys:
            net[k][sl] = res[k]
        for li, r in enumerate(lres):
            for k in plan.layer_keys:
                layer[k][sl, li] = r[k]
    ints = _integrals(layer["K"], layer["pathwise_increment"], layer["drift"], net["logK"],
                      net["logK_drift"],
                      net["logK_diffusion2"], net["logK_diffusion2_blockdiag"],
                      net["logK_discretization"], net["lr"], plan.options.every)
    data = {}
    for k, v in {**layer, **net, **ints}.items():
        if k == "time":
            continue
        dims = ("step", "layer") if v.ndim == 2 else ("step",)
        desc = LAYER_VARIABLES.get(k) or NETWORK_VARIABLES.get(k, "")
        data[k] = xr.Variable(dims, v, attrs={"description": desc})
    ds = xr.Dataset(data, coords={
        "step": run.steps[plan.rows[0]:plan.rows[1]],
        "layer": list(plan.layers),
        "time": ("step", ints["time"]),
    })
    ds.attrs.update(_dataset_attrs(run, plan))
    return ds


def _dataset_attrs(run: Run, plan_or_meta) -> dict[str, Any]:
    if isinstance(plan_or_meta, _Plan):
        sig = plan_or_meta.signature()
    else:
        sig = plan_or_meta
    opts = sig["options"]
    probed = int(run._group["probe"][: run.n_steps].sum()) if run.n_steps else 0
    if opts["gradient"] == "batch" or probed == 0:
        grad_used = "batch gradient"
    else:
        grad_used = f"full-data probe gradient at {probed} steps, batch gradient elsewhere"
    return {
        "run": str(sig["run"]),
        "conv_definition": (
            "matrix: Conv2d kernel reshaped to C_out x C_in*kh*kw (MATH.md 6a) for K and every "
            "SDE term"
            + ("; K_operator / K_net_operator: exact operator norm of the convolution on its "
               "input size (MATH.md 6b)" if opts.get("conv_definition") == "operator" else "")
        ),
        "gradient": grad_used,
        "population": str(opts["population"]),
        "sampler": run.meta.sampler,
        "time_unit": "t = sum over steps of lr (times `every` for subsampled runs)",
        "estimator": "Sigma ~ 1/(B(B-1)) sum_i Omega_i Omega_i^T"
        + (f" x (N-B)/(N-1), N={opts['population']}" if opts["population"] else ""),
        "every": run.meta.every,
    }


def open_analysis(
    store: Any, *, storage_options: dict | None = None, run: Run | None = None
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
    trajlab.StoreError : not an analysis store, or an unfinished one (rerun ``analyze`` with the
        same arguments to resume it).
    """
    if not store_exists(store, storage_options=storage_options):
        raise FileNotFoundError(f"no analysis store at {store!r}; create one with trajlab.analyze")
    g = _open_store(store, storage_options)
    meta = g.attrs.asdict().get("trajlab")
    if not meta or meta.get("kind") != "analysis":
        raise StoreError(f"{store!r} is not a trajlab analysis store")
    if meta.get("format_version", 0) > ANALYSIS_FORMAT_VERSION:
        raise StoreError(f"{store!r} has a newer analysis format; upgrade trajlab")
    if not meta.get("complete"):
        raise StoreError(
            f"the analysis in {store!r} is unfinished (interrupted); rerun trajlab.analyze with "
            "the same arguments to resume it"
        )
    kw: dict[str, Any] = {"consolidated": False, "zarr_format": 3, "chunks": {}}
    if storage_options is not None:
        kw["storage_options"] = storage_options
    ds = xr.open_zarr(store, **kw).drop_vars("_done")
    ds = ds.set_coords(["time"])
    ds = ds.assign_coords(layer=list(meta["layers"]))
    try:
        if run is None:
            run = open_run(meta["run"], storage_options=storage_options)
        ds.attrs.update(_dataset_attrs(run, meta))
    except Exception:  # noqa: BLE001 - the run may have moved; the results stand alone
        ds.attrs["run"] = meta["run"]
    return ds


def simulate_paths(ds: xr.Dataset, *, n_paths: int = 200, seed: int = 0) -> xr.DataArray:
    """Euler–Maruyama paths of the network SDE dZ = mu_Z dt + sigma_Z dB with the recorded
    coefficients (MATH.md §4), for distribution plots.

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
    s2 = np.nan_to_num(np.asarray(ds["logK_diffusion2"].values, dtype=np.float64))
    dt = np.asarray(ds["lr"].values, dtype=np.float64) * int(ds.attrs.get("every", 1))
    z0 = float(ds["logK"].values[0])
    paths = euler_maruyama(z0, torch.from_numpy(mu[:-1]), torch.from_numpy(s2[:-1]),
                           torch.from_numpy(dt[:-1]), n_paths=n_paths, seed=seed)
    return xr.DataArray(np.exp(paths.numpy()), dims=("path", "step"),
                        coords={"step": ds["step"].values},
                        attrs={"description": "K_net along Euler-Maruyama paths of the SDE"})
