"""LayerNorm, GroupNorm and RMSNorm: their affine scales as diagonal operators.

The scale ``gamma`` of a normalisation layer multiplies the normalised input elementwise: the
linear map is ``diag(gamma)`` (for GroupNorm ``diag(gamma)`` on channels, the identity on the
positions, with the same singular values), so ``K = sigma_1 = max_j |gamma_j|``. The recorded
matrix is ``diag(gamma)`` (d x d) and the per-sample gradients are vectors,
``g_i = sum_positions dy_i * xhat_i`` with ``xhat`` the normalised input, stored exactly by the
``"diagonal"`` sketch kind. The bias is an offset, not part of the linear map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trajlab.record.rules.base import Description, Diagonal, LayerRule, require_batched
from trajlab.sketches import DiagonalSketch


class DiagonalScaleRule(LayerRule):
    """A layer whose ``weight`` is the diagonal of its linear map (subclasses: how to
    recompute the normalised input ``xhat``, and over which trailing dims ``weight`` acts)."""

    def refuse(self, module: nn.Module) -> str | None:
        if getattr(module, "weight", None) is None:
            return "no affine weight (elementwise_affine=False / affine=False)"
        return None

    def matrix_of(self, module, matrix, tensor: Tensor) -> Tensor:
        return torch.diag(tensor.reshape(-1))

    def how(self, module: nn.Module) -> str:
        return f"{self.module_type} rule (diagonal operator diag(weight))"

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """The normalised input ``xhat`` (shape of ``x``) the weight multiplies."""
        raise NotImplementedError

    def scale_dims(self, module: nn.Module, x: Tensor) -> int:
        """Trailing dimensions of ``x`` the weight spans (LayerNorm/RMSNorm); 0: channels
        (dim 1, GroupNorm)."""
        return len(module.normalized_shape)

    def describe(self, module, matrix, args, kwargs) -> Description:
        x = args[0]
        k = self.scale_dims(module, x)
        require_batched(module, "input", x, (k or 1) + 1)
        positions = math.prod(x.shape[1:x.dim() - k] if k else x.shape[2:])
        return Description(DiagonalSketch.name, int(positions))

    def per_sample(self, module, matrix, args, kwargs, grad_out: Tensor) -> Diagonal:
        x = args[0].detach()
        B = x.shape[0]
        k = self.scale_dims(module, x)
        with torch.no_grad():
            prod = grad_out * self.normalized(module, x).to(grad_out.dtype)
            if k:
                values = prod.reshape(B, -1, module.weight.numel()).sum(1)
            else:
                values = prod.reshape(B, prod.shape[1], -1).sum(-1)
        return Diagonal(values * B)  # undo the loss mean


class LayerNormRule(DiagonalScaleRule):
    module_type = "LayerNorm"

    def normalized(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


class GroupNormRule(DiagonalScaleRule):
    module_type = "GroupNorm"

    def scale_dims(self, module, x):
        return 0

    def normalized(self, module, x):
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class RMSNormRule(DiagonalScaleRule):
    module_type = "RMSNorm"

    def normalized(self, module, x):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)
