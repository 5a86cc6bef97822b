"""Circulant convolutions: exact operator norm from the DFT symbol (MATH.md §6b).

With circular padding, stride 1 and an output the size of the input, the operator is
block-diagonalised by the DFT on the ``H x W`` torus: ``sigma = max_f s_1(K(f))`` with the
``C_out x C_in`` symbol ``K(f) = sum_{a,b} k[:, :, a, b] exp(+2 pi i f . s_ab / N)``, ``s_ab`` the
tap offsets ``(d_h a - p_h, d_w b - p_w)`` (Sedghi, Gupta & Long 2019). Taps that wrap around
(kernel larger than the input) are summed, as the circular convolution does. Kernels and
geometries are the lifted 2-D ones of :mod:`trajlab.spectral.conv_geometry` (a Conv1d is a torus
of height 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from trajlab.spectral._util import fix_phase
from trajlab.spectral.conv_geometry import ConvGeometry

__all__ = ["CirculantTop", "circulant_applicable", "circulant_top", "spectrum", "symbol",
           "symbol_batched"]


class CirculantTop(NamedTuple):
    """``sigma``, the next value outside the conjugate pair, ``f*`` and the singular pairs."""

    sigma: Tensor
    sigma_next: Tensor
    freq: tuple[int, int]
    u: Tensor        # (C_out, H, W) real unit left vector of the operator
    v: Tensor        # (C_in, H, W) real unit right vector
    u_freq: Tensor   # (C_out,) complex top vectors of K(f*)
    v_freq: Tensor   # (C_in,)


def circulant_applicable(g: ConvGeometry) -> bool:
    """Circular padding, stride 1, output size == input size (a convolution on the torus)."""
    return (not g.transposed and g.padding_mode == "circular" and g.stride == (1, 1)
            and g.output_size == g.input_size)


def symbol(kernel: Tensor, g: ConvGeometry, freqs: Tensor) -> Tensor:
    """``K(f)`` for frequencies ``freqs`` (F, 2) -> (F, C_out, C_in) complex (lifted kernel)."""
    kh, kw = kernel.shape[-2:]
    H, W = g.input_size
    dev, rdt = kernel.device, kernel.dtype
    oh = torch.arange(kh, device=dev, dtype=rdt) * g.dilation[0] - g.padding[0]
    ow = torch.arange(kw, device=dev, dtype=rdt) * g.dilation[1] - g.padding[1]
    fr = freqs.to(rdt)
    one = torch.ones((), dtype=rdt, device=dev)
    ph = torch.polar(one, 2 * math.pi * fr[:, :1] * oh / H)
    pw = torch.polar(one, 2 * math.pi * fr[:, 1:] * ow / W)
    return torch.einsum("oiab,fa,fb->foi", kernel.to(ph.dtype), ph, pw)


def symbol_batched(Ds: Tensor, g: ConvGeometry, freqs: Tensor) -> Tensor:
    """``D(f*)`` for a batch of lifted kernels (B, C_out, C_in, kh, kw) -> (B, C_out, C_in)."""
    B, C_out, C_in, kh, kw = Ds.shape
    flat = Ds.permute(1, 0, 2, 3, 4).reshape(C_out, B * C_in, kh, kw)
    Kf = symbol(flat, g, freqs)[0]                      # (C_out, B*C_in)
    return Kf.reshape(C_out, B, C_in).permute(1, 0, 2)


def _padded_kernel(kernel: Tensor, g: ConvGeometry) -> Tensor:
    """Kernel taps placed at their (dilated) offsets on the H x W torus, wrapped taps summed."""
    H, W = g.input_size
    kh, kw = kernel.shape[-2:]
    ih = (torch.arange(kh, device=kernel.device) * g.dilation[0]) % H
    iw = (torch.arange(kw, device=kernel.device) * g.dilation[1]) % W
    kp = kernel.new_zeros(*kernel.shape[:2], H, kw).index_add_(-2, ih, kernel)
    return kp.new_zeros(*kernel.shape[:2], H, W).index_add_(-1, iw, kp)


def spectrum(kernel: Tensor, g: ConvGeometry) -> Tensor:
    """Singular values of ``K(f)`` for all frequencies: (H, W, min(C_out, C_in))."""
    # fft2 gives conj(K(f)) times a unit phase: same singular values.
    Khat = torch.fft.fft2(_padded_kernel(kernel, g)).permute(2, 3, 0, 1)
    return torch.linalg.svdvals(Khat)


def _top_of_spectrum(kernel: Tensor, g: ConvGeometry) -> tuple[Tensor, tuple[int, int], Tensor]:
    """``(sigma, f*, sigma_next)`` from the half spectrum (``K(-f) = conj K(f)``).

    ``sigma_next`` is the largest singular value outside the conjugate pair ``{f*, -f*}``.
    """
    H, W = g.input_size
    Khat = torch.fft.rfft2(_padded_kernel(kernel, g)).permute(2, 3, 0, 1)  # (H, W//2+1, o, i)
    sv = torch.linalg.svdvals(Khat)
    top = sv[..., 0]
    Wh = top.shape[1]
    flat = int(top.reshape(-1).argmax())
    fh, fw = divmod(flat, Wh)
    sigma = top[fh, fw]
    mask = torch.ones_like(top, dtype=torch.bool)
    mask[fh, fw] = False
    ch, cw = (-fh) % H, (-fw) % W
    if cw < Wh:  # the conjugate partner also lies in the stored half plane
        mask[ch, cw] = False
    other = top[mask].max() if bool(mask.any()) else sigma.new_zeros(())
    second = sv[fh, fw, 1] if sv.shape[-1] > 1 else sigma.new_zeros(())
    return sigma, (fh, fw), torch.maximum(other, second)


def circulant_top(kernel: Tensor, g: ConvGeometry) -> CirculantTop:
    """Exact top of a circulant convolution (lifted kernel ``(C_out, C_in, kh, kw)``)."""
    H, W = g.input_size
    sigma, (fh, fw), nxt = _top_of_spectrum(kernel, g)
    freqs = torch.tensor([[fh, fw]], device=kernel.device)
    K = symbol(kernel, g, freqs)[0]
    Uf, _, Vfh = torch.linalg.svd(K)
    uf, vf = fix_phase(Uf[:, :1], Vfh[:1, :].mH)
    uf, vf = uf[:, 0], vf[:, 0]
    # real singular pair of the operator: Re(vec * e^{2 pi i f.x/N}), normalised
    xs = torch.arange(H, device=kernel.device, dtype=kernel.dtype)[:, None] * fh / H
    ys = torch.arange(W, device=kernel.device, dtype=kernel.dtype)[None, :] * fw / W
    wave = torch.polar(torch.ones_like(xs + ys), 2 * math.pi * (xs + ys))
    v = (vf[:, None, None] * wave).real
    u = (uf[:, None, None] * wave).real
    nv = torch.linalg.vector_norm(v)
    return CirculantTop(sigma, nxt, (fh, fw), u / nv, v / nv, uf, vf)
