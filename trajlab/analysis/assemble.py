"""From per-step terms to the analysis Dataset: the series-wide integrals (one left-point
integration, :func:`trajlab.sde.integrate`) and the attributes that say what was computed.

Used by both the in-memory and the stored path of :func:`trajlab.analyze`, so the two return the
same variables and attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import xarray as xr

from trajlab.analysis.variables import VARIABLES, variables
from trajlab.sde import Z95, integrate
from trajlab.store import Run

#: Per-step variables the integrals read.
INTEGRAL_INPUTS = ("K", "dt", "pathwise_increment", "drift", "drift_optimizer", "logK",
                   "net_dt", "logK_drift", "logK_drift_optimizer", "logK_diffusion2",
                   "logK_diffusion2_blockdiag", "logK_discretization")


def _int(rate: np.ndarray, dt: np.ndarray) -> np.ndarray:
    """Left-point integral at the start of each row (first 0). A step whose rate is undefined
    (NaN: no per-sample information, a capture that failed, non-finite weights) makes the
    integral undefined from the next row on: counting it as 0 would predict silently wrong
    (a flat prediction for a run recorded with per_sample=False)."""
    return integrate(torch.from_numpy(np.asarray(rate, dtype=np.float64)),
                     torch.from_numpy(np.asarray(dt, dtype=np.float64)), at="start").numpy()


def integrals(v: Mapping[str, np.ndarray], *, every: int) -> dict[str, np.ndarray]:
    """Series-wide variables at the start of each row (first row = initial values).

    ``v`` holds :data:`INTEGRAL_INPUTS` over all rows: per-layer (T, L), network (T,).
    """
    K, dt, net_dt = v["K"], v["dt"], v["net_dt"]
    out: dict[str, np.ndarray] = {"time": _int(np.ones_like(net_dt), net_dt)}
    if every == 1:
        out["K_pathwise"] = K[0][None, :] + _int(v["pathwise_increment"], np.ones_like(K))
    else:  # increments cover one optimizer step of every `every`
        out["K_pathwise"] = np.full_like(K, np.nan)
    out["K_pred_mean"] = K[0][None, :] + _int(v["drift"] + np.nan_to_num(v["drift_optimizer"]), dt)
    out["K_pred_mean_sgd"] = K[0][None, :] + _int(v["drift"], dt)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["K_net_pathwise"] = np.prod(out["K_pathwise"], axis=1)
    z0 = v["logK"][0]
    mu_opt = v["logK_drift"] + np.nan_to_num(v["logK_drift_optimizer"])
    out["logK_pred_mean"] = z0 + _int(mu_opt, net_dt)
    out["logK_pred_mean_sgd"] = z0 + _int(v["logK_drift"], net_dt)
    out["logK_pred_var"] = _int(v["logK_diffusion2"], net_dt)
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
            "logK_pred_mean / K_pred_mean / the band: the SDE for the optimizer that was used = "
            "the paper's SGD drift + drift_optimizer (0 for plain SGD; for momentum or Adam it "
            "is the realised first-order change of the update, so the prediction then tests the "
            "second-order noise terms only). logK_pred_mean_sgd / K_pred_mean_sgd: the paper's "
            "SGD SDE alone. Noise terms model SGD's batch-gradient noise with step lr. A step "
            "whose terms are undefined (no per-sample information, a capture flagged nonfinite) "
            "makes the predictions NaN from the next step on."
        ),
    }
    if run is None:
        return attrs
    m = run.meta
    attrs["every"] = m.every
    attrs["sampler"] = m.sampler
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
    optimizer = m.user.get("optimizer") if isinstance(m.user, dict) else None
    if optimizer:
        attrs["optimizer"] = str(optimizer)
    return attrs


def k_net_statement(meta, layers) -> str:
    """What K_net covers and whether it bounds the network (from the run's model summary)."""
    from trajlab.sketches.diagonal import DIAGONAL_MODULES

    model = getattr(meta, "model", None) or {}
    covered = [lm for lm in meta.layers if lm.name in layers]
    diagonal = [lm for lm in covered if lm.sketch == "diagonal" or lm.module in DIAGONAL_MODULES]
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
    return text


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
    return ds


def store_specs(operator: bool, *, integrated: bool = True) -> dict[str, tuple]:
    """(dims, dtype, description) of every stored analysis variable."""
    out = {}
    for k, v in variables(None, operator=operator).items():
        if v.stage == "integrated" and not integrated:
            continue
        out[k] = (v.dims, v.dtype, v.description)
    return out
