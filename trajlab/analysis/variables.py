"""Every analysis variable, defined once: name, dims, dtype, meaning, and the stage computing it.

Task keys, analysis-store arrays, fill values and the in-memory Dataset are all derived from
:data:`VARIABLES`. Rates of a layer are per unit of that layer's own time ``t = sum of its
lr x every``; network rates are per unit of the network time (the first analysed layer's
``dt``), combined from per-step increments so that layers with different learning rates add up
correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Stage = Literal["layer", "network", "forward", "integrated"]
LAYER_DIMS = ("step", "layer")
NET_DIMS = ("step",)
SAMPLE_DIMS = ("step", "layer", "sample")


@dataclass(frozen=True)
class AnalysisVar:
    """One analysis variable.

    Attributes
    ----------
    name, dims, dtype, description : as stored (``description`` also in the Dataset's attrs).
    stage : ``"layer"`` (a (layer, step-chunk) task), ``"network"`` (a step-chunk task from the
        layers' results: the paper's network terms), ``"forward"`` (per step, from the same
        results: the network rates of the forward prediction, docs/math.md 8) or ``"integrated"`` (series-wide, once every chunk is done).
    needs : an analysis option that must be on for the variable to exist (``"operator"``).
    kernel : the layer kernels of :mod:`trajlab.sde` return it under this name
        (:data:`LAYER_KEYS`); else the analysis computes it around them.
    """

    name: str
    dims: tuple[str, ...]
    stage: Stage
    description: str
    dtype: str = "float64"
    needs: str | None = None
    kernel: bool = False

    @property
    def fill(self):
        return {"bool": False}.get(self.dtype, np.nan)


def _v(name, dims, stage, desc, dtype="float64", needs=None, kernel=False) -> AnalysisVar:
    return AnalysisVar(name, dims, stage, desc, dtype, needs, kernel)


def _k(name, desc, dtype="float64", dims=LAYER_DIMS) -> AnalysisVar:
    """A per-layer variable that the SDE layer kernels return (:data:`LAYER_KEYS`)."""
    return _v(name, dims, "layer", desc, dtype, kernel=True)


_L, _N, _F, _I = "layer", "network", "forward", "integrated"

VARIABLES: dict[str, AnalysisVar] = {v.name: v for v in [
    # ---- per layer, per step
    _k("K", "measured layer Lipschitz constant sigma_1(W) at the start of the "
       "step"),
    _k("spectral_gap", "relative gap (sigma_1 - sigma_2) / sigma_1"),
    _k("degenerate", "gap below the tolerance: second-order terms unreliable "
       "at this step", "bool"),
    _v("lr", LAYER_DIMS, _L, "learning rate of the layer's param group at the step"),
    _v("dt", LAYER_DIMS, _L, "time step of the layer's SDE: its lr x every (the layer's rates "
       "are per unit of this time)"),
    _v("grad_scale", LAYER_DIMS, _L, "factor the optimizer's .grad had relative to the captured "
       "per-sample gradients (clipping, loss scaling; 1 = none); already applied to every term"),
    _k("flow_full_gradient", "the flow and discretisation terms used the "
       "full-data probe gradient (else the batch gradient, debiased where it matters)", "bool"),
    _k("drift_flow", "gradient-flow drift -u1^T grad L v1 [K per unit time]"),
    _k("drift_noise", "noise-curvature drift (eta/2) tr(A^T H A) [K per unit "
       "time]"),
    _k("drift_noise_var", "part of drift_noise from gradient-noise variances "
       "[K per unit time]"),
    _k("drift_noise_cov", "part of drift_noise from gradient-noise covariances "
       "[K per unit time]"),
    _k("drift", "paper's SGD Ito drift drift_flow + drift_noise [K per unit "
       "time]"),
    _k("diffusion2", "squared diffusion s^2 = eta ||A^T vec(u1 v1^T)||^2 [K^2 "
       "per unit time]"),
    _k("diffusion2_var", "part of diffusion2 from gradient-noise variances [K^2 "
       "per unit time]"),
    _k("diffusion2_cov", "part of diffusion2 from gradient-noise covariances "
       "[K^2 per unit time]"),
    _k("drift_discretization", "deterministic second-order term of a finite "
       "step left out by the SDE, (eta/2) d2sigma1[grad L] (MATH.md 4a) [K per unit time]"),
    _k("pathwise_increment", "second-order change of K along the recorded "
       "update dsigma1[dW] + 1/2 d2sigma1[dW] [K per recorded step]"),
    _k("pathwise_first_order", "first-order change of K along the recorded "
       "update [K per recorded step]"),
    _k("drift_optimizer", "pathwise reconstruction, not a prediction: the "
       "realised update's first-order change of K beyond plain SGD's, (dsigma1[dW] + eta u1^T g "
       "v1)/eta [K per unit time]"),
    _v("flow_expected", LAYER_DIMS, _L, "expected-gradient drift of the optimizer's update at "
       "unit coefficient, -u1^T P*(grad L + lambda_L2 W) v1 (P = Adam's preconditioner, else 1), "
       "grad L from the full-data probe; NaN where no probe ran (docs/math.md 8) [K per unit "
       "time]"),
    _v("drift_noise_update", LAYER_DIMS, _L, "noise-curvature drift of the update's noise "
       "P*Omega at unit coefficient (= drift_noise without a preconditioner) [K per unit time]"),
    _v("diffusion2_update", LAYER_DIMS, _L, "squared diffusion of the update's noise P*Omega at "
       "unit coefficient (= diffusion2 without a preconditioner) [K^2 per unit time]"),
    _v("drift_decoupled", LAYER_DIMS, _L, "AdamW's decoupled weight decay -lambda K (0 "
       "otherwise) [K per unit time]"),
    _v("coverage", LAYER_DIMS, _L, "min(||U^T u1||, ||V^T v1||): how much of the top singular "
       "pair the per-sample sketch holds (1 = exact)"),
    _v("K_operator", LAYER_DIMS, _L, "exact operator norm of the layer's linear map on its "
       "input size (convolutions: MATH.md 6b; other layers: = K)", needs="operator"),
    _k("noise_proj", "per-sample noise projection c_i = u1^T Omega_i v1", dims=SAMPLE_DIMS),
    _v("noise_proj_update", SAMPLE_DIMS, _L, "per-sample projection u1^T (P*Omega_i) v1 of the "
       "update's noise (= noise_proj without a preconditioner)"),
    # ---- network, per step
    _v("batch_size", NET_DIMS, _N, "batch size B of the step"),
    _v("net_dt", NET_DIMS, _N, "time step of the network SDE: the first analysed layer's lr "
       "x every (network rates are per unit of this time; `time` is its running sum)"),
    _v("K_net", NET_DIMS, _N, "product of the analysed layers' K, times K_net_batchnorm where "
       "the network is a chain (see attrs 'k_net' for what it covers and whether it bounds the "
       "network)"),
    _v("K_net_batchnorm", NET_DIMS, _N, "product over the BatchNorm layers of their eval-mode "
       "Lipschitz factor max_c |gamma_c|/sqrt(running_var_c + eps) (1 without BatchNorm); no "
       "SDE terms"),
    _v("logK", NET_DIMS, _N, "Z = sum_l log K_l over the analysed layers (log K_net without "
       "BatchNorm factors): the state of the SDE"),
    _v("logK_drift", NET_DIMS, _N, "paper's SGD drift mu_Z of log K_net [per unit time]"),
    _v("logK_diffusion2", NET_DIMS, _N, "squared diffusion sigma_Z^2 of log K_net, full form "
       "with the cross-layer noise covariance [per unit time]"),
    _v("logK_diffusion2_blockdiag", NET_DIMS, _N, "sigma_Z^2 under the paper's Assumption 3 "
       "(independent layer noise) [per unit time]"),
    _v("logK_noise_curvature", NET_DIMS, _N, "kappa_Z = sum_l drift_noise_l / K_l, "
       "noise-curvature part of mu_Z [per unit time]"),
    _v("logK_drift_optimizer", NET_DIMS, _N, "pathwise reconstruction: sum_l drift_optimizer_l / "
       "K_l, what the realised update "
       "(weight decay, momentum, Adam) adds to the SGD drift of log K_net [per unit time]"),
    _v("logK_discretization", NET_DIMS, _N, "finite-step second-order term for log K_net left "
       "out by the SDE [per unit time]"),
    _v("flow_probed", NET_DIMS, _F, "every analysed layer's flow used the full-data probe "
       "at this step", "bool"),
    _v("logK_flow_probe", NET_DIMS, _F, "sum_l drift_flow_l / K_l where the probe ran (NaN "
       "elsewhere): the paper's gradient-flow drift of log K_net with grad L itself [per unit "
       "time]"),
    _v("logK_noise_sgd", NET_DIMS, _F, "noise part of mu_Z, sum_l [drift_noise_l / K_l - "
       "s_l^2 / (2 K_l^2)] [per unit time]"),
    _v("logK_flow_expected", NET_DIMS, _F, "sum_l flow_expected_l / K_l [per unit time]"),
    _v("logK_noise_update", NET_DIMS, _F, "noise part of the drift of log K_net from the "
       "update's noise at unit coefficient [per unit time]"),
    _v("logK_diffusion2_update", NET_DIMS, _F, "sigma_Z^2 (full form) of the update's noise at "
       "unit coefficient [per unit time]"),
    _v("logK_drift_decoupled", NET_DIMS, _F, "AdamW's decoupled decay, -lambda per layer "
       "[per unit time]"),
    _v("transfer_first", NET_DIMS, _F, "c_{s,0}: weight with which a gradient entering at this "
       "step moves the weights at this step (docs/math.md 8)"),
    _v("transfer_rest", NET_DIMS, _F, "c_{s,k} / ratio^k, k >= 1: weight at later steps"),
    _v("transfer_gain", NET_DIMS, _F, "gain of the update at this step (Adam's 1 / (1 - "
       "beta1^(t+1)), else 1)"),
    _v("transfer_ratio", NET_DIMS, _F, "memory ratio of the optimizer's fast state (momentum, "
       "beta1; 0 for SGD)"),
    _v("K_net_operator", NET_DIMS, _N, "product of the layers' exact operator norms "
       "K_operator", needs="operator"),
    # ---- integrated over the series
    _v("time", NET_DIMS, _I, "network time t = running sum of dt at the start of each step"),
    _v("K_pathwise", LAYER_DIMS, _I, "K reconstructed from K(0) by summing pathwise_increment"),
    _v("K_pred_mean", LAYER_DIMS, _I, "forward prediction of E[K] for the optimizer that was "
       "used (docs/math.md 8): terms at the measured weights, grad L from the probe, the "
       "optimizer's fast state rebuilt from expected gradients; never the realised update"),
    _v("K_pred_mean_sgd", LAYER_DIMS, _I, "K(0) + int (flow from the probe + drift_noise) dt: "
       "the paper's SGD SDE"),
    _v("K_net_pathwise", NET_DIMS, _I, "prod_l K_pathwise"),
    _v("logK_pred_mean", NET_DIMS, _I, "forward prediction of E[Z(t)] for the optimizer that "
       "was used (docs/math.md 8; attrs 'theory'); never contains the realised update"),
    _v("logK_pred_mean_sgd", NET_DIMS, _I, "predicted E[Z(t)] = Z(0) + int mu_Z dt of the "
       "paper's SGD SDE, flow from the full-data probe"),
    _v("logK_pred_var", NET_DIMS, _I, "forward prediction of Var[Z(t)] for the optimizer that "
       "was used (full form, the noise carried by the optimizer's fast state)"),
    _v("logK_pred_var_sgd", NET_DIMS, _I, "predicted Var[Z(t)] = int sigma_Z^2 dt of the "
       "paper's SGD SDE (full form)"),
    _v("logK_pred_var_blockdiag", NET_DIMS, _I, "predicted Var[Z(t)] of the paper's SGD SDE "
       "with the block-diagonal sigma_Z^2"),
    _v("logK_discretization_integral", NET_DIMS, _I, "int logK_discretization dt"),
    _v("K_net_pred_lower", NET_DIMS, _I, "lower end of the predicted 95% band "
       "exp(logK_pred_mean - z sqrt(logK_pred_var)), z = 1.959964"),
    _v("K_net_pred_upper", NET_DIMS, _I, "upper end of the predicted 95% band "
       "exp(logK_pred_mean + z sqrt(logK_pred_var))"),
]}


#: Which theory each variable belongs to: "sgd" (the paper's SDE for SGD), "optimizer" (the SDE
#: of the optimizer that was used, named per run by :func:`theory_of`) or "pathwise" (the
#: pathwise reconstruction from the realised updates: a measurement, not a prediction).
THEORY: dict[str, str] = {
    **dict.fromkeys((
        "drift_flow", "drift_noise", "drift_noise_var", "drift_noise_cov", "drift",
        "diffusion2", "diffusion2_var", "diffusion2_cov", "drift_discretization", "noise_proj",
        "logK_drift", "logK_diffusion2", "logK_diffusion2_blockdiag", "logK_noise_curvature",
        "logK_discretization", "logK_flow_probe", "logK_noise_sgd", "K_pred_mean_sgd",
        "logK_pred_mean_sgd", "logK_pred_var_sgd", "logK_pred_var_blockdiag",
        "logK_discretization_integral"), "sgd"),
    **dict.fromkeys((
        "flow_expected", "drift_noise_update", "diffusion2_update", "noise_proj_update",
        "drift_decoupled", "logK_flow_expected", "logK_noise_update", "logK_diffusion2_update",
        "logK_drift_decoupled", "transfer_first", "transfer_rest", "transfer_gain",
        "transfer_ratio", "K_pred_mean", "logK_pred_mean", "logK_pred_var", "K_net_pred_lower",
        "K_net_pred_upper"), "optimizer"),
    **dict.fromkeys((
        "pathwise_increment", "pathwise_first_order", "drift_optimizer",
        "logK_drift_optimizer", "K_pathwise", "K_net_pathwise"), "pathwise"),
}


def theory_of(name: str, optimizer_theory: str) -> str | None:
    """The theory label of variable ``name`` (None for measurements such as K), with
    ``optimizer_theory`` the SDE of the run's optimizer
    (:attr:`trajlab.sde.optimizer.OptimizerSpec.theory`)."""
    from trajlab.sde.optimizer import THEORY_PATHWISE, THEORY_SGD

    which = THEORY.get(name)
    return {"sgd": THEORY_SGD, "optimizer": optimizer_theory,
            "pathwise": THEORY_PATHWISE}.get(which) if which else None


def variables(stage: Stage | None = None, *, operator: bool = False) -> dict[str, AnalysisVar]:
    """The variables of one stage (all stages when None) for the given options."""
    return {k: v for k, v in VARIABLES.items()
            if (stage is None or v.stage == stage) and (v.needs is None or operator)}


def describe(name: str) -> str:
    """The description of a variable ('' if unknown)."""
    v = VARIABLES.get(name)
    return v.description if v is not None else ""


#: The keys every layer kernel of :mod:`trajlab.sde` returns with a noise estimate
#: (:func:`~trajlab.sde.layer_terms`, :func:`~trajlab.sde.resolvent_layer_terms`,
#: :func:`~trajlab.sde.diagonal_layer_terms`; their shared end terms come from
#: :func:`~trajlab.sde.layer_epilogue`): the registry's ``kernel`` variables. Kernels may return
#: more (``alignment``, ``coverage_u``/``coverage_v``), which are no analysis variables.
LAYER_KEYS: tuple[str, ...] = tuple(k for k, v in VARIABLES.items() if v.kernel)

#: Back-compatible views: name -> description.
LAYER_VARIABLES: dict[str, str] = {k: v.description for k, v in VARIABLES.items()
                                   if v.dims == LAYER_DIMS}
NETWORK_VARIABLES: dict[str, str] = {k: v.description for k, v in VARIABLES.items()
                                     if v.dims == NET_DIMS}
