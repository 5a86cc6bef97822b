"""Names, dimensions and meanings of the analysis variables (defined once, used everywhere)."""

from __future__ import annotations

#: Per-layer, per-step variables (dims: step, layer), with their meanings and units.
LAYER_VARIABLES: dict[str, str] = {
    "K": "measured layer Lipschitz constant sigma_1(W) at the start of the step",
    "spectral_gap": "relative gap (sigma_1 - sigma_2) / sigma_1",
    "degenerate": "gap below the tolerance: second-order terms unreliable at this step",
    "flow_full_gradient": "the flow and discretisation terms used the full-data probe gradient "
    "(else the batch gradient, debiased where it matters)",
    "drift_flow": "gradient-flow drift -u1^T grad L v1 [K per unit time]",
    "drift_noise": "noise-curvature drift (eta/2) tr(A^T H A) [K per unit time]",
    "drift_noise_var": "part of drift_noise from gradient-noise variances [K per unit time]",
    "drift_noise_cov": "part of drift_noise from gradient-noise covariances [K per unit time]",
    "drift": "total Ito drift drift_flow + drift_noise [K per unit time]",
    "diffusion2": "squared diffusion s^2 = eta ||A^T vec(u1 v1^T)||^2 [K^2 per unit time]",
    "diffusion2_var": "part of diffusion2 from gradient-noise variances [K^2 per unit time]",
    "diffusion2_cov": "part of diffusion2 from gradient-noise covariances [K^2 per unit time]",
    "drift_discretization": "deterministic second-order term of a finite step left out by the "
    "SDE, (eta/2) d2sigma1[grad L] (MATH.md 4a) [K per unit time]",
    "pathwise_increment": "second-order change of K along the recorded update "
    "dsigma1[dW] + 1/2 d2sigma1[dW] [K per step]",
    "pathwise_first_order": "first-order change of K along the recorded update [K per step]",
    "drift_optimizer": "first-order drift the optimizer adds to plain SGD, (dsigma1[dW] + eta "
    "u1^T g v1)/eta: 0 for SGD, -lambda K for weight decay lambda; NOT in drift (the paper's "
    "SGD SDE) [K per unit time]",
    "coverage": "min(||U^T u1||, ||V^T v1||): how much of the top singular pair the per-sample "
    "sketch holds (1 = exact)",
    "K_operator": "exact operator norm of the layer's linear map on its input size (Conv2d: "
    "MATH.md 6b; Linear: = K); only with conv_definition='operator'",
    "K_pathwise": "K reconstructed from K(0) by summing pathwise_increment",
    "K_pred_mean": "K(0) + int drift dt: the SDE's expected K with the drift evaluated along "
    "the recorded trajectory",
}

#: Network-level variables (dims: step).
NETWORK_VARIABLES: dict[str, str] = {
    "lr": "learning rate eta of the step",
    "batch_size": "batch size B of the step",
    "K_net": "measured network bound prod_l K_l",
    "logK": "Z = log K_net",
    "logK_drift": "drift mu_Z of log K_net [per unit time]",
    "logK_diffusion2": "squared diffusion sigma_Z^2 of log K_net, full form with the cross-layer "
    "noise covariance [per unit time]",
    "logK_diffusion2_blockdiag": "sigma_Z^2 under the paper's Assumption 3 (independent layer "
    "noise) [per unit time]",
    "logK_noise_curvature": "kappa_Z = sum_l drift_noise_l / K_l, noise-curvature part of mu_Z "
    "[per unit time]",
    "logK_drift_optimizer": "sum_l drift_optimizer_l / K_l: what the optimizer (weight decay, "
    "momentum, Adam) adds to the drift of log K_net, not in logK_drift [per unit time]",
    "logK_discretization": "finite-step second-order term for log K_net left out by the SDE "
    "[per unit time]",
    "logK_pred_mean": "predicted E[Z(t)] = Z(0) + int mu_Z dt (coefficients as given)",
    "logK_pred_var": "predicted Var[Z(t)] = int sigma_Z^2 dt (full form)",
    "logK_pred_var_blockdiag": "predicted Var[Z(t)] with the block-diagonal sigma_Z^2",
    "logK_discretization_integral": "int logK_discretization dt",
    "K_net_pred_lower": "lower end of the predicted 95% band exp(mean - 1.96 sqrt(var))",
    "K_net_pred_upper": "upper end of the predicted 95% band exp(mean + 1.96 sqrt(var))",
    "K_net_pathwise": "prod_l K_pathwise",
    "K_net_operator": "prod_l K_operator: a true Lipschitz bound of a conv network "
    "(only with conv_definition='operator')",
}

#: Per-layer keys computed by the layer task (the rest of LAYER_VARIABLES is integrated later).
LAYER_TASK_KEYS: tuple[str, ...] = tuple(
    k for k in LAYER_VARIABLES if k not in ("K_pathwise", "K_pred_mean", "K_operator")
)
#: Network keys computed by the network task.
NETWORK_TASK_KEYS: tuple[str, ...] = (
    "lr", "batch_size", "K_net", "logK", "logK_drift", "logK_diffusion2",
    "logK_diffusion2_blockdiag", "logK_noise_curvature", "logK_discretization",
    "logK_drift_optimizer",
)
#: Keys integrated over the whole series once every chunk is done.
INTEGRATED_KEYS: tuple[str, ...] = (
    "time", "K_pathwise", "K_pred_mean", "K_net_pathwise", "logK_pred_mean", "logK_pred_var",
    "logK_pred_var_blockdiag", "logK_discretization_integral", "K_net_pred_lower",
    "K_net_pred_upper",
)
