"""nn.Linear: exact rank-one factors for (batch, features) inputs, a sketch over sequences."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from trajlab.record.rules.base import LayerRule


class LinearRule(LayerRule):
    module_type = "Linear"

    def weight_matrix(self, module: nn.Module) -> Tensor:
        return module.weight

    def geometry(self, module: nn.Module, inp: Tensor) -> dict[str, Any]:
        positions = math.prod(inp.shape[1:-1]) if inp.dim() > 2 else 1
        return {
            "sketch": "rank1" if inp.dim() == 2 else "subspace",
            "positions": positions,
            "conv": {},
        }

    def patches(self, module: nn.Module, inp: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
        B = inp.shape[0]
        act = inp.detach().reshape(B, -1, inp.shape[-1]).transpose(1, 2)
        delta = grad_out.reshape(B, -1, grad_out.shape[-1]).transpose(1, 2) * B
        return act, delta
