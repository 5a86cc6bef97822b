"""The work of one graph node: a (layer, step-chunk) or a network step-chunk.

Tasks read their slice of the run store themselves through the run's row reader (nothing big
travels through the graph), compute the steps of the chunk together with the batched resolvent
kernel of :mod:`trajlab.sde.resolvent` in float64 (steps grouped by batch size, in blocks of
bounded memory), and return small arrays keyed by the analysis variables.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trajlab.analysis.batchnorm import batchnorm_chunk
from trajlab.analysis.plan import Plan
from trajlab.analysis.variables import variables
from trajlab.errors import StoreError
from trajlab.sde import network_terms
from trajlab.sde.diagonal import diagonal_layer_terms
from trajlab.sde.resolvent import resolvent_layer_terms
from trajlab.sketches import sketch_kind
from trajlab.store import Run, open_run
from trajlab.store.metadata import LayerMeta

F64 = torch.float64
#: Runs opened by this process's nodes, reused by later nodes of the same run (opening a run
#: and its arrays' metadata costs ~0.3 ms per row of a small layer's chunk).
_RUNS: OrderedDict[tuple, Run] = OrderedDict()
_RUNS_MAX = 16
_RUNS_LOCK = threading.Lock()


def plan_run(plan: Plan) -> Run:
    """The plan's run store, opened once per process (checked against the plan's run id and
    rows: a re-recorded or re-opened store is opened anew)."""
    store = plan.store
    key = (os.fspath(store) if isinstance(store, (str, os.PathLike)) else id(store),
           repr(sorted((plan.storage_options or {}).items())), plan.run_id)
    with _RUNS_LOCK:
        run = _RUNS.get(key)
        if run is not None:
            _RUNS.move_to_end(key)
    if run is None or run.n_steps < plan.rows[1]:
        run = open_run(store, storage_options=plan.storage_options)
        if run.meta.identity != plan.run_id:
            raise StoreError(f"the run store at {store!r} was re-recorded since this analysis "
                             f"was planned (run id {run.meta.identity}, planned for "
                             f"{plan.run_id}); start the analysis again")
        with _RUNS_LOCK:
            _RUNS[key] = run
            while len(_RUNS) > _RUNS_MAX:
                _RUNS.popitem(last=False)
    return run


#: Bound of the float64 working set of one kernel call: a node computes its rows in blocks.
KERNEL_BYTES = 64 << 20


def block_rows(m: int, n: int, samples: int) -> int:
    """Rows per kernel call for an (m, n) layer with ``samples`` per-sample rows: its float64
    working set (about twelve (m, n) and six (B, m + n) arrays per row) within
    :data:`KERNEL_BYTES`."""
    per_row = 8 * (12 * m * n + 6 * samples * (m + n))
    return max(1, KERNEL_BYTES // per_row)


def _diag(x: torch.Tensor) -> torch.Tensor:
    """The diagonals (T, d) of stacked diagonal matrices (T, d, d)."""
    return torch.diagonal(x, dim1=-2, dim2=-1)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _empty(names, n: int, bmax: int) -> dict[str, np.ndarray]:
    specs = variables("layer", operator=True)
    out = {}
    for k in names:
        v = specs[k]
        shape = (n, bmax) if v.dims[-1] == "sample" else (n,)
        out[k] = np.full(shape, v.fill, dtype=v.dtype)
    return out


@dataclass
class ChunkInputs:
    """What a (layer, chunk) node reads: shared by :func:`layer_chunk` and the per-step
    reference, so that both compute from the same numbers.

    ``vals`` holds the layer's rows as stored (``grad`` only where the sketch does not imply
    it: for an implying kind the nodes take the batch mean of the per-sample factors they
    read anyway, in float64, :meth:`~trajlab.sketches.base.SketchKind.mean_gradient`; a
    ``projected`` kind gives the batch gradient's terms from its statistics, and no ``grad``
    is read).
    """

    lm: LayerMeta
    kind: Any
    batch: np.ndarray
    probed: np.ndarray | None
    vals: dict[str, np.ndarray]
    implied: bool

    def tensors(self, idx: Any, b: int) -> dict[str, torch.Tensor]:
        """The sketch's float64 tensors of rows ``idx`` (a slice or indices), first ``b``
        samples."""
        out = {}
        for k in self.kind.needs():
            a = self.vals[k]
            out[k] = _t((a[:, :b] if self.kind.variables(self.lm.rank)[k].per_sample else a)[idx])
        return out

    def grad(self, idx: Any, t: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        """float64 batch gradients of rows ``idx`` (``t``: their sketch tensors); None for a
        ``projected`` kind (its statistics give the gradient's terms)."""
        if self.kind.projected:
            return None
        return self.kind.mean_gradient(t) if self.implied else _t(self.vals["grad"][idx])


def read_chunk(plan: Plan, li: int, rows: tuple[int, int]) -> ChunkInputs:
    """Read layer ``li``'s rows ``rows`` of the plan's run (one round trip per group)."""
    run = plan_run(plan)
    lm = plan.layers[li]
    kind = sketch_kind(lm.sketch)
    opts = plan.options
    root = run.root_rows(["batch_size", "probe"], rows)
    use_probe = opts.gradient in ("auto", "probe") and run.meta.probe and bool(root["probe"].any())
    implied = bool(kind.per_sample and kind.implies_grad)
    names = ["lr", "weight", *(() if implied or kind.projected else ("grad",)), "update",
             "nonfinite", "grad_scale", *(kind.needs() if kind.per_sample else ())]
    if use_probe:
        names.append("probe_grad")
    return ChunkInputs(lm, kind, root["batch_size"].astype(np.int64),
                       root["probe"].astype(bool) if use_probe else None,
                       run.layer_rows(lm.name, names, rows), implied)


def _start(plan: Plan, c: ChunkInputs, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The output arrays with the variables that need no kernel, and the computable rows."""
    out = _empty(variables("layer", operator=plan.options.operator), n, plan.sample_capacity)
    v = c.vals
    out["lr"] = v["lr"].astype(np.float64)
    out["dt"] = out["lr"] * plan.every
    out["grad_scale"] = v["grad_scale"].astype(np.float64)
    ok = ~v["nonfinite"].astype(bool) & np.isfinite(v["weight"]).all(axis=(1, 2))
    if not (c.implied or c.kind.projected):
        ok &= np.isfinite(v["grad"]).all(axis=(1, 2))
    return out, ok


def layer_chunk(plan: Plan, li: int, rows: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per-step terms of layer ``li`` of ``plan`` for run rows ``rows[0]:rows[1]``.

    Returns {variable: (n,) array} for the layer-stage variables, ``noise_proj`` (n, B_max).
    """
    c = read_chunk(plan, li, rows)
    lm, kind, batch, vals, probed = c.lm, c.kind, c.batch, c.vals, c.probed
    opts = plan.options
    n = rows[1] - rows[0]
    keys = list(variables("layer", operator=opts.operator))
    out, ok = _start(plan, c, n)
    W, U = vals["weight"], vals["update"]

    def sel(idx: np.ndarray) -> Any:
        """A slice where the rows are contiguous (one copy instead of two)."""
        return slice(idx[0], idx[-1] + 1) if idx[-1] - idx[0] + 1 == idx.size else idx

    def full_of(idx: np.ndarray) -> torch.Tensor | None:
        if probed is None:
            return None
        f = _t(vals["probe_grad"][sel(idx)])
        f[~torch.from_numpy(probed[idx])] = float("nan")  # no probe at that step
        return f

    noisy = ok & (batch >= 2) if kind.per_sample else np.zeros(n, dtype=bool)
    block = block_rows(*lm.shape, plan.sample_capacity)
    quiet = ok & ~noisy
    for rows_b, with_noise in ((noisy, True), (quiet, False)):
        groups = [np.flatnonzero(rows_b & (batch == b)) for b in np.unique(batch[rows_b])]
        for idx in (g[i:i + block] for g in groups for i in range(0, g.size, block)):
            b, s_ = int(batch[idx[0]]), sel(idx)
            t = c.tensors(s_, b) if kind.per_sample else None
            if kind.diagonal:  # diag(gamma): closed form, O(T B d) (no spectrum)
                full = full_of(idx)
                terms = diagonal_layer_terms(
                    _diag(_t(W[s_])), _diag(c.grad(s_, t)), _diag(_t(U[s_])),
                    _t(out["lr"][idx]), ps_diag=t["ps_diag"] if with_noise else None,
                    grad_full=None if full is None else _diag(full),
                    population=opts.population, gap_tol=opts.gap_tol)
            else:
                terms = resolvent_layer_terms(
                    _t(W[s_]), c.grad(s_, t), _t(U[s_]), _t(out["lr"][idx]),
                    sketch=kind if with_noise else None,
                    tensors=t if with_noise else None, grad_full=full_of(idx),
                    population=opts.population, gap_tol=opts.gap_tol,
                    grad_stats=t if kind.projected else None,
                )
            if with_noise:
                terms["coverage"] = torch.minimum(terms["coverage_u"], terms["coverage_v"])
                out["noise_proj"][idx, :b] = terms["noise_proj"].numpy()
            for k in keys:
                if k in terms and k != "noise_proj":
                    out[k][idx] = terms[k].numpy()
    if opts.operator:
        out["K_operator"] = (_operator_norms(W, lm.geometry) if lm.geometry is not None
                             else out["K"].copy())
    _forward_terms(plan, c, rows, out, ok & noisy)
    return out


def plan_optimizer(plan: Plan):
    """The run's :class:`~trajlab.sde.optimizer.OptimizerSpec` and where it was found."""
    from trajlab.analysis.assemble import resolve_optimizer

    return resolve_optimizer(plan.options.optimizer, plan_run(plan).meta.user)


def _forward_terms(plan: Plan, c: ChunkInputs, rows: tuple[int, int],
                   out: dict[str, np.ndarray], noisy: np.ndarray) -> None:
    """The layer terms of the forward prediction (docs/math.md §8): the expected-gradient flow
    (probe rows only) and the update's noise at unit coefficient. Never the realised update."""
    spec, _ = plan_optimizer(plan)
    K = out["K"]
    out["drift_decoupled"] = -spec.decoupled * K
    P = None
    if not spec.preconditioned:
        out["drift_noise_update"] = out["drift_noise"].copy()
        out["diffusion2_update"] = out["diffusion2"].copy()
        out["noise_proj_update"] = out["noise_proj"].copy()
    else:
        P = _adam_terms(plan, c, rows, out, noisy, spec)
    out["flow_expected"] = _expected_flow(plan, c, rows, spec, P)


def _expected_flow(plan: Plan, c: ChunkInputs, rows: tuple[int, int], spec, P
                   ) -> np.ndarray:
    """``-u1^T E[d_t] v1`` at the measured weights of each row, with ``E[d_t]`` the update
    of the optimizer's recursion run on expected gradients (docs/math.md §8): the probe's
    gradient, linearly interpolated (row by row) between probed rows; the recursion starts
    :func:`~trajlab.sde.optimizer.memory_rows` rows before the chunk (or at the run's first
    row). NaN where no probe is within reach or no preconditioner is known."""
    from trajlab.sde.optimizer import expected_updates, memory_rows

    n = rows[1] - rows[0]
    out = np.full(n, np.nan)
    if c.probed is None:
        return out
    run = plan_run(plan)
    r0, r1 = rows
    lo = max(0, r0 - memory_rows(spec)) if plan.every == 1 else r0
    probe_all = run.root_rows(["probe"])["probe"].astype(bool)
    later = np.flatnonzero(probe_all[r1:])
    hi = r1 + (int(later[0]) + 1 if later.size else 0)
    v = run.layer_rows(c.lm.name, ["probe_grad", "weight"], (lo, hi))
    steps = run.root_rows(["step"], (lo, hi))["step"].astype(np.int64)
    have = probe_all[lo:hi] & np.isfinite(v["probe_grad"]).all(axis=(1, 2))
    if not have.any():
        return out
    grads = v["probe_grad"].astype(np.float64)
    known = np.flatnonzero(have)
    for i in np.flatnonzero(~have):  # linear in the row between the nearest probed rows
        j = np.searchsorted(known, i)
        a, b = known[max(j - 1, 0)], known[min(j, known.size - 1)]
        w = 0.0 if a == b else (i - a) / (b - a)
        grads[i] = (1 - w) * grads[a] + w * grads[b]
    grads = grads + spec.l2 * v["weight"].astype(np.float64)
    m = r1 - lo
    Pfull = None
    if spec.preconditioned:
        if P is None:
            return out
        Pfull = torch.ones((m, *grads.shape[1:]), dtype=F64)  # rows before the chunk: unused
        Pfull[r0 - lo:] = P
    if plan.every > 1:  # the recursion between recorded rows is unknown: its small-lr limit
        Ed = _t(grads[:m]) * spec.effective_coefficient()
        if Pfull is not None:
            Ed = Ed * Pfull
    else:
        Ed = expected_updates(_t(grads[:m]), steps[:m], spec, P=Pfull)
    Ed = Ed[r0 - lo:]
    W = _t(c.vals["weight"])
    ok = torch.isfinite(W).all(-1).all(-1) & torch.isfinite(Ed).all(-1).all(-1)
    if not bool(ok.any()):
        return out
    # -u1^T E[d] v1 with the analysis's spectrum kernel (no full SVD; SVD form where the gap
    # is small): E[d] passed as the "full-data gradient" of the noise-free terms
    Wk, Ek = W[ok], Ed[ok]
    terms = resolvent_layer_terms(Wk, Ek, Ek, _t(c.vals["lr"].astype(np.float64))[ok],
                                  grad_full=Ek, gap_tol=plan.options.gap_tol)
    out[ok.numpy()] = terms["drift_flow"].numpy()
    if spec.kind == "sgd":  # no state to carry: between probes the integrals interpolate the
        out[~have[r0 - lo:r1 - lo]] = np.nan  # rate itself, as for the paper's *_sgd
    return out


def _adam_terms(plan: Plan, c: ChunkInputs, rows: tuple[int, int],
                out: dict[str, np.ndarray], noisy: np.ndarray, spec) -> torch.Tensor | None:
    """Adam's preconditioned noise terms and its preconditioner P (T, m, n) per row.

    The second moment is Adam's recursion run from the run's first step on E[g_s^2] =
    (grad L_s + lambda W_s)^2 + diag(Sigma_s) at probed rows (probe and per-sample
    information), and on the earlier steps' realised g_s^2 (unbiased for it) elsewhere; the
    step's own g^2 is always replaced by E[g^2] (docs/math.md 8). Expected second moments
    keep P consistent with the first moment rebuilt from expected gradients: a coordinate
    the batches have not hit yet has a realised v of 0 but a small nonzero grad L. Needs
    every=1 and the run recorded from step 0; exact per-sample sketches only (else NaN)."""
    from trajlab.sde.optimizer import adam_preconditioner, preconditioned_noise_terms

    run = plan_run(plan)
    first_step = int(run.root_rows(["step"], (0, 1))["step"][0])
    if plan.every != 1 or first_step != 0 or not (c.kind.per_sample and c.kind.exact):
        return None  # stays NaN
    lm, b2 = c.lm, spec.betas[1]
    r0, r1 = rows
    steps = run.root_rows(["step"], rows)["step"].astype(np.int64)
    # Adam's v before row r0, from the run's rows [0, r0) (read in pieces)
    v = torch.zeros(lm.shape, dtype=F64)
    piece = max(1, plan.chunk_rows)
    for a in range(0, r0, piece):
        b = min(r0, a + piece)
        prev = read_chunk(plan, plan.layers.index(lm), (a, b))
        g = _batch_grads(prev) + spec.l2 * np.nan_to_num(prev.vals["weight"].astype(np.float64))
        for t in range(b - a):
            sq = _expected_sq(prev, t, spec)
            v = b2 * v + (1 - b2) * (sq if sq is not None else _t(g[t]) ** 2)
    Ps = torch.full((r1 - r0, *lm.shape), float("nan"), dtype=F64)
    for i in range(r1 - r0):
        t = int(steps[i])
        sq = _expected_sq(c, i, spec)
        if sq is None and t > 0:
            sq = v / (1 - b2**t)  # no probe: the bias-corrected second moment so far
        if noisy[i] and sq is not None:
            b = int(c.batch[i])
            G = _dense_samples(c.kind, c.tensors(slice(i, i + 1), b))[0]   # (B, m, n)
            P = adam_preconditioner(v, sq, t, spec)
            Ps[i] = P
            terms = preconditioned_noise_terms(_t(c.vals["weight"][i]), P, torch.zeros_like(P),
                                               G, _t(out["lr"][i]),
                                               population=plan.options.population)
            out["drift_noise_update"][i] = float(terms["drift_noise"])
            out["diffusion2_update"][i] = float(terms["diffusion2"])
            out["noise_proj_update"][i, :b] = terms["noise_proj"].numpy()
        v = b2 * v + (1 - b2) * (sq if sq is not None else torch.zeros_like(v))
    return Ps


def _expected_sq(c: ChunkInputs, i: int, spec) -> torch.Tensor | None:
    """E[g~^2] = (grad L + lambda_L2 W)^2 + diag(Sigma) at row ``i`` of a chunk (None without
    a probe or per-sample information there)."""
    from trajlab.sde.sketch import noise_diag

    probe = c.vals.get("probe_grad")
    b = int(c.batch[i])
    if probe is None or c.probed is None or not c.probed[i] or b < 2 or not c.kind.per_sample:
        return None
    tens = c.tensors(slice(i, i + 1), b)
    one = {k: x[0] for k, x in tens.items()}
    gbar = c.kind.mean_gradient(one) if c.kind.implies_grad else _t(c.vals["grad"][i])
    sd = noise_diag(c.kind, one, gbar, batch_size=b)
    full = _t(probe[i]) + spec.l2 * _t(c.vals["weight"][i])
    return full**2 + sd


def _batch_grads(c: ChunkInputs) -> np.ndarray:
    """float64 batch gradients (T, m, n) of a chunk as stored or implied."""
    if not c.implied:
        return c.vals["grad"].astype(np.float64)
    return c.kind.implied_grad({k: c.vals[k] for k in c.kind.needs()}, c.batch)\
        .astype(np.float64)


def _dense_samples(kind, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample gradients (T, B, m, n) of an exact sketch."""
    return kind.sample_gradients(tensors)


#: Relative residual of the exact operator-norm iterations: only sigma is used, whose error is
#: about the residual squared (benchmarks/spectral.py: sigma to ~1e-12 at 1e-6, half the cost
#: of 1e-10).
SIGMA_TOL = 1e-6


def _operator_norms(W: np.ndarray, geometry: Any) -> np.ndarray:
    """Exact operator norm of each step's layer map on its input size (MATH.md §6b),
    dispatched by the layer's geometry and warm-started from step to step.

    * :class:`~trajlab.store.metadata.ConvGeometry` of a ``Conv1d``/``Conv2d``: the
      convolution with the layer's own stride, padding, dilation and padding mode
      (``"zeros"``, ``"circular"``, ``"reflect"``, ``"replicate"``), by
      :func:`trajlab.spectral.conv_opnorm_series`;
    * ``transposed=True`` (``ConvTranspose1d``/``2d``): the kernel is taken back from the
      recorded ``(C_out, C_in k)`` matrix to PyTorch's ``(C_in, C_out, *k)`` layout and
      :func:`trajlab.spectral.conv_transpose_opnorm` gives the norm of that map, with its
      ``output_padding``.

    What no kernel computes for the layer's own operator (asymmetric padding from
    ``padding="same"`` with an even kernel, an unknown geometry kind or padding mode) raises a
    ValueError naming it: a norm is never computed for another operator and relabelled.
    """
    from trajlab.spectral import conv_opnorm_series, conv_transpose_opnorm

    what = repr(geometry)
    if getattr(geometry, "kind", None) != "conv":
        raise ValueError(f"no exact operator norm is known for layer geometry {what}; analyse "
                         "with conv_definition='matrix'")
    nd = geometry.spatial_dims
    if nd not in (1, 2):
        raise ValueError(f"exact operator norms cover 1-D and 2-D convolutions, not {what}; "
                         "analyse with conv_definition='matrix'")
    if len(geometry.padding) != nd:
        raise ValueError(f"the layer pads asymmetrically (padding {geometry.padding}: "
                         "padding='same' with an even kernel), which no exact operator-norm "
                         f"kernel supports ({what}); analyse with conv_definition='matrix'")
    T = W.shape[0]
    shape = tuple(geometry.kernel_shape)
    size, stride = tuple(geometry.input_size), tuple(geometry.stride)
    padding, dilation = tuple(geometry.padding), tuple(geometry.dilation)
    if not geometry.transposed:
        series = conv_opnorm_series(_t(W).reshape(T, *shape), size, stride=stride,
                                    padding=padding, dilation=dilation,
                                    padding_mode=geometry.padding_mode, tol=SIGMA_TOL)
        return series.sigma.numpy()
    if geometry.padding_mode != "zeros":
        raise ValueError(f"a transposed convolution pads with zeros only, not {what}")
    c_in, c_out = shape[0], shape[1]
    kernels = _t(W).reshape(T, c_out, c_in, *shape[2:]).transpose(1, 2)
    out = np.full(T, np.nan)
    prev = None
    for i in range(T):
        if not bool(torch.isfinite(kernels[i]).all()):
            continue
        prev = conv_transpose_opnorm(kernels[i].contiguous(), size, stride=stride,
                                     padding=padding, dilation=dilation,
                                     output_padding=tuple(geometry.output_padding) or 0,
                                     init=prev, tol=SIGMA_TOL)
        out[i] = float(prev.sigma)
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
    run = plan_run(plan)
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
        out["K_net_batchnorm"], with_bn = batchnorm_chunk(run, rows)  # analysis/batchnorm.py
        if with_bn:
            out["K_net"] = out["K_net"] * out["K_net_batchnorm"]
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


def forward_network_chunk(plan: Plan, rows: tuple[int, int],
                          layer_results: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The ``"forward"``-stage variables of ``rows``: network rates of the forward prediction
    (docs/math.md §8) and the optimizer's transfer per row."""
    run = plan_run(plan)
    n = rows[1] - rows[0]
    out = {k: np.full(n, v.fill, dtype=v.dtype) for k, v in variables("forward").items()}
    batch = run.root_rows(["batch_size"], rows)["batch_size"].astype(np.int64)
    st = {k: np.stack([r[k] for r in layer_results], axis=-1) for k in _STACKED}
    finite = np.isfinite(st["K"]).all(-1)
    _forward_network(plan, rows, layer_results, st, out, batch, finite)
    return out


def _forward_network(plan: Plan, rows: tuple[int, int], layer_results, st, out, batch,
                     finite) -> None:
    spec, _ = plan_optimizer(plan)
    run = plan_run(plan)
    steps = run.root_rows(["step"], rows)["step"].astype(np.int64)
    for i, s in enumerate(steps):
        f, r, g = spec.transfer(int(s), first=rows[0] + i == plan.rows[0], every=plan.every)
        out["transfer_first"][i], out["transfer_rest"][i], out["transfer_gain"][i] = f, r, g
    out["transfer_ratio"][:] = 0.0 if plan.every > 1 else spec.memory
    K = st["K"]
    lr0 = st["lr"][:, :1]
    w = np.where(lr0 == 0, 1.0, st["lr"] / np.where(lr0 == 0, 1.0, lr0))
    ff = np.stack([r["flow_full_gradient"] for r in layer_results], axis=-1).astype(bool)
    out["flow_probed"] = ff.all(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        flow = (w * st["drift_flow"] / K).sum(-1)
        out["logK_flow_probe"] = np.where(out["flow_probed"], flow, np.nan)
        fe = np.stack([r["flow_expected"] for r in layer_results], axis=-1)
        out["logK_flow_expected"] = (w * fe / K).sum(-1)
        out["logK_drift_decoupled"] = -spec.decoupled * w.sum(-1)
    dn = np.stack([r["drift_noise_update"] for r in layer_results], axis=-1)
    d2 = np.stack([r["diffusion2_update"] for r in layer_results], axis=-1)
    pu = np.stack([r["noise_proj_update"] for r in layer_results], axis=1)
    for b in np.unique(batch[finite & (batch >= 2)]):
        idx = np.flatnonzero(finite & (batch == b))
        c = pu[idx, :, :b]
        good = np.isfinite(c).all(axis=(1, 2))
        idx, c = idx[good], c[good]
        if idx.size == 0:
            continue
        sgd = network_terms(_t(K[idx]), _t(st["drift"][idx]), _t(st["diffusion2"][idx]),
                            _t(st["drift_noise"][idx]), _t(np.stack(
                                [r["noise_proj"] for r in layer_results], axis=1)[idx, :, :b]),
                            _t(st["lr"][idx]), int(b), population=plan.options.population,
                            time_lr=_t(st["lr"][idx, 0]))
        out["logK_noise_sgd"][idx] = (sgd["logK_drift"] - _t(
            (w[idx] * st["drift_flow"][idx] / K[idx]).sum(-1))).numpy()
        upd = network_terms(_t(K[idx]), _t(dn[idx]), _t(d2[idx]), _t(dn[idx]), _t(c),
                            _t(st["lr"][idx]), int(b), population=plan.options.population,
                            time_lr=_t(st["lr"][idx, 0]))
        out["logK_noise_update"][idx] = upd["logK_drift"].numpy()
        out["logK_diffusion2_update"][idx] = upd["logK_diffusion2"].numpy()


def chunk_values(plan: Plan, rows: tuple[int, int], layer_results: list[dict[str, np.ndarray]],
                 net: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One step chunk's variables shaped as stored: (n, L) per layer, (n, L, B) noise_proj,
    (n,) network."""
    out: dict[str, np.ndarray] = {}
    for k in variables("layer", operator=plan.options.operator):
        out[k] = np.stack([r[k] for r in layer_results], axis=1)
    out.update(net)
    out.update(forward_network_chunk(plan, rows, layer_results))
    return out
