"""BatchNorm's eval-mode factor in K_net: read from the run store, multiplied in where the
network is a chain, and said so in the analysis attributes.

The recorder stores every BatchNorm layer's ``gamma`` and ``running_var`` at each recorded step
(:mod:`trajlab.record.batchnorm`); the factor itself is the pure kernel
:func:`trajlab.sde.network.batchnorm_factors`. The factors have no SDE terms: ``logK`` (the
SDE's state Z), its drift, diffusion and predictions cover the weight matrices only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trajlab.sde.network import batchnorm_factors

__all__ = ["batchnorm_chunk", "batchnorm_in_k_net", "batchnorm_layers", "batchnorm_statement"]


def batchnorm_layers(meta: Any) -> list[dict[str, Any]]:
    """The run's BatchNorm layers (name, type, channels, eps, ...) from its model summary;
    empty for runs without BatchNorm or recorded before BatchNorm was stored."""
    model = getattr(meta, "model", None) or {}
    return list(model.get("batchnorm") or [])


def batchnorm_in_k_net(meta: Any) -> bool:
    """Whether K_net includes the BatchNorm factors: the run has BatchNorm layers and nothing
    detected in the model (attention, other normalisation, residual blocks, BatchNorm without
    running statistics) keeps it from being a chain."""
    model = getattr(meta, "model", None) or {}
    return bool(batchnorm_layers(meta)) and not model.get("not_a_bound")


def batchnorm_chunk(run: Any, rows: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """The product over the BatchNorm layers of their eval-mode factor at ``rows`` (1 without
    BatchNorm), and whether it belongs in K_net (:func:`batchnorm_in_k_net`).

    Returns
    -------
    factor : ndarray (n,) float64
    included : bool
    """
    n = rows[1] - rows[0]
    layers = batchnorm_layers(run.meta)
    if not layers:
        return np.ones(n), False
    r = run.root_rows(["bn_weight", "bn_running_var"], rows)
    f = batchnorm_factors(torch.from_numpy(np.asarray(r["bn_weight"], dtype=np.float64)),
                          torch.from_numpy(np.asarray(r["bn_running_var"], dtype=np.float64)),
                          [float(b["eps"]) for b in layers],
                          [int(b["channels"]) for b in layers])
    return f.prod(-1).numpy(), batchnorm_in_k_net(run.meta)


def batchnorm_statement(meta: Any) -> str:
    """The sentence of ``attrs['k_net']`` about BatchNorm ('' without BatchNorm layers)."""
    layers = batchnorm_layers(meta)
    if not layers:
        return ""
    names = ", ".join(b["name"] for b in layers[:8])
    if len(layers) > 8:
        names += f" and {len(layers) - 8} more"
    what = (f"the eval-mode Lipschitz factor max_c |gamma_c|/sqrt(running_var_c + eps) of "
            f"{len(layers)} BatchNorm layers ({names}; their product is K_net_batchnorm)")
    if not batchnorm_in_k_net(meta):
        return (f". K_net leaves out {what}: the network is not a chain (see above), so "
                "multiplying it in bounds nothing")
    return (f". K_net includes {what}: it bounds the network in eval mode (in train mode "
            "BatchNorm normalises by the batch's own statistics, which no such factor bounds). "
            "The factors have no SDE terms: logK, its drift, diffusion and predictions cover "
            "the weight matrices only, and K_net = exp(logK) x K_net_batchnorm")
