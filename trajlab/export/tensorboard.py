"""An analysis as TensorBoard scalars, at the run's optimizer steps.

Three separate steps: :func:`select` picks (and loads) the exported variables of an analysis,
:func:`scalar_rows` turns them into ``(step, [(tag, value), ...])`` rows, and
:func:`to_tensorboard` writes the rows as one event per step with tensorboard's own event-file
writer. Only the last step needs the optional ``tensorboard`` package.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import xarray as xr

#: Per-layer variables written, one tag ``trajlab/<variable>/<layer>`` each.
#: Each series' description starts with its theory (``attrs["theory"]``: the SDE of the
#: optimizer that was used for ``*_pred*``, "SDE for SGD (paper)" for ``*_sgd`` and the SGD terms,
#: "pathwise reconstruction" for what the realised updates give).
LAYER_SCALARS: tuple[str, ...] = ("K", "K_pred_mean", "K_pred_mean_sgd", "K_pathwise",
                                  "drift_flow", "drift_noise", "drift", "drift_optimizer",
                                  "diffusion2")
#: Network variables written, one tag ``trajlab/net/<variable>`` each.
NETWORK_SCALARS: tuple[str, ...] = ("K_net", "logK", "logK_pred_mean", "K_net_pred_lower",
                                    "K_net_pred_upper", "logK_pred_mean_sgd", "K_net_pathwise",
                                    "logK_drift", "logK_diffusion2")

_INSTALL = 'pip install "trajlab[tensorboard]"'


def scalar_tag(variable: str, layer: str | None = None) -> str:
    """The TensorBoard tag of a variable: ``trajlab/<variable>/<layer>`` for a layer's,
    ``trajlab/net/<variable>`` for a network variable (``layer=None``).

    >>> scalar_tag("K", "fc1"), scalar_tag("K_net")
    ('trajlab/K/fc1', 'trajlab/net/K_net')
    """
    return f"trajlab/{variable}/{layer}" if layer is not None else f"trajlab/net/{variable}"


def select(ds: xr.Dataset, *, layers: Sequence[str] | None = None, every: int = 1
           ) -> xr.Dataset:
    """The exported variables of ``ds`` for ``layers``, every ``every``-th step, loaded.

    Only these variables (and only the kept steps) are read from a lazily opened analysis.

    Raises
    ------
    ValueError : ``every`` < 1, an unknown layer, a Dataset with more dimensions than one
        analysis (``open_analyses``' ``run``) or without any exported variable.
    """
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"every must be an integer >= 1, got {every!r}")
    extra = sorted(set(ds.dims) - {"step", "layer", "sample"})
    if extra:
        raise ValueError(f"the Dataset has dimension(s) {extra} besides step and layer; export "
                         f"one analysis at a time, e.g. ds.isel({extra[0]}=0)")
    if "step" not in ds.coords:
        raise ValueError("not a trajlab analysis Dataset: it has no 'step' coordinate")
    names = [k for k in (*LAYER_SCALARS, *NETWORK_SCALARS) if k in ds.data_vars]
    if not names:
        raise ValueError("the Dataset holds none of the exported variables "
                         f"({', '.join(LAYER_SCALARS + NETWORK_SCALARS)})")
    sub = ds[names]
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
        known = [str(n) for n in ds.layer.values] if "layer" in ds.coords else []
        unknown = [n for n in layers if n not in known]
        if unknown:
            raise ValueError(f"unknown layer(s) {', '.join(map(repr, unknown))}; the analysis "
                             f"has {', '.join(known) or 'no layers'}")
        sub = sub.sel(layer=layers)
    return sub.isel(step=slice(None, None, int(every))).compute()


def scalar_rows(ds: xr.Dataset) -> Iterator[tuple[int, list[tuple[str, float]]]]:
    """``(step, [(tag, value), ...])`` for every step of a loaded :func:`select` result.

    Non-finite values (NaN: undefined terms, e.g. noise terms of layers recorded without
    per-sample information; ±inf) are left out; steps without any value are skipped.
    """
    columns: list[tuple[str, np.ndarray]] = []
    layers = [str(n) for n in ds.layer.values] if "layer" in ds.coords else []
    for k in LAYER_SCALARS:
        if k in ds.data_vars:
            arr = np.asarray(ds[k].transpose("step", "layer").values, dtype=np.float64)
            columns += [(scalar_tag(k, name), arr[:, j]) for j, name in enumerate(layers)]
    for k in NETWORK_SCALARS:
        if k in ds.data_vars:
            columns.append((scalar_tag(k), np.asarray(ds[k].values, dtype=np.float64)))
    for i, step in enumerate(ds.step.values):
        row = [(tag, float(col[i])) for tag, col in columns if math.isfinite(col[i])]
        if row:
            yield int(step), row


def scalar_descriptions(ds: xr.Dataset) -> dict[str, str]:
    """Tag -> description (from :data:`trajlab.analysis.VARIABLES`) of every exported tag of a
    :func:`select` result; TensorBoard shows it beside the chart."""
    from trajlab.analysis.variables import describe, theory_of

    opt = ds.attrs.get("optimizer_theory")

    def text(k: str) -> str:
        theory = ds[k].attrs.get("theory") or (theory_of(k, opt) if opt else None)
        return f"[{theory}] {describe(k)}" if theory else describe(k)

    layers = [str(n) for n in ds.layer.values] if "layer" in ds.coords else []
    out = {scalar_tag(k, n): f"{text(k)} (layer {n})" for k in LAYER_SCALARS
           if k in ds.data_vars for n in layers}
    out.update({scalar_tag(k): text(k) for k in NETWORK_SCALARS if k in ds.data_vars})
    return out


def to_tensorboard(
    ds_or_path: xr.Dataset | str | os.PathLike,
    logdir: str | os.PathLike,
    *,
    run_name: str | None = None,
    layers: Sequence[str] | None = None,
    every: int = 1,
    storage_options: dict | None = None,
) -> Path:
    """Write an analysis as TensorBoard scalars at the run's optimizer steps.

    Each recorded step becomes one event whose ``global_step`` is the ``step`` coordinate (the
    optimizer step), so the curves line up with the training curves the user logged for the
    same run. Tags:

    * ``trajlab/<variable>/<layer>`` for :data:`LAYER_SCALARS`: measured ``K``, the forward
      prediction ``K_pred_mean`` (the SDE of the optimizer that was used), the paper's SGD SDE
      ``K_pred_mean_sgd``, the pathwise reconstruction ``K_pathwise``, the drift terms
      ``drift_flow``, ``drift_noise``, ``drift``, ``drift_optimizer`` (pathwise) and
      ``diffusion2``;
    * ``trajlab/net/<variable>`` for :data:`NETWORK_SCALARS`: ``K_net``, ``logK``,
      ``logK_pred_mean``, the predicted 95% band ``K_net_pred_lower`` / ``K_net_pred_upper``,
      ``logK_pred_mean_sgd``, ``K_net_pathwise``, ``logK_drift`` and ``logK_diffusion2``.

    Every description starts with the series' theory in brackets ("[SDE for SGD (paper)]",
    "[SDE for SGD with momentum (trajlab, after Li, Tai & E)]", "[pathwise reconstruction]").

    Values are stored as float32 (TensorBoard's scalar type); NaN and ±inf values are not
    written. Each call writes a new event file (suffix ``.trajlab``) and never touches others.

    Parameters
    ----------
    ds_or_path : analysis Dataset (:func:`trajlab.analyze`, :func:`trajlab.open_analysis`;
        a lazy one is fine: only the exported variables are loaded), or the path/URL of an
        analysis store.
    logdir : TensorBoard log directory (a local folder, created if missing); pass the run's own
        log directory (the one its ``SummaryWriter`` writes) to see both in one TensorBoard run.
    run_name : optional sub-directory of ``logdir`` to write into (a separate TensorBoard run),
        a relative path without ``..``; default ``logdir`` itself.
    layers : layers to write (default all; an empty sequence writes the network only).
    every : write every ``every``-th analysed step (default 1: all).
    storage_options : fsspec options when ``ds_or_path`` is a URL.

    Returns
    -------
    Path : the directory that received the event file.

    Raises
    ------
    ImportError : the ``tensorboard`` package is missing (``pip install "trajlab[tensorboard]"``).
    ValueError : invalid ``run_name``, ``layers`` or ``every``, or not one analysis.
    FileExistsError : the target directory is a file.
    FileNotFoundError, trajlab.StoreError : ``ds_or_path`` is no finished analysis store.

    Examples
    --------
    >>> from trajlab.export import to_tensorboard  # doctest: +SKIP
    >>> to_tensorboard("analysis.zarr", "runs/exp1")  # doctest: +SKIP
    PosixPath('runs/exp1')
    >>> # then: tensorboard --logdir runs
    """
    writer_cls, event_pb2, summary_pb2 = _tensorboard()
    out = Path(logdir) / _relative(run_name) if run_name is not None else Path(logdir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{str(out)!r} is a file, not a TensorBoard log directory; "
                              "choose a folder")
    if isinstance(ds_or_path, xr.Dataset):
        ds = ds_or_path
    else:
        from trajlab.analysis import open_analysis

        ds = open_analysis(ds_or_path, storage_options=storage_options)
    sub = select(ds, layers=layers, every=every)
    undescribed = scalar_descriptions(sub)  # sent with each tag's first value
    writer = writer_cls(str(out), max_queue_size=1024, filename_suffix=".trajlab")
    try:
        wall = time.time()
        for step, values in scalar_rows(sub):
            summary = summary_pb2.Summary()
            for tag, value in values:
                entry = summary.value.add(tag=tag, simple_value=value)
                if tag in undescribed:  # metadata names its plugin (readers warn otherwise)
                    entry.metadata.summary_description = undescribed.pop(tag)
                    entry.metadata.plugin_data.plugin_name = "scalars"
            writer.add_event(event_pb2.Event(wall_time=wall, step=step, summary=summary))
    finally:
        writer.close()
    return out


def _relative(run_name: str) -> PurePath:
    p = PurePath(run_name) if isinstance(run_name, str) and run_name.strip() else None
    if p is None or p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"run_name must be a relative folder name inside the log directory "
                         f"(no '..'), got {run_name!r}")
    return p


def _tensorboard() -> tuple[Any, Any, Any]:
    """tensorboard's event-file writer and protos, or an ImportError naming the extra."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as e:
        raise ImportError(f"exporting to TensorBoard needs the tensorboard package: "
                          f"{_INSTALL} (or pip install tensorboard)") from e
    return EventFileWriter, event_pb2, summary_pb2
