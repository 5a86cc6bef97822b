"""Network-level dynamics of ``Z = log K_net = sum_l log K_l`` (MATH.md §4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trajlab.sde.layer import noise_scale

__all__ = ["NETWORK_KEYS", "batchnorm_factors", "network_terms"]

#: Keys returned by :func:`network_terms` (``logK_discretization`` only when its inputs are given).
NETWORK_KEYS: tuple[str, ...] = (
    "K_net", "logK", "logK_drift", "logK_diffusion2", "logK_diffusion2_blockdiag",
    "logK_noise_curvature", "logK_discretization",
)


def network_terms(
    K: Tensor,
    drift: Tensor,
    diffusion2: Tensor,
    drift_noise: Tensor,
    noise_proj: Tensor,
    lr: float | Tensor,
    batch_size: int,
    *,
    population: int | None = None,
    drift_flow: Tensor | None = None,
    drift_discretization: Tensor | None = None,
    flow_full_gradient: Tensor | None = None,
    time_lr: float | Tensor | None = None,
) -> dict[str, Tensor]:
    """Drift and diffusion of ``Z = log K_net`` from the layers' terms (MATH.md §4).

    Parameters
    ----------
    K, drift, diffusion2, drift_noise : Tensor (..., L)
        Per-layer ``K_l``, ``mu_l``, ``s_l^2`` and ``mu_noise,l`` (:func:`layer_terms` keys
        ``K``, ``drift``, ``diffusion2``, ``drift_noise``), layers on the last dimension.
    noise_proj : Tensor (..., L, B)
        ``c_li = u_1^T Omega_li v_1``; sample i must be the same sample in every layer.
    lr : float or Tensor (...) or (..., L)
        Learning rate of the step, or of each layer's param group (layers on the last
        dimension). Each layer's terms are rates in its own time (dt = its lr).
    batch_size : int
    population : int, optional
        As in :func:`layer_terms` (use the same value there).
    drift_flow, drift_discretization : Tensor (..., L), optional
        Given together, they add ``logK_discretization``.
    flow_full_gradient : Tensor (..., L) of bool, optional
        Where the flow term used the full-data gradient (:func:`layer_terms` key
        ``flow_full_gradient``). Elsewhere (default: everywhere) the batch gradient's noise is
        removed from the squared flow, which is then unbiased (E[(u1^T g v1)^2] exceeds
        (u1^T grad L v1)^2 by s^2 / eta).
    time_lr : float or Tensor (...), optional
        Learning rate that defines the network's time (default: ``lr`` when it is per step,
        else the first layer's). With per-layer ``lr``, the network terms are built from each
        layer's per-step increments (rate x its lr) and returned per unit of this time, so that
        layers with different learning rates combine correctly.

    Returns
    -------
    dict of str to Tensor (...)
        K_net : ``prod_l K_l`` (computed as ``exp(logK)``).
        logK : ``Z = sum_l log K_l``.
        logK_drift : ``mu_Z = sum_l [mu_l / K_l - s_l^2 / (2 K_l^2)]``.
        logK_diffusion2 : full form ``eta / (B (B - 1)) sum_i (sum_l c_li / K_l)^2`` (times fpc):
            the same sample drives every layer.
        logK_diffusion2_blockdiag : paper form ``sum_l s_l^2 / K_l^2`` (independent layers).
        logK_noise_curvature : ``kappa_Z = sum_l mu_noise,l / K_l`` (>= 0).
        logK_discretization : rate of the deterministic second-order part of a real step that
            the SDE leaves out (§4a), for log K:
            ``sum_l [drift_discretization_l / K_l - eta drift_flow_l^2 / (2 K_l^2)]``
            (per step: times eta).
    """
    _, scale = noise_scale(batch_size, population)
    eta = torch.as_tensor(lr, dtype=K.dtype, device=K.device)
    if noise_proj.shape[:-1] != K.shape:
        raise ValueError(f"noise_proj {tuple(noise_proj.shape)} must be K's shape "
                         f"{tuple(K.shape)} plus a sample dimension")
    if noise_proj.shape[-1] != batch_size:
        raise ValueError(f"noise_proj holds {noise_proj.shape[-1]} samples, "
                         f"batch_size={batch_size}")
    if eta.dim() and eta.shape == K.shape:  # per-layer learning rates
        eta_layer = eta
        ref = eta[..., 0] if time_lr is None else torch.as_tensor(time_lr, dtype=K.dtype,
                                                                   device=K.device)
    else:
        ref = eta if time_lr is None else torch.as_tensor(time_lr, dtype=K.dtype,
                                                          device=K.device)
        eta_layer = eta[..., None].expand(K.shape) if eta.dim() else eta.expand(K.shape)
    safe_ref = torch.where(ref == 0, torch.ones_like(ref), ref)
    w = torch.where(ref[..., None] == 0, torch.ones_like(eta_layer),
                    eta_layer / safe_ref[..., None])
    K2 = K * K
    logK = torch.log(K).sum(-1)
    out = {
        "K_net": torch.exp(logK),
        "logK": logK,
        "logK_drift": (w * (drift / K - diffusion2 / (2 * K2))).sum(-1),
        "logK_diffusion2": ref * scale * (((w / K)[..., None] * noise_proj).sum(-2) ** 2).sum(-1),
        "logK_diffusion2_blockdiag": (w * diffusion2 / K2).sum(-1),
        "logK_noise_curvature": (w * drift_noise / K).sum(-1),
    }
    if (drift_flow is None) != (drift_discretization is None):
        raise ValueError("pass drift_flow and drift_discretization together")
    if drift_flow is not None:
        # E[(u1^T g v1)^2] = (u1^T grad L v1)^2 + s^2 / eta when the flow used the batch gradient.
        flow2 = eta_layer * drift_flow**2
        if flow_full_gradient is None:
            flow_full_gradient = torch.zeros_like(K, dtype=torch.bool)
        flow2 = torch.where(flow_full_gradient, flow2, flow2 - diffusion2)
        out["logK_discretization"] = (w * (drift_discretization / K - flow2 / (2 * K2))).sum(-1)
    return out


def batchnorm_factors(weight: Tensor, running_var: Tensor, eps: Sequence[float],
                      channels: Sequence[int]) -> Tensor:
    """Eval-mode Lipschitz factor of each BatchNorm layer, ``max_c |gamma_c| /
    sqrt(running_var_c + eps)`` (docs/math.md, "BatchNorm").

    In eval mode a BatchNorm layer is the per-channel affine map ``y_c = gamma_c (x_c - mu_c) /
    sqrt(running_var_c + eps) + beta_c``: a diagonal scaling (over channels, the same at every
    position) plus an offset, whose operator norm is the largest scale. The factor has no SDE
    terms: ``running_var`` follows an exponential average of batch statistics, not gradient
    steps.

    Parameters
    ----------
    weight, running_var : Tensor (..., C)
        ``gamma`` (1 without an affine weight) and ``running_var`` of every BatchNorm layer,
        channels concatenated in layer order (``C = sum(channels)``).
    eps : sequence of float (n_bn,)
        Each layer's ``eps``.
    channels : sequence of int (n_bn,)
        Each layer's number of channels.

    Returns
    -------
    Tensor (..., n_bn)
        The factor of each layer (NaN where any of its entries is NaN: no running statistics,
        or a row not recorded).
    """
    channels = [int(c) for c in channels]
    if len(eps) != len(channels):
        raise ValueError(f"eps gives {len(eps)} layers, channels {len(channels)}")
    if weight.shape != running_var.shape or weight.shape[-1] != sum(channels):
        raise ValueError(f"weight {tuple(weight.shape)} and running_var "
                         f"{tuple(running_var.shape)} must both hold sum(channels) = "
                         f"{sum(channels)} channels on the last dimension")
    out = []
    for w, v, e in zip(weight.split(channels, -1), running_var.split(channels, -1), eps):
        scale = w.abs() / torch.sqrt(v + float(e))
        top = scale.amax(-1)
        out.append(torch.where(torch.isnan(scale).any(-1), torch.full_like(top, float("nan")),
                               top))
    if not out:
        return weight.new_zeros((*weight.shape[:-1], 0))
    return torch.stack(out, -1)
