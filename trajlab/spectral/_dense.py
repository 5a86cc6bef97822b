"""Dense matrices of small convolution operators (reference for tests; tiny sizes only)."""

from __future__ import annotations

import torch
from torch import Tensor

from trajlab.spectral.conv import IntPair, PaddingMode, conv_operator

__all__ = ["conv_operator_matrix"]


def conv_operator_matrix(
    kernel: Tensor,
    input_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    padding_mode: PaddingMode = "zeros",
) -> Tensor:
    """Dense matrix of the Conv2d operator, ``(C_out*H_out*W_out, C_in*H*W)``.

    Built by applying the convolution to every basis image (C-order flattening of
    ``(C, H, W)``); memory grows like the square of the image size, so use tiny sizes.
    """
    fwd, _, out = conv_operator(kernel, input_size, stride=stride, padding=padding,
                                dilation=dilation, padding_mode=padding_mode)
    C_in = kernel.shape[1]
    H, W = (input_size, input_size) if isinstance(input_size, int) else input_size
    n = C_in * H * W
    eye = torch.eye(n, dtype=kernel.dtype, device=kernel.device).reshape(n, C_in, H, W)
    return fwd(eye).reshape(n, -1).mT
