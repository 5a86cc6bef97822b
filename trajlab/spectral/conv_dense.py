"""Dense matrices of small convolution operators (references for tests; tiny sizes only).

Each builder applies the layer's map to every basis signal (C-order flattening of
``(C, *spatial)``), so memory grows like the square of the signal size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from trajlab.spectral.conv import conv_operator, conv_transpose_operator
from trajlab.spectral.conv_geometry import IntPair, PaddingMode

__all__ = ["conv_operator_matrix", "conv_transpose_operator_matrix", "operator_matrix"]


def operator_matrix(forward: Callable[[Tensor], Tensor], in_shape: tuple[int, ...],
                    like: Tensor) -> Tensor:
    """Dense matrix ``(prod(out_shape), prod(in_shape))`` of a batched linear map.

    ``forward`` maps ``(B, *in_shape) -> (B, *out_shape)``; ``like`` gives dtype and device.
    """
    n = 1
    for d in in_shape:
        n *= d
    eye = torch.eye(n, dtype=like.dtype, device=like.device).reshape(n, *in_shape)
    return forward(eye).reshape(n, -1).mT


def conv_operator_matrix(
    kernel: Tensor,
    input_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    padding_mode: PaddingMode = "zeros",
) -> Tensor:
    """Dense matrix of a Conv1d/Conv2d layer's map, ``(C_out * prod(out), C_in * prod(in))``.

    Parameters as in :func:`trajlab.spectral.conv_operator` (kernel ``(C_out, C_in, k)`` or
    ``(C_out, C_in, kh, kw)``; every padding mode).
    """
    fwd, _, _ = conv_operator(kernel, input_size, stride=stride, padding=padding,
                              dilation=dilation, padding_mode=padding_mode)
    size = (input_size,) * (kernel.dim() - 2) if isinstance(input_size, int) else input_size
    return operator_matrix(fwd, (kernel.shape[1], *size), kernel)


def conv_transpose_operator_matrix(
    kernel: Tensor,
    input_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
    dilation: IntPair = 1,
) -> Tensor:
    """Dense matrix of a ConvTranspose1d/2d layer's map (kernel ``(C_in, C_out, *k)``)."""
    fwd, _, _ = conv_transpose_operator(kernel, input_size, stride=stride, padding=padding,
                                        output_padding=output_padding, dilation=dilation)
    size = (input_size,) * (kernel.dim() - 2) if isinstance(input_size, int) else input_size
    return operator_matrix(fwd, (kernel.shape[0], *size), kernel)
