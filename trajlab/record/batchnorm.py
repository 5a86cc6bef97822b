"""BatchNorm layers: what the recorder stores of them, so that the analysis can put their
eval-mode Lipschitz factor into K_net.

In eval mode a BatchNorm layer is the per-channel affine map
``y_c = gamma_c (x_c - running_mean_c) / sqrt(running_var_c + eps) + beta_c``, whose Lipschitz
constant (for any norm that treats channels alike: a per-channel scaling of a conv feature map
or of a feature vector) is ``max_c |gamma_c| / sqrt(running_var_c + eps)``. At each recorded step
the recorder stores ``gamma`` (1 without an affine weight) and ``running_var`` of every
BatchNorm layer, concatenated along the ``bn_channel`` dimension in module order; ``eps`` and
each layer's channel count are in the model summary (``summary["batchnorm"]``). The factor is
computed by :func:`trajlab.sde.network.batchnorm_factors`.

A BatchNorm layer is not a recorded layer: it has no weight matrix, its ``running_var`` moves by
an exponential average of batch statistics rather than by gradient steps, and in train mode it
mixes the samples of a batch. Its factor therefore has no SDE terms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BATCHNORM", "batchnorm_meta", "batchnorm_modules", "batchnorm_row"]

#: Module types whose eval-mode factor enters K_net (BatchNorm1d/2d/3d, SyncBatchNorm).
BATCHNORM: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's BatchNorm layers ``(name, module)`` in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BATCHNORM)]


def batchnorm_meta(model: nn.Module) -> list[dict[str, Any]]:
    """One entry per BatchNorm layer, as stored in the model summary: ``name``, ``type``,
    ``channels``, ``eps``, ``affine`` and ``running_stats`` (``track_running_stats``: without
    running statistics eval mode normalises by batch statistics, and no factor bounds it)."""
    return [{"name": n, "type": type(m).__name__, "channels": int(m.num_features),
             "eps": float(m.eps), "affine": m.weight is not None,
             "running_stats": m.running_var is not None}
            for n, m in batchnorm_modules(model)]


def batchnorm_row(model: nn.Module) -> dict[str, Tensor]:
    """The root variables of one recorded step of ``model``: ``bn_weight`` (gamma, 1 without an
    affine weight) and ``bn_running_var`` (NaN without running statistics), each (sum of
    channels,) float64, fresh tensors on the modules' device (the recorder copies them to the
    host). Empty without BatchNorm layers."""
    modules = batchnorm_modules(model)
    if not modules:
        return {}
    weights, variances = [], []
    with torch.no_grad():
        for _, m in modules:
            var = m.running_var
            w = m.weight
            dev = next((t.device for t in (w, var) if t is not None), torch.device("cpu"))
            n = int(m.num_features)
            weights.append(w.detach().reshape(-1).to(torch.float64) if w is not None
                           else torch.ones(n, dtype=torch.float64, device=dev))
            variances.append(var.detach().reshape(-1).to(torch.float64) if var is not None
                             else torch.full((n,), float("nan"), dtype=torch.float64,
                                             device=dev))
        if len({t.device for t in weights + variances}) > 1:
            weights = [t.cpu() for t in weights]
            variances = [t.cpu() for t in variances]
        return {"bn_weight": torch.cat(weights), "bn_running_var": torch.cat(variances)}
