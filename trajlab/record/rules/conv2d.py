"""nn.Conv2d: per-sample gradients over im2col patches, recorded as a top-k subspace sketch."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from trajlab.record.rules.base import LayerRule


class Conv2dRule(LayerRule):
    module_type = "Conv2d"

    def weight_matrix(self, module: nn.Module) -> Tensor:
        w = module.weight
        return w.reshape(w.shape[0], -1)

    def geometry(self, module: nn.Module, inp: Tensor) -> dict[str, Any]:
        if module.groups != 1:
            raise NotImplementedError(
                f"Conv2d with groups={module.groups} is not supported yet (its weight is "
                "block-diagonal); pass layers=[...] without it"
            )
        if isinstance(module.padding, str):
            padding = module._reversed_padding_repeated_twice  # resolved "same"
            pad = (padding[2], padding[0])
        else:
            pad = tuple(module.padding)
        H, W = inp.shape[-2:]
        out_h = (H + 2 * pad[0] - module.dilation[0] * (module.kernel_size[0] - 1) - 1)
        out_w = (W + 2 * pad[1] - module.dilation[1] * (module.kernel_size[1] - 1) - 1)
        positions = (out_h // module.stride[0] + 1) * (out_w // module.stride[1] + 1)
        return {
            "sketch": "subspace",
            "positions": int(positions),
            "conv": {
                "kernel_shape": list(module.weight.shape),
                "stride": list(module.stride),
                "padding": list(pad),
                "dilation": list(module.dilation),
                "padding_mode": module.padding_mode,
                "input_size": [int(H), int(W)],
            },
        }

    def patches(self, module: nn.Module, inp: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
        B = inp.shape[0]
        x = inp.detach()
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            # Explicit padding (circular, reflect, replicate, or "same") then unfold without.
            rp = module._reversed_padding_repeated_twice
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, rp, mode=mode)
            padding: Any = 0
        else:
            padding = module.padding
        act = F.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=padding,
            stride=module.stride,
        )
        delta = grad_out.reshape(B, grad_out.shape[1], -1) * B
        return act, delta
