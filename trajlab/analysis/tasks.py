"""The work of one graph node: a (layer, step-chunk) or a network step-chunk.

Tasks read their slice of the run store themselves through the run's row reader (nothing big
travels through the graph), compute every step of the chunk at once with the batched kernels of
:mod:`trajlab.sde` in float64 (steps grouped by batch size), and return small arrays keyed by
the analysis variables.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trajlab.analysis.plan import Plan
from trajlab.analysis.variables import variables
from trajlab.sde import network_terms, noise_free_terms, sketch_layer_terms
from trajlab.sketches import sketch_kind
from trajlab.store import open_run

F64 = torch.float64


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _empty(names, n: int, bmax: int) -> dict[str, np.ndarray]:
    specs = variables("layer", operator=True)
    out = {}
    for k in names:
        v = specs[k]
        shape = (n, bmax) if k == "noise_proj" else (n,)
        out[k] = np.full(shape, v.fill, dtype=v.dtype)
    return out


def layer_chunk(plan: Plan, li: int, rows: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per-step terms of layer ``li`` of ``plan`` for run rows ``rows[0]:rows[1]``.

    Returns {variable: (n,) array} for the layer-stage variables, ``noise_proj`` (n, B_max).
    """
    run = open_run(plan.store, storage_options=plan.storage_options)
    lm = plan.layers[li]
    kind = sketch_kind(lm.sketch)
    opts = plan.options
    r0, r1 = rows
    n = r1 - r0
    root = run.root_rows(["batch_size", "probe"], rows)
    batch = root["batch_size"].astype(np.int64)
    use_probe = opts.gradient in ("auto", "probe") and run.meta.probe and bool(root["probe"].any())
    names = ["lr", "weight", "grad", "update", "nonfinite", "grad_scale",
             *(kind.needs() if kind.per_sample else ())]
    if use_probe:
        names.append("probe_grad")
    vals = run.layer_rows(lm.name, names, rows)
    keys = [k for k in variables("layer", operator=opts.operator)]
    out = _empty(keys, n, plan.sample_capacity)
    out["lr"] = vals["lr"].astype(np.float64)
    out["dt"] = out["lr"] * plan.every
    out["grad_scale"] = vals["grad_scale"].astype(np.float64)
    W, G, U = vals["weight"], vals["grad"], vals["update"]
    finite_w = np.isfinite(W).all(axis=(1, 2))
    ok = ~vals["nonfinite"].astype(bool) & finite_w & np.isfinite(G).all(axis=(1, 2))
    full = None
    if use_probe:
        full = np.where(root["probe"].astype(bool)[:, None, None], vals["probe_grad"], np.nan)
    noisy = ok & (batch >= 2) if kind.per_sample else np.zeros(n, dtype=bool)
    for b in np.unique(batch[noisy]):
        idx = np.flatnonzero(noisy & (batch == b))
        t = {}
        for k in kind.needs():
            a = vals[k][idx]
            t[k] = _t(a[:, :b] if kind.variables(lm.rank)[k].per_sample else a)
        terms = sketch_layer_terms(
            _t(W[idx]), _t(G[idx]), _t(U[idx]), _t(out["lr"][idx]), lm.sketch, t,
            grad_full=None if full is None else _t(full[idx]),
            population=opts.population, gap_tol=opts.gap_tol,
        )
        terms["coverage"] = torch.minimum(terms["coverage_u"], terms["coverage_v"])
        for k in keys:
            if k in terms and k != "noise_proj":
                out[k][idx] = terms[k].numpy()
        out["noise_proj"][idx, :b] = terms["noise_proj"].numpy()
    quiet = ok & ~noisy
    if quiet.any():
        idx = np.flatnonzero(quiet)
        terms = noise_free_terms(_t(W[idx]), _t(G[idx]), _t(U[idx]), _t(out["lr"][idx]),
                                 grad_full=None if full is None else _t(full[idx]),
                                 gap_tol=opts.gap_tol)
        for k, v in terms.items():
            out[k][idx] = v.numpy()
    if opts.operator:
        out["K_operator"] = (_operator_norms(W, lm.geometry) if lm.geometry is not None
                             else out["K"].copy())
    return out


def _operator_norms(W: np.ndarray, geometry: Any) -> np.ndarray:
    """Exact operator norm of each step's convolution (MATH.md §6b), warm-started."""
    from trajlab.spectral import conv_opnorm

    prev = None
    out = np.full(W.shape[0], np.nan)
    for i in range(W.shape[0]):
        if not np.all(np.isfinite(W[i])):
            continue
        kernel = _t(W[i]).reshape(geometry.kernel_shape)
        res = conv_opnorm(kernel, tuple(geometry.input_size), stride=tuple(geometry.stride),
                          padding=tuple(geometry.padding), dilation=tuple(geometry.dilation),
                          padding_mode="circular" if geometry.padding_mode == "circular"
                          else "zeros", init=prev)
        prev = res
        out[i] = float(res.sigma)
    return out


_STACKED = ("K", "drift", "diffusion2", "drift_noise", "drift_flow", "drift_discretization",
            "flow_full_gradient", "drift_optimizer", "lr", "dt")


def network_chunk(plan: Plan, rows: tuple[int, int], layer_results: list[dict[str, np.ndarray]]
                  ) -> dict[str, np.ndarray]:
    """Network terms for ``rows`` from the layers' results (same rows, layer order).

    Layers may have different learning rates: each layer's rates are weighted by its lr
    relative to the network time's (the first layer's), so the network terms are per-step
    increments divided by the network's dt.
    """
    run = open_run(plan.store, storage_options=plan.storage_options)
    r0, r1 = rows
    n = r1 - r0
    batch = run.root_rows(["batch_size"], rows)["batch_size"].astype(np.int64)
    net = variables("network", operator=plan.options.operator)
    out = {k: np.full(n, v.fill, dtype=v.dtype) for k, v in net.items()}
    out["batch_size"] = batch.astype(np.float64)
    st = {k: np.stack([r[k] for r in layer_results], axis=-1) for k in _STACKED}
    out["net_dt"] = st["dt"][:, 0]
    proj = np.stack([r["noise_proj"] for r in layer_results], axis=1)  # (n, L, Bmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["logK"] = np.log(st["K"]).sum(-1)
        out["K_net"] = np.exp(out["logK"])
        if plan.options.operator:
            out["K_net_operator"] = np.prod([r["K_operator"] for r in layer_results], axis=0)
        lr0 = st["lr"][:, :1]
        w = np.where(lr0 == 0, 1.0, st["lr"] / np.where(lr0 == 0, 1.0, lr0))
        out["logK_drift_optimizer"] = (w * st["drift_optimizer"] / st["K"]).sum(-1)
    finite = np.isfinite(st["K"]).all(-1)
    for b in np.unique(batch[finite & (batch >= 2)]):
        idx = np.flatnonzero(finite & (batch == b))
        c = proj[idx, :, :b]
        good = np.isfinite(c).all(axis=(1, 2))
        idx, c = idx[good], c[good]
        if idx.size == 0:
            continue
        terms = network_terms(
            *(_t(st[k][idx]) for k in ("K", "drift", "diffusion2", "drift_noise")),
            _t(c), _t(st["lr"][idx]), int(b),
            population=plan.options.population,
            drift_flow=_t(st["drift_flow"][idx]),
            drift_discretization=_t(st["drift_discretization"][idx]),
            flow_full_gradient=torch.from_numpy(st["flow_full_gradient"][idx].astype(bool)),
            time_lr=_t(st["lr"][idx, 0]),
        )
        for k, v in terms.items():
            if k in out and k not in ("K_net", "logK"):
                out[k][idx] = v.numpy()
    return out


def chunk_values(plan: Plan, rows: tuple[int, int], layer_results: list[dict[str, np.ndarray]],
                 net: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One step chunk's variables shaped as stored: (n, L) per layer, (n, L, B) noise_proj,
    (n,) network."""
    out: dict[str, np.ndarray] = {}
    for k in variables("layer", operator=plan.options.operator):
        out[k] = np.stack([r[k] for r in layer_results], axis=1)
    out.update(net)
    return out
