"""nn.Conv2d: per-sample gradients over im2col patches, recorded as a top-k subspace sketch."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from trajlab.record.rules.base import Description, LayerRule, Patches, require_batched
from trajlab.store.metadata import ConvGeometry


def _padding(module: nn.Conv2d) -> tuple[int, ...]:
    """(ph, pw), or (top, bottom, left, right) when ``padding="same"`` pads asymmetrically
    (even kernels): geometries never relabel an asymmetric padding as a symmetric one."""
    if isinstance(module.padding, str):
        rp = module._reversed_padding_repeated_twice  # (left, right, top, bottom)
        top, bottom, left, right = (int(rp[2]), int(rp[3]), int(rp[0]), int(rp[1]))
        if top == bottom and left == right:
            return (top, left)
        return (top, bottom, left, right)
    return (int(module.padding[0]), int(module.padding[1]))


class Conv2dRule(LayerRule):
    module_type = "Conv2d"

    def refuse(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return (f"Conv2d with groups={module.groups} (its weight is block-diagonal) is not "
                    "supported yet")
        return None

    def describe(self, module, matrix, args, kwargs) -> Description:
        inp = args[0]
        require_batched(module, "input", inp, 4)
        rp = module._reversed_padding_repeated_twice
        H, W = inp.shape[-2:]
        out_h = (H + rp[2] + rp[3] - module.dilation[0] * (module.kernel_size[0] - 1) - 1)
        out_w = (W + rp[0] + rp[1] - module.dilation[1] * (module.kernel_size[1] - 1) - 1)
        positions = (out_h // module.stride[0] + 1) * (out_w // module.stride[1] + 1)
        geo = ConvGeometry(kernel_shape=tuple(module.weight.shape), stride=tuple(module.stride),
                           padding=_padding(module), dilation=tuple(module.dilation),
                           padding_mode=module.padding_mode, input_size=(int(H), int(W)))
        return Description("subspace", int(positions), geo)

    def per_sample(self, module, matrix, args, kwargs, grad_out) -> Patches:
        inp = args[0]
        B = inp.shape[0]
        x = inp.detach()
        padding: Any
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            # Explicit padding (circular, reflect, replicate, or "same") then unfold without.
            rp = module._reversed_padding_repeated_twice
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, rp, mode=mode)
            padding = 0
        else:
            padding = module.padding
        act = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                       stride=module.stride)
        delta = grad_out.reshape(B, grad_out.shape[1], -1) * B
        return Patches(act, delta)
