"""The work of one graph node: a (layer, step-chunk) or a network step-chunk.

Tasks read their slice of the run store themselves (nothing big travels through the graph),
compute with the pure kernels of :mod:`trajlab.sde` in float64, and return small arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from trajlab.analysis.variables import LAYER_TASK_KEYS, NETWORK_TASK_KEYS
from trajlab.sde import network_terms, pathwise_increment, sketch_layer_terms
from trajlab.store import schema
from trajlab.store.io import read_many
from trajlab.store.updates import read_updates


@dataclass(frozen=True)
class AnalysisOptions:
    """Choices that change the result; stored in the analysis store's attributes."""

    gradient: str = "auto"  # "auto" (probe where recorded, else batch), "batch", "probe"
    population: int | None = None  # finite-population correction N (sampling w/o replacement)
    gap_tol: float = 1e-3
    every: int = 1  # optimizer steps per recorded row (dt = every * lr)
    conv_definition: str = "matrix"  # "matrix" or "operator" (adds K_operator, MATH.md §6)


def _open(store: Any, storage_options: dict | None) -> zarr.Group:
    kw: dict[str, Any] = {"mode": "r"}
    if storage_options is not None:
        kw["storage_options"] = storage_options
    return zarr.open_group(store, **kw)


def layer_chunk(
    store: Any,
    storage_options: dict | None,
    group: str,
    sketch: str,
    rows: tuple[int, int],
    options: AnalysisOptions,
    conv: dict | None = None,
) -> dict[str, np.ndarray]:
    """Per-step terms of one layer for rows ``rows[0]:rows[1]`` of the run store.

    Returns {key: (n,) array} for LAYER_TASK_KEYS plus ``noise_proj`` (n, B_max).
    """
    root = _open(store, storage_options)
    lg = root[f"{schema.LAYERS_GROUP}/{group}"]
    r0, r1 = rows
    sl = slice(r0, r1)
    committed = int(root.attrs.get(schema.COMMIT_KEY, r1))
    names = list(schema.SKETCH_VARS[sketch])
    arrays = dict(lg.arrays())
    want = ["lr", "weight", "nonfinite", *names]
    if "grad" in arrays:
        want.append("grad")
    use_probe = options.gradient in ("auto", "probe") and "probe_grad" in arrays
    fetched = read_many([(root["batch_size"], sl), *((arrays[k], sl) for k in want)]
                        + ([(root["probe"], sl), (arrays["probe_grad"], sl)] if use_probe
                           else []))
    batch, vals = fetched[0], dict(zip(want, fetched[1:]))
    lr, W, nonfinite = vals["lr"], vals["weight"], vals["nonfinite"]
    U = read_updates(lg, r0, r1, committed)
    probe = None
    if use_probe and fetched[-2].any():
        probe = (fetched[-2], fetched[-1])
    sk = {k: vals[k] for k in names}
    per_sample = {k for k in names if schema.SKETCH_VARS[sketch][k][0][:1] == (schema.SAMPLE,)}
    if "grad" in vals:
        G = vals["grad"]
    else:  # rank-1 layers: the factors imply the batch mean exactly (docs/format.md)
        d = np.nan_to_num(sk["ps_grad_out"])
        a = np.nan_to_num(sk["ps_input"])
        G = np.einsum("tbm,tbn->tmn", d, a) / np.maximum(batch, 1)[:, None, None]
    n = r1 - r0
    bmax = int(root["indices"].shape[1])
    out = {k: np.full(n, np.nan) for k in LAYER_TASK_KEYS}
    out["degenerate"] = np.zeros(n, dtype=bool)
    out["flow_full_gradient"] = np.zeros(n, dtype=bool)
    out["noise_proj"] = np.full((n, bmax), np.nan)
    for i in range(n):
        b = int(batch[i])
        if nonfinite[i]:
            continue
        if b < 2:
            _noise_free_terms(out, i, W[i], G[i], U[i])
            continue
        t = {}
        for k, arr in sk.items():
            a = arr[i][:b] if k in per_sample else arr[i]
            t[k] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
        grad_full = None
        if probe is not None and probe[0][i]:
            grad_full = torch.from_numpy(probe[1][i].astype(np.float64))
        terms = sketch_layer_terms(
            torch.from_numpy(W[i].astype(np.float64)),
            torch.from_numpy(G[i].astype(np.float64)),
            torch.from_numpy(U[i].astype(np.float64)),
            float(lr[i]),
            sketch,
            t,
            grad_full=grad_full,
            population=options.population,
            gap_tol=options.gap_tol,
        )
        for k in LAYER_TASK_KEYS:
            if k == "coverage":
                out[k][i] = float(torch.minimum(terms["coverage_u"], terms["coverage_v"]))
            else:
                out[k][i] = float(terms[k])
        out["noise_proj"][i, :b] = terms["noise_proj"].numpy()
    if options.conv_definition == "operator":
        out["K_operator"] = _operator_norms(W, conv) if conv else out["K"].copy()
    return out


def _operator_norms(W: np.ndarray, conv: dict) -> np.ndarray:
    """Exact operator norm of each step's convolution (MATH.md §6b), warm-started."""
    from trajlab.spectral import conv_opnorm

    shape = conv["kernel_shape"]
    prev = None
    out = np.full(W.shape[0], np.nan)
    for i in range(W.shape[0]):
        if not np.all(np.isfinite(W[i])):
            continue
        kernel = torch.from_numpy(W[i].astype(np.float64)).reshape(shape)
        res = conv_opnorm(kernel, tuple(conv["input_size"]), stride=tuple(conv["stride"]),
                          padding=tuple(conv["padding"]), dilation=tuple(conv["dilation"]),
                          padding_mode="circular" if conv["padding_mode"] == "circular"
                          else "zeros", init=prev)
        prev = res
        out[i] = float(res.sigma)
    return out


def _noise_free_terms(out: dict, i: int, W, g, update) -> None:
    """Terms defined without a noise estimate (batch size 1): K, gap, flow, pathwise."""
    W = torch.from_numpy(W.astype(np.float64))
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    out["K"][i] = float(s[0])
    out["spectral_gap"][i] = float((s[0] - s[1]) / s[0]) if s.numel() > 1 else 1.0
    out["drift_flow"][i] = -float(u[:, 0] @ torch.from_numpy(g.astype(np.float64)) @ vh[0])
    d = torch.from_numpy(update.astype(np.float64))
    out["pathwise_increment"][i] = float(pathwise_increment(W, d))
    out["pathwise_first_order"][i] = float(u[:, 0] @ d @ vh[0])


def network_chunk(
    store: Any,
    storage_options: dict | None,
    rows: tuple[int, int],
    options: AnalysisOptions,
    layer_results: list[dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Network terms for rows ``rows`` from the layers' chunk results (same rows, layer order)."""
    root = _open(store, storage_options)
    r0, r1 = rows
    batch = root["batch_size"][r0:r1]
    lr = root["lr"][r0:r1]
    n = r1 - r0
    out = {k: np.full(n, np.nan) for k in NETWORK_TASK_KEYS}
    out["lr"], out["batch_size"] = lr.astype(np.float64), batch.astype(np.float64)
    stack = {k: np.stack([r[k] for r in layer_results], axis=-1)
             for k in ("K", "drift", "diffusion2", "drift_noise", "drift_flow",
                       "drift_discretization", "flow_full_gradient")}
    proj = np.stack([r["noise_proj"] for r in layer_results], axis=1)  # (n, L, Bmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["logK"] = np.log(stack["K"]).sum(-1)
        if options.conv_definition == "operator":
            out["K_net_operator"] = np.prod([r["K_operator"] for r in layer_results], axis=0)
    out["K_net"] = np.exp(out["logK"])
    for i in range(n):
        b = int(batch[i])
        if b < 2 or not np.all(np.isfinite(stack["K"][i])):
            continue
        c = proj[i, :, :b]
        if not np.all(np.isfinite(c)):
            continue
        # Every layer must use the same lr for the network SDE; the root lr is group 0's.
        terms = network_terms(
            *(torch.from_numpy(stack[k][i]) for k in ("K", "drift", "diffusion2", "drift_noise")),
            torch.from_numpy(c),
            float(lr[i]),
            b,
            population=options.population,
            drift_flow=torch.from_numpy(stack["drift_flow"][i]),
            drift_discretization=torch.from_numpy(stack["drift_discretization"][i]),
            flow_full_gradient=torch.from_numpy(stack["flow_full_gradient"][i].astype(bool)),
        )
        for k in NETWORK_TASK_KEYS:
            if k in terms and k not in ("K_net", "logK"):
                out[k][i] = float(terms[k])
    with np.errstate(divide="ignore", invalid="ignore"):
        out["logK_drift_optimizer"] = (
            np.stack([r["drift_optimizer"] for r in layer_results], -1) / stack["K"]
        ).sum(-1)
    return out
