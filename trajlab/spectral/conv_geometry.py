"""The linear map of a convolution layer on a fixed input size, as batched callables.

A layer is described by a :class:`ConvGeometry` (spatial sizes, stride, padding, dilation,
padding mode, whether it is a transposed convolution). Kernels follow PyTorch's layouts:
``(C_out, C_in, *k)`` for ``Conv1d``/``Conv2d`` and ``(C_in, C_out, *k)`` for
``ConvTranspose1d``/``ConvTranspose2d`` (``groups = 1``).

One-dimensional layers are handled as two-dimensional ones of height 1 (kernel ``(..., 1, k)``,
input ``(1, L)``, no padding, stride or dilation along the height): the operator is the same
matrix, so every method below serves both.

Padding modes:

* ``"zeros"``: ``conv2d(x, k, padding=p)``; adjoint ``conv_transpose2d``.
* ``"circular"``, ``"reflect"``, ``"replicate"``: the layer computes ``conv2d(pad(x), k)`` with
  padding 0 after ``F.pad(x, ..., mode)``. Each of these pads is a gather ``x_p = x[idx]`` along
  each axis (``idx`` wraps, mirrors without repeating the edge, or clamps), so the adjoint of the
  pad is the scatter-add ``index_add`` of the same indices, and the operator's adjoint is
  ``pad^T o conv2d^T``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ConvGeometry",
    "IntPair",
    "PaddingMode",
    "conv_geometry",
    "conv_transpose_geometry",
    "geometry_operator",
]

PaddingMode = Literal["zeros", "circular", "reflect", "replicate"]
PADDING_MODES = ("zeros", "circular", "reflect", "replicate")
IntPair = int | tuple[int, ...]

Operator = Callable[[Tensor], Tensor]


class ConvGeometry(NamedTuple):
    """Sizes and options of a convolution layer, lifted to two spatial dimensions.

    Attributes
    ----------
    ndim : int
        Spatial dimensions of the layer (1 or 2); sizes below always have two entries
        (height 1 for ``ndim == 1``).
    input_size, output_size : (int, int)
        Spatial size of the operator's input and output.
    stride, padding, dilation : (int, int)
    padding_mode : str
        One of ``"zeros"``, ``"circular"``, ``"reflect"``, ``"replicate"``.
    transposed : bool
        A transposed convolution (``output_padding`` then applies).
    output_padding : (int, int)
    """

    ndim: int
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    padding_mode: str
    transposed: bool = False
    output_padding: tuple[int, int] = (0, 0)

    def in_shape(self, kernel: Tensor) -> tuple[int, ...]:
        """Shape ``(C, *spatial)`` of one input of the layer (in its own dimensionality)."""
        c = kernel.shape[0] if self.transposed else kernel.shape[1]
        return (c, *self._spatial(self.input_size))

    def out_shape(self, kernel: Tensor) -> tuple[int, ...]:
        """Shape ``(C, *spatial)`` of one output of the layer."""
        c = kernel.shape[1] if self.transposed else kernel.shape[0]
        return (c, *self._spatial(self.output_size))

    def _spatial(self, size: tuple[int, int]) -> tuple[int, ...]:
        return size if self.ndim == 2 else size[1:]


def _tuple(x: IntPair, d: int, name: str) -> tuple[int, ...]:
    t = (int(x),) * d if isinstance(x, int) else tuple(int(v) for v in x)
    if len(t) != d:
        raise ValueError(f"{name} must be an int or a {d}-tuple, got {x!r}")
    return t


def _lift(t: tuple[int, ...], fill: int) -> tuple[int, int]:
    return (fill, t[0]) if len(t) == 1 else (t[0], t[1])


def lift_kernel(kernel: Tensor) -> Tensor:
    """``(a, b, k)`` -> ``(a, b, 1, k)``; 2-D kernels unchanged."""
    return kernel.unsqueeze(-2) if kernel.dim() == 3 else kernel


def _ndim(kernel: Tensor, layout: str) -> int:
    if kernel.dim() not in (3, 4):
        raise ValueError(f"kernel must be {layout} + (k,) or + (kh, kw), "
                         f"got shape {tuple(kernel.shape)}")
    return kernel.dim() - 2


def conv_geometry(kernel: Tensor, input_size: IntPair, *, stride: IntPair = 1,
                  padding: IntPair = 0, dilation: IntPair = 1,
                  padding_mode: str = "zeros") -> ConvGeometry:
    """Validate the options of a ``Conv1d``/``Conv2d`` layer and compute its output size.

    Raises
    ------
    ValueError
        Unknown padding mode, wrong tuple lengths, an empty output, or a reflect padding not
        smaller than the input (as ``F.pad`` requires).
    """
    d = _ndim(kernel, "(C_out, C_in)")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    size = _tuple(input_size, d, "input_size")
    s, p, dl = (_tuple(v, d, n) for v, n in ((stride, "stride"), (padding, "padding"),
                                             (dilation, "dilation")))
    ks = tuple(kernel.shape[2:])
    if min(s) < 1 or min(dl) < 1 or min(p) < 0 or min(size) < 1:
        raise ValueError("stride and dilation must be >= 1, padding >= 0, input size >= 1")
    if padding_mode == "reflect" and any(pp >= n for pp, n in zip(p, size)):
        raise ValueError(f"padding_mode='reflect' needs padding < input size, got padding {p} "
                         f"for input size {size}")
    out = tuple((n + 2 * pp - dd * (k - 1) - 1) // ss + 1
                for n, pp, dd, k, ss in zip(size, p, dl, ks, s, strict=True))
    if min(out) < 1:
        raise ValueError(f"empty output for input size {size} and kernel {ks}")
    return ConvGeometry(d, _lift(size, 1), _lift(out, 1), _lift(s, 1), _lift(p, 0),
                        _lift(dl, 1), padding_mode)


def conv_transpose_geometry(kernel: Tensor, input_size: IntPair, *, stride: IntPair = 1,
                            padding: IntPair = 0, output_padding: IntPair = 0,
                            dilation: IntPair = 1) -> ConvGeometry:
    """Validate the options of a ``ConvTranspose1d``/``ConvTranspose2d`` layer.

    The output size is ``(n - 1) s - 2 p + d (k - 1) + output_padding + 1`` per axis, and
    ``output_padding`` must be smaller than the stride or the dilation (PyTorch's rule).
    """
    d = _ndim(kernel, "(C_in, C_out)")
    size = _tuple(input_size, d, "input_size")
    s, p, op, dl = (_tuple(v, d, n) for v, n in (
        (stride, "stride"), (padding, "padding"), (output_padding, "output_padding"),
        (dilation, "dilation")))
    ks = tuple(kernel.shape[2:])
    if min(s) < 1 or min(dl) < 1 or min(p) < 0 or min(op) < 0 or min(size) < 1:
        raise ValueError("stride and dilation must be >= 1, padding and output_padding >= 0")
    if any(o >= max(ss, dd) for o, ss, dd in zip(op, s, dl, strict=True)):
        raise ValueError(f"output_padding {op} must be smaller than stride {s} or dilation {dl}")
    out = tuple((n - 1) * ss - 2 * pp + dd * (k - 1) + o + 1
                for n, ss, pp, dd, k, o in zip(size, s, p, dl, ks, op, strict=True))
    if min(out) < 1:
        raise ValueError(f"empty output for input size {size} and kernel {ks}")
    return ConvGeometry(d, _lift(size, 1), _lift(out, 1), _lift(s, 1), _lift(p, 0),
                        _lift(dl, 1), "zeros", True, _lift(op, 0))


def pad_index(n: int, p: int, mode: str, device: torch.device) -> Tensor:
    """Source index of every position of an axis of length ``n`` padded by ``p`` on both sides."""
    i = torch.arange(n + 2 * p, device=device) - p
    if mode == "circular":
        return i % n
    if mode == "replicate":
        return i.clamp(0, n - 1)
    if mode == "reflect":  # mirror about the edge samples, which are not repeated
        i = i.abs()
        return torch.where(i > n - 1, 2 * (n - 1) - i, i)
    raise ValueError(f"no index form for padding mode {mode!r}")


def geometry_operator(kernel: Tensor, g: ConvGeometry) -> tuple[Operator, Operator]:
    """``(A, A^T)`` on lifted batches: ``(B, C, H, W) -> (B, C', H', W')`` and back.

    ``kernel`` may be 1-D or 2-D; it is lifted here.
    """
    k = lift_kernel(kernel)
    H, W = g.input_size
    if g.transposed:
        def forward(x: Tensor) -> Tensor:
            return F.conv_transpose2d(x, k, stride=g.stride, padding=g.padding,
                                      output_padding=g.output_padding, dilation=g.dilation)

        def adjoint(y: Tensor) -> Tensor:
            # conv2d on the output size; rows past the input size (output_padding >= stride,
            # allowed when the dilation is larger) belong to no input position
            x = F.conv2d(y, k, stride=g.stride, padding=g.padding, dilation=g.dilation)
            return x[..., :H, :W]
        return forward, adjoint

    c_in = k.shape[1]
    if g.padding_mode == "zeros":
        def forward(x: Tensor) -> Tensor:
            return F.conv2d(x, k, stride=g.stride, padding=g.padding, dilation=g.dilation)

        def adjoint(y: Tensor) -> Tensor:
            return torch.nn.grad.conv2d_input((y.shape[0], c_in, H, W), k, y, stride=g.stride,
                                              padding=g.padding, dilation=g.dilation)
        return forward, adjoint

    ph, pw = g.padding
    ih = pad_index(H, ph, g.padding_mode, k.device) if ph else None
    iw = pad_index(W, pw, g.padding_mode, k.device) if pw else None
    Hp, Wp = H + 2 * ph, W + 2 * pw

    def forward(x: Tensor) -> Tensor:
        if ih is not None:
            x = x.index_select(-2, ih)
        if iw is not None:
            x = x.index_select(-1, iw)
        return F.conv2d(x, k, stride=g.stride, dilation=g.dilation)

    def adjoint(y: Tensor) -> Tensor:
        gp = torch.nn.grad.conv2d_input((y.shape[0], c_in, Hp, Wp), k, y, stride=g.stride,
                                        dilation=g.dilation)
        if iw is not None:
            gp = gp.new_zeros(*gp.shape[:-1], W).index_add_(-1, iw, gp)
        if ih is not None:
            gp = gp.new_zeros(*gp.shape[:-2], H, W).index_add_(-2, ih, gp)
        return gp
    return forward, adjoint
