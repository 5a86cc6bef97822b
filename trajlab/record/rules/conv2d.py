"""nn.Conv2d: per-sample gradients, recorded as a top-k subspace sketch.

Two ways give the per-sample weight gradients ``G_i`` (B, out, in*kh*kw), with the same
numbers up to float rounding:

* im2col patches and a batched matmul (:class:`Patches`; the sketch forms ``G_i`` itself);
* one weight-gradient convolution with ``groups = B`` (:class:`Dense`): no patch matrix is
  formed, which is 3-10x faster on the CPU for layers with many positions or channels and
  up to 10x slower for wide layers on few positions (measured over 138 shapes,
  benchmarks/conv_per_sample.py). :func:`grouped_is_faster` picks from the shape; on other
  devices the patches are used until measured there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trajlab.record.rules.base import (
    Dense,
    Description,
    LayerRule,
    Patches,
    PerSample,
    require_batched,
)
from trajlab.sketches import Subspace
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


def grouped_is_faster(device: torch.device, channels: int, out_channels: int,
                      positions: int) -> bool:
    """Whether the grouped weight-gradient convolution gives a Conv2d layer's per-sample
    gradients faster than im2col + bmm (CPU measurements, benchmarks/conv_per_sample.py:
    it wins 1.1-10x from 1024 positions, and from 8 input channels on 256 positions, or on 64
    positions for out x in channels up to 2048; it loses elsewhere). Deterministic: a store's
    numbers do not depend on timing."""
    if device.type != "cpu":
        return False
    return positions >= 1024 or (channels >= 8 and (
        positions >= 256 or (positions >= 64 and out_channels * channels <= 2048)))


def grouped_weight_grads(x: Tensor, delta: Tensor, kernel_size: tuple[int, int],
                         stride: tuple[int, int], padding: tuple[int, int],
                         dilation: tuple[int, int]) -> Tensor:
    """Per-sample weight gradients (B, m, C*kh*kw) of a convolution (groups=1) from its input
    ``x`` (B, C, H, W) and output gradient ``delta`` (B, m, oh, ow): the weight gradient of
    one convolution over the batch stacked as ``B`` groups of channels."""
    B, C, H, W = x.shape
    m = delta.shape[1]
    g = torch.nn.grad.conv2d_weight(x.reshape(1, B * C, H, W), (B * m, C, *kernel_size),
                                    delta.reshape(1, B * m, *delta.shape[2:]), stride=stride,
                                    padding=padding, dilation=dilation, groups=B)
    return g.reshape(B, m, -1)


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
        return Description(Subspace.name, int(positions), geo)

    def per_sample(self, module, matrix, args, kwargs, grad_out) -> PerSample:
        inp = args[0]
        B = inp.shape[0]
        x = inp.detach()
        padding: Any
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            # Explicit padding (circular, reflect, replicate, or "same") then unfold without.
            rp = module._reversed_padding_repeated_twice
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, rp, mode=mode)
            padding = (0, 0)
        else:
            padding = tuple(module.padding)
        m = grad_out.shape[1]
        positions = grad_out.shape[2] * grad_out.shape[3]
        if grouped_is_faster(x.device, x.shape[1], m, positions):
            dtype = torch.promote_types(x.dtype, grad_out.dtype)  # autocast: mixed dtypes
            ks = tuple(module.kernel_size)
            # the loss-mean factor B multiplies the smaller of delta and the gradients
            late = x.shape[1] * ks[0] * ks[1] < positions
            delta = grad_out.to(dtype) if late else grad_out.to(dtype) * B
            G = grouped_weight_grads(x.to(dtype), delta, ks, tuple(module.stride), padding,
                                     tuple(module.dilation))
            return Dense(G.mul_(B) if late else G)
        act = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                       stride=module.stride)
        delta = grad_out.reshape(B, m, -1) * B
        return Patches(act, delta)
