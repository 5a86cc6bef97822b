"""nn.Linear (and its subclasses): exact rank-one factors on (batch, features) inputs, a
subspace sketch when the layer is applied over extra dimensions (sequences, tokens)."""

from __future__ import annotations

import math

from torch import nn

from trajlab.record.rules.base import Description, LayerRule, Patches
from trajlab.sketches import Rank1, Subspace


class LinearRule(LayerRule):
    module_type = "Linear"

    def describe(self, module: nn.Module, matrix, args, kwargs) -> Description:
        inp = args[0]
        if inp.dim() == 2:
            return Description(Rank1.name, 1, None)
        return Description(Subspace.name, int(math.prod(inp.shape[1:-1])), None)

    def per_sample(self, module, matrix, args, kwargs, grad_out) -> Patches:
        inp = args[0]
        B = inp.shape[0]
        act = inp.detach().reshape(B, -1, inp.shape[-1]).transpose(1, 2)
        delta = grad_out.reshape(B, -1, grad_out.shape[-1]).transpose(1, 2) * B
        return Patches(act, delta)
