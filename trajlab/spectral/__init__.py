"""Spectral kernels: top singular values, their derivatives, and conv operator norms.

Pure torch functions (no I/O), batched over leading dimensions where stated, float32/float64,
any device. Mathematics: MATH.md §2 and §6; usage and policies: docs/spectral.md.
"""

from trajlab.spectral.conv import (
    ConvOpNorm,
    ConvOpNormSeries,
    conv_hessian_quadform,
    conv_matrix_proxy,
    conv_operator,
    conv_opnorm,
    conv_opnorm_grad,
    conv_opnorm_series,
    conv_transpose_operator,
    conv_transpose_opnorm,
)
from trajlab.spectral.conv_dense import conv_operator_matrix, conv_transpose_operator_matrix
from trajlab.spectral.hessian import hessian_diag, hessian_quadform, hessian_quadform_proj
from trajlab.spectral.singular import TopSingular, opnorm_jacobian, spectral_gap, top_singular

__all__ = [
    "ConvOpNorm",
    "ConvOpNormSeries",
    "TopSingular",
    "conv_hessian_quadform",
    "conv_matrix_proxy",
    "conv_operator",
    "conv_operator_matrix",
    "conv_opnorm",
    "conv_opnorm_grad",
    "conv_opnorm_series",
    "conv_transpose_operator",
    "conv_transpose_operator_matrix",
    "conv_transpose_opnorm",
    "hessian_diag",
    "hessian_quadform",
    "hessian_quadform_proj",
    "opnorm_jacobian",
    "spectral_gap",
    "top_singular",
]
