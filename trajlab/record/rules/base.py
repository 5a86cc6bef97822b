"""The contract of a layer rule and the shared per-sample sketch kernels (pure torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Capture:
    """Per-sample information for one layer at one step, still on the training device.

    Attributes
    ----------
    sketch : "rank1" or "subspace"; must match the layer's store layout.
    tensors : per-sample variables (see trajlab.store.schema.SKETCH_VARS), fresh tensors.
    per_sample : (B, m, n) per-sample gradients, only filled when the recorder asked for them
        (first-step self-check); never stored.
    """

    sketch: str
    tensors: dict[str, Tensor]
    per_sample: Tensor | None = None

    def mean_gradient(self) -> Tensor:
        """Batch mean of the per-sample gradients this capture implies, (m, n)."""
        if self.per_sample is not None:
            return self.per_sample.mean(0)
        if self.sketch == "rank1":
            a, d = self.tensors["ps_input"], self.tensors["ps_grad_out"]
            return d.transpose(0, 1) @ a / a.shape[0]
        raise ValueError("a subspace capture needs per_sample=True to give its mean gradient")


class LayerRule:
    """How one module type is recorded. Subclasses implement the three methods below."""

    module_type: str = ""

    def weight_matrix(self, module: nn.Module) -> Tensor:
        """The layer's weight as an (out, in) matrix view (no copy)."""
        raise NotImplementedError

    def weight_grad_matrix(self, module: nn.Module) -> Tensor | None:
        g = module.weight.grad
        return None if g is None else g.reshape(self.weight_matrix(module).shape)

    def geometry(self, module: nn.Module, inp: Tensor) -> dict[str, Any]:
        """Sketch kind, positions per sample and layer geometry seen on the first input."""
        raise NotImplementedError

    def patches(self, module: nn.Module, inp: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
        """(activations (B, n, P), output gradients (B, m, P)) with the loss-mean factor undone."""
        raise NotImplementedError


def rank1_sketch(act: Tensor, delta: Tensor) -> dict[str, Tensor]:
    """Exact per-sample factors for a layer without weight sharing: G_i = outer(delta_i, act_i).

    Parameters
    ----------
    act : (B, n) layer inputs.  delta : (B, m) per-sample output gradients.
    """
    return {"ps_grad_out": delta, "ps_input": act.clone()}


def subspace_sketch(
    act: Tensor, delta: Tensor, U: Tensor, V: Tensor, *, want_per_sample: bool = False
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Sketch of per-sample gradients G_i = sum_p delta[i,:,p] act[i,:,p]^T of a shared layer.

    Parameters
    ----------
    act : (B, n, P) activations (patches).
    delta : (B, m, P) per-sample output gradients.
    U : (m, k), V : (n, k) orthonormal bases (top-k singular vectors of the weight).

    Returns
    -------
    tensors : ps_proj_out (B, m, k) = G_i V, ps_proj_in (B, n, k) = G_i^T U,
        ps_sqnorm (B,) = ||G_i||_F^2, grad_sq_sum (m, n) = sum_i G_i**2.
    per_sample : (B, m, n) when ``want_per_sample``.
    """
    G = torch.bmm(delta, act.transpose(1, 2))  # (B, m, n): as costly as the weight gradient
    sq = G.square()
    tensors = {
        "ps_proj_out": G @ V,
        "ps_proj_in": G.transpose(1, 2) @ U,
        "ps_sqnorm": sq.sum((1, 2)),
        "grad_sq_sum": sq.sum(0),
    }
    return tensors, (G if want_per_sample else None)
