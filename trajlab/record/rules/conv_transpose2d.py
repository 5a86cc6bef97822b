"""nn.ConvTranspose2d: the (C_out, C_in kh kw) matrix of its linear map and its per-sample
gradients from im2col of the output gradient, recorded as a top-k subspace sketch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trajlab.record.rules.base import Dense, Description, LayerRule, require_batched
from trajlab.sketches import Subspace
from trajlab.store.metadata import ConvGeometry


class ConvTranspose2dRule(LayerRule):
    """``ConvTranspose2d`` (``groups=1``).

    PyTorch stores the kernel as ``(C_in, C_out, kh, kw)``. The recorded matrix is the one of
    the layer's map read the same way as a convolution's, ``(C_out, C_in kh kw)``: row ``o``
    holds ``weight[:, o]`` (the first two axes swapped, then reshaped), so ``W`` maps the
    ``C_in kh kw`` entries of an input patch to the ``C_out`` channels (MATH.md §6 "matrix"
    definition; its geometry has ``transposed=True`` and the ``output_padding`` used).

    Sample i's gradient of the kernel is ``sum_q x_iq (unfold dy_i)_q^T`` over the *input*
    positions q (the transposed map's adjoint is a convolution of the output gradient), computed
    as one batched product and handed over densely.
    """

    module_type = "ConvTranspose2d"

    def refuse(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return (f"ConvTranspose2d with groups={module.groups} (its weight is "
                    "block-diagonal) is not supported yet")
        return None

    def matrix_of(self, module, matrix, tensor: Tensor) -> Tensor:
        return tensor.transpose(0, 1).reshape(tensor.shape[1], -1)

    def describe(self, module, matrix, args, kwargs) -> Description:
        x = args[0]
        require_batched(module, "input", x, 4)
        H, W = (int(s) for s in x.shape[-2:])
        output_size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
        op = module._output_padding(x, output_size, list(module.stride), list(module.padding),
                                    list(module.kernel_size), 2, list(module.dilation))
        geometry = ConvGeometry(
            kernel_shape=tuple(module.weight.shape), stride=tuple(module.stride),
            padding=tuple(int(p) for p in module.padding), dilation=tuple(module.dilation),
            padding_mode=module.padding_mode, input_size=(H, W), transposed=True,
            output_padding=tuple(int(p) for p in op))
        return Description(Subspace.name, H * W, geometry)

    def per_sample(self, module, matrix, args, kwargs, grad_out: Tensor) -> Dense:
        x = args[0].detach()
        B, c_in, H, W = x.shape
        c_out = grad_out.shape[1]
        kk = module.kernel_size[0] * module.kernel_size[1]
        # (unfold dy)[(o, a, b), q] = dy[o, q s - p + (a, b) d]: the outputs input q reached
        cols = F.unfold(grad_out, module.kernel_size, dilation=module.dilation,
                        padding=module.padding, stride=module.stride)
        lh = (grad_out.shape[2] + 2 * module.padding[0]
              - module.dilation[0] * (module.kernel_size[0] - 1) - 1) // module.stride[0] + 1
        cols = cols.reshape(B, c_out * kk, lh, -1)[:, :, :H, :W].reshape(B, c_out * kk, H * W)
        G = torch.bmm(x.reshape(B, c_in, H * W), cols.transpose(1, 2))  # (B, C_in, C_out kk)
        G = G.reshape(B, c_in, c_out, kk).transpose(1, 2).reshape(B, c_out, c_in * kk)
        return Dense(G * B)  # undo the loss mean
