"""From per-step terms to the analysis Dataset: the series-wide integrals (one left-point
integration, :func:`trajlab.sde.integrate`) and the attributes that say what was computed.

Used by both the in-memory and the stored path of :func:`trajlab.analyze`, so the two return the
same variables and attributes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import xarray as xr

from trajlab.analysis.batchnorm import batchnorm_statement
from trajlab.analysis.variables import VARIABLES, theory_of, variables
from trajlab.sde import Z95, integrate
from trajlab.sde.optimizer import OptimizerSpec, forward_prediction
from trajlab.store import Run


def parse_optimizer(text: str) -> OptimizerSpec:
    """An :class:`OptimizerSpec` from a kind name or its JSON (``AnalysisOptions.optimizer``)."""
    text = str(text).strip()
    if text.startswith("{"):
        return OptimizerSpec.from_dict(json.loads(text))
    if text == "momentum":
        return OptimizerSpec("momentum", momentum=0.9)
    return OptimizerSpec(text)  # type: ignore[arg-type]


def resolve_optimizer(option: str | None, user: Mapping[str, Any] | None
                      ) -> tuple[OptimizerSpec, str]:
    """The optimizer of a run and where it was found: the analysis option, the run metadata's
    ``optimizer_spec`` (a dict of :meth:`OptimizerSpec.to_dict`), a recipe's ``config``, or
    plain SGD assumed (said so)."""
    if option:
        return parse_optimizer(option), "the analysis option"
    user = user if isinstance(user, Mapping) else {}
    if isinstance(user.get("optimizer_spec"), Mapping):
        return OptimizerSpec.from_dict(dict(user["optimizer_spec"])), "the run's metadata"
    cfg = user.get("config")
    if isinstance(cfg, Mapping) and "optimizer" in cfg:
        return OptimizerSpec.from_recipe(dict(cfg)), "the recipe's TrainConfig"
    return OptimizerSpec(), ("not recorded: plain SGD assumed (pass "
                             "AnalysisOptions(optimizer=...) or record metadata "
                             "{'optimizer_spec': OptimizerSpec.from_optimizer(opt).to_dict()})")


#: Per-step variables the integrals read.
INTEGRAL_INPUTS = ("K", "dt", "pathwise_increment", "drift", "drift_flow", "drift_noise",
                   "flow_full_gradient", "flow_expected", "drift_noise_update",
                   "drift_decoupled", "logK", "net_dt", "logK_drift", "logK_diffusion2",
                   "logK_diffusion2_blockdiag", "logK_discretization", "flow_probed",
                   "logK_flow_probe", "logK_noise_sgd", "logK_flow_expected",
                   "logK_noise_update", "logK_diffusion2_update", "logK_drift_decoupled",
                   "transfer_first", "transfer_rest", "transfer_gain", "transfer_ratio")


def _int(rate: np.ndarray, dt: np.ndarray) -> np.ndarray:
    """Left-point integral at the start of each row (first 0). A step whose rate is undefined
    (NaN: no per-sample information, a capture that failed, non-finite weights) makes the
    integral undefined from the next row on: counting it as 0 would predict silently wrong
    (a flat prediction for a run recorded with per_sample=False)."""
    return integrate(torch.from_numpy(np.asarray(rate, dtype=np.float64)),
                     torch.from_numpy(np.asarray(dt, dtype=np.float64)), at="start").numpy()


def fill_probe_gaps(x: np.ndarray, probed: np.ndarray, time: np.ndarray) -> np.ndarray:
    """``x`` at the probed rows, linearly interpolated in ``time`` between them (held
    constant before the first and after the last) at the rows without a probe; all NaN
    without any probe. A probed row whose value is NaN stays NaN (an undefined step).
    Columns (layers) are filled independently."""
    x = np.asarray(x, dtype=np.float64)
    probed = np.asarray(probed, dtype=bool)
    if x.ndim == 2:
        return np.stack([fill_probe_gaps(x[:, j], probed[:, j], time)
                         for j in range(x.shape[1])], axis=1)
    out = np.where(probed, x, np.nan)
    known = probed & np.isfinite(x)
    if not known.any():
        return out
    gaps = ~probed
    out[gaps] = np.interp(time[gaps], time[known], x[known])
    return out


def _defined(x: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Rows whose value stands (computed, or undefined because the step is): the others (no
    expected gradient within reach) are interpolated by :func:`fill_probe_gaps`."""
    return np.isfinite(x) | ~np.isfinite(K)


def integrals(v: Mapping[str, np.ndarray], *, every: int) -> dict[str, np.ndarray]:
    """Series-wide variables at the start of each row (first row = initial values).

    ``v`` holds :data:`INTEGRAL_INPUTS` over all rows: per-layer (T, L), network (T,).
    Predictions (``*_pred*``) are forward predictions (docs/math.md §8): the flow comes from
    the full-data probe (interpolated between probed rows), never from the step's batch
    gradient or update; without any probe they are NaN.
    """
    K, dt, net_dt = v["K"], v["dt"], v["net_dt"]
    out: dict[str, np.ndarray] = {"time": _int(np.ones_like(net_dt), net_dt)}
    time = out["time"]
    if every == 1:
        out["K_pathwise"] = K[0][None, :] + _int(v["pathwise_increment"], np.ones_like(K))
    else:  # increments cover one optimizer step of every `every`
        out["K_pathwise"] = np.full_like(K, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["K_net_pathwise"] = np.prod(out["K_pathwise"], axis=1)
    transfer = (v["transfer_first"], v["transfer_rest"], v["transfer_gain"],
                float(np.nan_to_num(v["transfer_ratio"][0])))
    probed = np.asarray(v["flow_full_gradient"], dtype=bool)
    # the expected update's drift is already the optimizer's (its recursion run on expected
    # gradients); only the noise is carried forward by the transfer weights (docs/math.md 8)
    flow = fill_probe_gaps(v["flow_expected"], _defined(v["flow_expected"], K), time)
    zero = np.zeros_like(flow)
    mean, _ = forward_prediction(zero, v["drift_noise_update"], zero, dt, transfer=transfer,
                                 direct=flow + v["drift_decoupled"])
    out["K_pred_mean"] = K[0][None, :] + mean
    flow_sgd = fill_probe_gaps(np.where(probed, v["drift_flow"], np.nan), probed, time)
    out["K_pred_mean_sgd"] = K[0][None, :] + _int(flow_sgd + v["drift_noise"], dt)
    z0 = v["logK"][0]
    net_probed = np.asarray(v["flow_probed"], dtype=bool)
    lflow = fill_probe_gaps(v["logK_flow_expected"],
                            _defined(v["logK_flow_expected"], v["logK"]), time)
    zero = np.zeros_like(lflow)
    mean, var = forward_prediction(zero, v["logK_noise_update"], v["logK_diffusion2_update"],
                                   net_dt, transfer=transfer,
                                   direct=lflow + v["logK_drift_decoupled"])
    out["logK_pred_mean"] = z0 + mean
    out["logK_pred_var"] = var
    out["logK_pred_mean_sgd"] = z0 + _int(
        fill_probe_gaps(v["logK_flow_probe"], net_probed, time) + v["logK_noise_sgd"], net_dt)
    out["logK_pred_var_sgd"] = _int(v["logK_diffusion2"], net_dt)
    out["logK_pred_var_blockdiag"] = _int(v["logK_diffusion2_blockdiag"], net_dt)
    out["logK_discretization_integral"] = _int(v["logK_discretization"], net_dt)
    sd = np.sqrt(np.maximum(out["logK_pred_var"], 0.0))
    out["K_net_pred_lower"] = np.exp(out["logK_pred_mean"] - Z95 * sd)
    out["K_net_pred_upper"] = np.exp(out["logK_pred_mean"] + Z95 * sd)
    return out


def dataset_attrs(run: Run | None, meta: Mapping[str, Any]) -> dict[str, Any]:
    """What the analysis computed and how to read it (identical for both paths).

    ``meta`` is the analysis metadata as a dict (:meth:`AnalysisMeta.to_dict`).
    """
    opts = meta["options"]
    attrs: dict[str, Any] = {
        "trajlab": "analysis",
        "run": str(meta["run"]),
        "run_id": meta["run_id"],
        "layers_analysed": ", ".join(meta["layers"]),
        "conv_definition": (
            "matrix: convolution kernels reshaped to C_out x C_in*prod(kernel) (MATH.md 6a) for "
            "K and every SDE term"
            + ("; K_operator / K_net_operator: exact operator norm of each layer's linear map "
               "on its input size (MATH.md 6b)" if opts.get("conv_definition") == "operator"
               else "")
        ),
        "population": str(opts.get("population")),
        "time_unit": "layer rates: per unit of the layer's time (sum of its lr x every); network "
        "rates and `time`: per unit of the first analysed layer's time",
        "estimator": "Sigma ~ 1/(B(B-1)) sum_i Omega_i Omega_i^T"
        + (f" x (N-B)/N, N={opts['population']}" if opts.get("population") else ""),
        "prediction": (
            "logK_pred_mean / logK_pred_var / K_pred_mean / the K_net_pred band: a forward "
            "prediction (docs/math.md 8) with the SDE of the optimizer that was used (attrs "
            "'optimizer_theory'): terms at the measured weights, grad L from the full-data "
            "probe (linearly interpolated in time between probed steps), the noise covariance "
            "from the per-sample information, the optimizer's fast state rebuilt from expected "
            "gradients; the step's realised batch gradient and update never enter. Without a "
            "probe they are NaN: record with a FullGradientProbe (every k steps). "
            "*_pred_*_sgd: the paper's SGD SDE. K_pathwise, drift_optimizer: the pathwise "
            "reconstruction from the realised updates, a measurement. A step whose terms are "
            "undefined makes the predictions NaN from the next step on."
        ),
    }
    spec, source = resolve_optimizer(opts.get("optimizer"),
                                     getattr(getattr(run, "meta", None), "user", None))
    attrs["optimizer_theory"] = spec.theory
    attrs["optimizer_spec"] = spec.to_json()
    attrs["optimizer_source"] = source
    attrs["theory"] = json.dumps({k: theory_of(k, spec.theory) for k in VARIABLES
                                  if theory_of(k, spec.theory)}, sort_keys=True)
    if run is None:
        return attrs
    m = run.meta
    attrs["every"] = m.every
    attrs["sampler"] = m.sampler
    if run.n_steps and m.layers:
        scale = run.layer_rows(m.layers[0].name, ["grad_scale"])["grad_scale"]
        clipped = int((np.asarray(scale, dtype=np.float64) < 1).sum())
        if clipped:
            attrs["prediction"] += (
                f" Gradient clipping scaled the update at {clipped} of {run.n_steps} recorded "
                "steps: the forward prediction does not model clipping's batch-dependent factor "
                "(docs/math.md 8b), so it overstates the flow there.")
    probed = int(run.root_rows(["probe"])["probe"].sum()) if run.meta.probe else 0
    if opts.get("gradient") == "batch" or probed == 0:
        attrs["gradient"] = "batch gradient"
    else:
        attrs["gradient"] = f"full-data probe gradient at {probed} steps, batch gradient elsewhere"
    from trajlab.sketches import sketch_kind

    no_noise = [lm.name for lm in m.layers if lm.name in meta["layers"]
                and not sketch_kind(lm.sketch).per_sample]
    attrs["noise"] = ("absent for layers " + ", ".join(no_noise) + ": recorded without "
                      "per-sample information (per_sample=False); their noise terms, the network "
                      "drift/diffusion and the predictions are NaN" if no_noise else
                      "estimated from the recorded per-sample gradients")
    attrs["k_net"] = k_net_statement(m, meta["layers"])
    spec, _ = resolve_optimizer(opts.get("optimizer"), m.user)
    if spec.preconditioned:
        inexact = [lm.name for lm in m.layers if lm.name in meta["layers"]
                   and not (sketch_kind(lm.sketch).per_sample and sketch_kind(lm.sketch).exact)]
        why = []
        if inexact:
            why.append("layers " + ", ".join(inexact) + " have no exact per-sample sketch "
                       "(Adam's preconditioned noise P*Omega needs the per-sample gradients)")
        if m.every != 1:
            why.append(f"every={m.every} (Adam's second moment is rebuilt step by step)")
        if why:
            attrs["prediction_unavailable"] = ("the Adam prediction is NaN: " + "; ".join(why)
                                               + " (docs/math.md 8)")
    optimizer = m.user.get("optimizer") if isinstance(m.user, dict) else None
    if optimizer:
        attrs["optimizer"] = str(optimizer)
    return attrs


def k_net_statement(meta, layers) -> str:
    """What K_net covers and whether it bounds the network (from the run's model summary)."""
    from trajlab.sketches import sketch_kind
    from trajlab.sketches.diagonal import DIAGONAL_MODULES

    model = getattr(meta, "model", None) or {}
    covered = [lm for lm in meta.layers if lm.name in layers]
    diagonal = [lm for lm in covered
                if sketch_kind(lm.sketch).diagonal or lm.module in DIAGONAL_MODULES]
    params = sum(lm.shape[0] * lm.shape[1] for lm in covered if lm not in diagonal)
    text = f"product of sigma_1 over {len(covered)} matrices ({', '.join(layers)})"
    total = model.get("weight_parameters")
    if total:
        text += f": {params} of the model's {total} weight-matrix parameters"
        text += f" ({100 * params / total:.0f}%)"
        if diagonal:
            text += f" and {len(diagonal)} normalisation scales"
    reasons = list(model.get("not_a_bound", []))
    if total and params < total:
        reasons.append("it leaves out weight matrices that were not analysed")
    if reasons:
        text += ". NOT a Lipschitz bound of this network: " + "; ".join(reasons)
    else:
        text += (". A Lipschitz bound of the network only if it is a feed-forward chain of "
                 "these layers with 1-Lipschitz activations (no residual connections, "
                 "attention or normalisation)")
    return text + batchnorm_statement(meta)


def build_dataset(values: Mapping[str, np.ndarray], *, steps: np.ndarray, layers,
                  attrs: Mapping[str, Any]) -> xr.Dataset:
    """The Dataset both paths return: every variable with its description, coords step, time,
    layer."""
    data = {}
    for k, arr in values.items():
        if k in ("time", "_done"):
            continue
        spec = VARIABLES.get(k)
        dims = spec.dims if spec is not None else (("step", "layer") if np.ndim(arr) == 2
                                                   else ("step",))
        desc = spec.description if spec is not None else ""
        data[k] = xr.Variable(dims, arr, attrs={"description": desc})
    ds = xr.Dataset(data, coords={"step": np.asarray(steps), "layer": list(layers),
                                  "time": ("step", values["time"])})
    ds["time"].attrs["description"] = VARIABLES["time"].description
    ds.attrs.update(attrs)
    return annotate(ds)


def annotate(ds: xr.Dataset) -> xr.Dataset:
    """Set ``attrs["theory"]`` of every prediction, SDE-term and pathwise variable of an
    analysis Dataset (in place; returned), from its ``optimizer_theory`` attribute: "SDE for
    SGD (paper)", the optimizer's SDE, or "pathwise reconstruction"."""
    opt = ds.attrs.get("optimizer_theory")
    if opt is None:
        from trajlab.sde.optimizer import THEORY_SGD

        opt = THEORY_SGD
    for k in ds.variables:
        t = theory_of(str(k), opt)
        if t is not None:
            ds[k].attrs["theory"] = t
    return ds


def store_specs(operator: bool, *, integrated: bool = True) -> dict[str, tuple]:
    """(dims, dtype, description) of every stored analysis variable."""
    out = {}
    for k, v in variables(None, operator=operator).items():
        if v.stage == "integrated" and not integrated:
            continue
        out[k] = (v.dims, v.dtype, v.description)
    return out
