"""Operator norm of a Conv2d layer's linear map and its derivatives (MATH.md §6).

The operator is ``x (C_in, H, W) -> conv2d(x, kernel)`` (PyTorch's cross-correlation) with the
layer's stride, padding, dilation and padding mode on a fixed input size. ``kernel`` is
``(C_out, C_in, kh, kw)`` (groups = 1). Kernels are not batched.

* ``method="fft"`` (circular padding, stride 1, output size == input size): the operator is
  block-diagonalised by the 2-D DFT; ``sigma = max_f s_1(K(f))`` with the ``C_out x C_in`` symbol
  ``K(f) = sum_{a,b} k[:, :, a, b] exp(+2 pi i f . s_ab / N)``, ``s_ab`` the tap offsets
  ``(d_h a - p_h, d_w b - p_w)`` (Sedghi, Gupta & Long 2019). Taps that wrap around (kernel
  larger than the input) are summed, as the circular convolution does.
* ``method="power"``: block power iteration with Rayleigh–Ritz on the real operator, using
  ``conv2d`` and its adjoint ``torch.nn.grad.conv2d_input`` (zero padding, any stride).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from trajlab.spectral._util import default_tol, fix_phase
from trajlab.spectral.hessian import quadform_from_svd
from trajlab.spectral.singular import spectral_gap, subspace_iteration

__all__ = [
    "ConvOpNorm",
    "conv_hessian_quadform",
    "conv_matrix_proxy",
    "conv_operator",
    "conv_opnorm",
    "conv_opnorm_grad",
]

PaddingMode = Literal["zeros", "circular"]
IntPair = int | tuple[int, int]


def _pair(x: IntPair) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


class ConvOpNorm(NamedTuple):
    """Exact operator norm of a convolution and what is needed to reuse or differentiate it.

    Attributes
    ----------
    sigma : Tensor ()
        The operator norm (top singular value of the convolution operator).
    u : Tensor (C_out, H_out, W_out)
        A unit top left singular vector of the real operator (an output image).
    v : Tensor (C_in, H, W)
        The matching unit top right singular vector (an input image): ``A v = sigma u``.
    method : str
        ``"fft"`` or ``"power"``.
    gap : Tensor ()
        Relative gap ``(sigma - sigma_next) / sigma``. For ``"fft"``, ``sigma_next`` is the
        largest singular value outside the top block (the conjugate frequency ``-f*`` always has
        the same value and is *not* counted: the pair never splits). For ``"power"`` it is the
        second Ritz value, which for circular operators is the conjugate twin, so 0 there.
    degenerate : Tensor () bool
        ``gap < gap_tol``.
    residual : Tensor ()
        ``max(||A v - sigma u||, ||A^T u - sigma v||) / sigma`` on the real operator.
    freq : tuple[int, int] or None
        Maximising frequency ``f*`` (``"fft"`` only), in DFT index units.
    u_freq, v_freq : Tensor or None
        Complex top singular vectors (C_out,), (C_in,) of the symbol ``K(f*)`` (``"fft"`` only).
    n_iter : int
        Power iterations used (0 for ``"fft"``).
    """

    sigma: Tensor
    u: Tensor
    v: Tensor
    method: str
    gap: Tensor
    degenerate: Tensor
    residual: Tensor
    freq: tuple[int, int] | None = None
    u_freq: Tensor | None = None
    v_freq: Tensor | None = None
    n_iter: int = 0


class _Geometry(NamedTuple):
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    padding_mode: str


def _geometry(kernel: Tensor, input_size: IntPair, stride: IntPair, padding: IntPair,
              dilation: IntPair, padding_mode: str) -> _Geometry:
    if kernel.dim() != 4:
        raise ValueError(f"kernel must be (C_out, C_in, kh, kw), got shape {tuple(kernel.shape)}")
    if padding_mode not in ("zeros", "circular"):
        raise ValueError(f"padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
    H, W = _pair(input_size)
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = kernel.shape[-2:]
    out = tuple((n + 2 * pp - dd * (k - 1) - 1) // ss + 1
                for n, pp, dd, k, ss in zip((H, W), p, d, (kh, kw), s))
    if min(out) < 1:
        raise ValueError(f"empty output for input size {(H, W)} and kernel {(kh, kw)}")
    return _Geometry((H, W), out, s, p, d, padding_mode)  # type: ignore[arg-type]


def _fft_applicable(g: _Geometry, kernel: Tensor) -> bool:
    return (g.padding_mode == "circular" and g.stride == (1, 1)
            and g.output_size == g.input_size)


def _circ_index(n: int, p: int, device: torch.device) -> Tensor:
    return (torch.arange(n + 2 * p, device=device) - p) % n


def conv_operator(kernel: Tensor, input_size: IntPair, *, stride: IntPair = 1,
                  padding: IntPair = 0, dilation: IntPair = 1,
                  padding_mode: PaddingMode = "zeros"):
    """The convolution as a pair of batched callables ``(A, A^T)``.

    ``A``: ``x (B, C_in, H, W) -> (B, C_out, H_out, W_out)``; ``A^T`` the exact adjoint.
    Returns ``(forward, adjoint, output_size)``.
    """
    g = _geometry(kernel, input_size, stride, padding, dilation, padding_mode)
    H, W = g.input_size
    ph, pw = g.padding
    if padding_mode == "zeros":
        def forward(x: Tensor) -> Tensor:
            return F.conv2d(x, kernel, stride=g.stride, padding=g.padding, dilation=g.dilation)

        def adjoint(y: Tensor) -> Tensor:
            return torch.nn.grad.conv2d_input((y.shape[0], kernel.shape[1], H, W), kernel, y,
                                              stride=g.stride, padding=g.padding,
                                              dilation=g.dilation)
    else:
        ih, iw = _circ_index(H, ph, kernel.device), _circ_index(W, pw, kernel.device)
        Hp, Wp = H + 2 * ph, W + 2 * pw

        def forward(x: Tensor) -> Tensor:
            xp = x.index_select(-2, ih).index_select(-1, iw)
            return F.conv2d(xp, kernel, stride=g.stride, dilation=g.dilation)

        def adjoint(y: Tensor) -> Tensor:
            gp = torch.nn.grad.conv2d_input((y.shape[0], kernel.shape[1], Hp, Wp), kernel, y,
                                            stride=g.stride, dilation=g.dilation)
            t = gp.new_zeros(*gp.shape[:-1], W).index_add_(-1, iw, gp)
            return t.new_zeros(*t.shape[:-2], H, W).index_add_(-2, ih, t)
    return forward, adjoint, g.output_size


def _symbol(kernel: Tensor, g: _Geometry, freqs: Tensor) -> Tensor:
    """``K(f)`` for frequencies ``freqs`` (F, 2) -> (F, C_out, C_in) complex."""
    kh, kw = kernel.shape[-2:]
    H, W = g.input_size
    dev = kernel.device
    rdt = kernel.dtype
    oh = torch.arange(kh, device=dev, dtype=rdt) * g.dilation[0] - g.padding[0]
    ow = torch.arange(kw, device=dev, dtype=rdt) * g.dilation[1] - g.padding[1]
    fr = freqs.to(rdt)
    ph = torch.polar(torch.ones((), dtype=rdt, device=dev), 2 * math.pi * fr[:, :1] * oh / H)
    pw = torch.polar(torch.ones((), dtype=rdt, device=dev), 2 * math.pi * fr[:, 1:] * ow / W)
    return torch.einsum("oiab,fa,fb->foi", kernel.to(ph.dtype), ph, pw)


def _padded_kernel(kernel: Tensor, g: _Geometry) -> Tensor:
    """Kernel taps placed at their (dilated) offsets on the H x W torus, wrapped taps summed."""
    H, W = g.input_size
    kh, kw = kernel.shape[-2:]
    ih = (torch.arange(kh, device=kernel.device) * g.dilation[0]) % H
    iw = (torch.arange(kw, device=kernel.device) * g.dilation[1]) % W
    kp = kernel.new_zeros(*kernel.shape[:2], H, kw).index_add_(-2, ih, kernel)
    return kp.new_zeros(*kernel.shape[:2], H, W).index_add_(-1, iw, kp)


def _spectrum(kernel: Tensor, g: _Geometry) -> Tensor:
    """Singular values of ``K(f)`` for all frequencies: (H, W, min(C_out, C_in))."""
    # fft2 gives conj(K(f)) times a unit phase: same singular values.
    Khat = torch.fft.fft2(_padded_kernel(kernel, g)).permute(2, 3, 0, 1)
    return torch.linalg.svdvals(Khat)


def _top_of_spectrum(kernel: Tensor, g: _Geometry) -> tuple[Tensor, tuple[int, int], Tensor]:
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


def _conv_fft(kernel: Tensor, g: _Geometry, gap_tol: float) -> ConvOpNorm:
    H, W = g.input_size
    sigma, (fh, fw), nxt = _top_of_spectrum(kernel, g)
    gap = spectral_gap(torch.stack([sigma, nxt]))
    freqs = torch.tensor([[fh, fw]], device=kernel.device)
    K = _symbol(kernel, g, freqs)[0]
    Uf, Sf, Vfh = torch.linalg.svd(K)
    uf, vf = fix_phase(Uf[:, :1], Vfh[:1, :].mH)
    uf, vf = uf[:, 0], vf[:, 0]
    # real singular pair of the operator: Re(vec * e^{2 pi i f.x/N}), normalised
    xs = torch.arange(H, device=kernel.device, dtype=kernel.dtype)[:, None] * fh / H
    ys = torch.arange(W, device=kernel.device, dtype=kernel.dtype)[None, :] * fw / W
    wave = torch.polar(torch.ones_like(xs + ys), 2 * math.pi * (xs + ys))
    v = (vf[:, None, None] * wave).real
    u = (uf[:, None, None] * wave).real
    nv = torch.linalg.vector_norm(v)
    v, u = v / nv, u / nv
    fwd, adj, _ = conv_operator(kernel, g.input_size, stride=g.stride, padding=g.padding,
                                dilation=g.dilation, padding_mode=g.padding_mode)
    res = _real_residual(fwd, adj, sigma, u, v)
    return ConvOpNorm(sigma, u, v, "fft", gap, gap < gap_tol, res, (fh, fw), uf, vf, 0)


def _real_residual(fwd, adj, sigma: Tensor, u: Tensor, v: Tensor) -> Tensor:
    r1 = torch.linalg.vector_norm(fwd(v[None])[0] - sigma * u)
    r2 = torch.linalg.vector_norm(adj(u[None])[0] - sigma * v)
    return torch.maximum(r1, r2) / sigma if bool(sigma > 0) else sigma.new_zeros(())


def _conv_power(kernel: Tensor, g: _Geometry, tol: float | None, max_iter: int,
                init: ConvOpNorm | None, gap_tol: float, seed: int, block: int) -> ConvOpNorm:
    fwd, adj, out = conv_operator(kernel, g.input_size, stride=g.stride, padding=g.padding,
                                  dilation=g.dilation, padding_mode=g.padding_mode)
    C_out, C_in = kernel.shape[:2]
    H, W = g.input_size
    n = C_in * H * W
    m = C_out * out[0] * out[1]
    p = max(1, min(block, n, m))
    if tol is None:
        tol = default_tol(kernel.dtype, max(m, n))

    def matmat(X: Tensor) -> Tensor:  # (n, p) -> (m, p)
        return fwd(X.mT.reshape(-1, C_in, H, W)).reshape(X.shape[-1], m).mT

    def rmatmat(Y: Tensor) -> Tensor:  # (m, p) -> (n, p)
        return adj(Y.mT.reshape(-1, C_out, *out)).reshape(Y.shape[-1], n).mT

    gen = torch.Generator(device=kernel.device).manual_seed(seed)
    V0 = torch.randn(n, p, generator=gen, dtype=kernel.dtype, device=kernel.device)
    if init is not None:
        V0[:, 0] = init.v.reshape(-1).to(V0)
    S, U, V, res, it = subspace_iteration(matmat, rmatmat, V0, 1, tol=tol, max_iter=max_iter)
    if not bool(res <= tol):
        warnings.warn(f"conv_opnorm: power iteration did not reach tol={tol:.3g} in {max_iter} "
                      f"iterations (residual {float(res):.3g})", RuntimeWarning, stacklevel=3)
    U1, V1 = fix_phase(U[:, :1], V[:, :1])
    gap = spectral_gap(S)
    return ConvOpNorm(S[0], U1[:, 0].reshape(C_out, *out), V1[:, 0].reshape(C_in, H, W),
                      "power", gap, gap < gap_tol, res, None, None, None, it)


def conv_opnorm(
    kernel: Tensor,
    input_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    padding_mode: PaddingMode = "zeros",
    method: Literal["auto", "fft", "power"] = "auto",
    tol: float | None = None,
    max_iter: int = 500,
    init: ConvOpNorm | None = None,
    gap_tol: float = 1e-3,
    block: int = 4,
    seed: int = 0,
) -> ConvOpNorm:
    """Exact operator norm of the Conv2d map ``x -> conv2d(x, kernel)`` on ``input_size``.

    Parameters
    ----------
    kernel : Tensor (C_out, C_in, kh, kw)
        Real weight (``groups=1``).
    input_size : int or (H, W)
        Spatial size of the layer's input.
    stride, padding, dilation : int or (int, int)
        As in ``torch.nn.Conv2d``.
    padding_mode : {"zeros", "circular"}
    method : {"auto", "fft", "power"}
        ``"fft"`` is exact and needs circular padding, stride 1 and output size == input size
        (``2 * padding == dilation * (k - 1)``); ``"auto"`` uses it then, ``"power"`` otherwise.
    tol, max_iter, init, block, seed
        Power iteration: residual target (default ``10 eps sqrt(size)``), iteration cap, warm
        start (a previous result), block size (Rayleigh–Ritz on ``block`` vectors), seed of the
        local generator for the random start.
    gap_tol : float
        ``degenerate = gap < gap_tol``.

    Returns
    -------
    ConvOpNorm

    Examples
    --------
    >>> k = torch.zeros(1, 1, 3, 3, dtype=torch.float64); k[0, 0] = 1.0
    >>> float(conv_opnorm(k, 8, padding=1, padding_mode="circular").sigma)  # identical taps
    9.0
    """
    g = _geometry(kernel, input_size, stride, padding, dilation, padding_mode)
    fft_ok = _fft_applicable(g, kernel)
    if method == "auto":
        method = "fft" if fft_ok else "power"
    if method == "fft":
        if not fft_ok:
            raise ValueError("conv_opnorm: method='fft' needs padding_mode='circular', stride 1 "
                             "and an output the size of the input")
        return _conv_fft(kernel, g, gap_tol)
    if method != "power":
        raise ValueError(f"conv_opnorm: unknown method {method!r}")
    return _conv_power(kernel, g, tol, max_iter, init, gap_tol, seed, block)


def conv_opnorm_grad(
    kernel: Tensor,
    input_size: IntPair,
    *,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    padding_mode: PaddingMode = "zeros",
    result: ConvOpNorm | None = None,
) -> Tensor:
    """Gradient of the exact operator norm with respect to the kernel.

    ``d sigma = u^T (dA) v`` with the real top singular pair, i.e. the weight gradient of
    ``conv2d`` for input ``v`` and output gradient ``u``. In the FFT case this equals
    ``Re(conj(u_o) v_i exp(2 pi i f* . s_ab / N))`` summed over the conjugate pair (MATH.md §6).

    Parameters
    ----------
    kernel : Tensor (C_out, C_in, kh, kw)
    input_size, stride, padding, dilation, padding_mode
        As in :func:`conv_opnorm`.
    result : ConvOpNorm, optional
        Precomputed ``conv_opnorm`` with the same arguments.

    Returns
    -------
    Tensor (C_out, C_in, kh, kw)
        Defined when ``result.degenerate`` is False.
    """
    if result is None:
        result = conv_opnorm(kernel, input_size, stride=stride, padding=padding,
                             dilation=dilation, padding_mode=padding_mode)
    g = _geometry(kernel, input_size, stride, padding, dilation, padding_mode)
    v, u = result.v[None].to(kernel), result.u[None].to(kernel)
    if padding_mode == "circular":
        ih = _circ_index(g.input_size[0], g.padding[0], kernel.device)
        iw = _circ_index(g.input_size[1], g.padding[1], kernel.device)
        v = v.index_select(-2, ih).index_select(-1, iw)
        pad = (0, 0)
    else:
        pad = g.padding
    return torch.nn.grad.conv2d_weight(v, kernel.shape, u, stride=g.stride, padding=pad,
                                       dilation=g.dilation)


def conv_hessian_quadform(
    kernel: Tensor,
    D: Tensor,
    input_size: IntPair,
    *,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    result: ConvOpNorm | None = None,
) -> Tensor:
    """Second directional derivative ``d^2 sigma[D]`` of the exact norm, circular case.

    Applies the complex form of MATH.md §2 to the symbol ``K(f*)`` along ``D(f*)``, including
    ``Im(u^H D(f*) v)^2 / sigma``. The conjugate frequency ``-f*`` carries the complex-conjugate
    block, whose ``s_1`` moves identically, so the pair contributes once (verified against finite
    differences of the FFT norm).

    Parameters
    ----------
    kernel : Tensor (C_out, C_in, kh, kw)
    D : Tensor (..., C_out, C_in, kh, kw)
        Directions.
    input_size, padding, dilation
        Circular padding, stride 1, output size == input size (the FFT case).
    result : ConvOpNorm, optional
        Precomputed ``conv_opnorm(..., method="fft")``.

    Returns
    -------
    Tensor (...)
        Ill-defined where ``result.degenerate`` (a tie between different frequency pairs).
    """
    g = _geometry(kernel, input_size, 1, padding, dilation, "circular")
    if not _fft_applicable(g, kernel):
        raise ValueError("conv_hessian_quadform: only circular padding, stride 1, "
                         "'same' output size is supported")
    if result is None or result.method != "fft":
        result = _conv_fft(kernel, g, 1e-3)
    assert result.freq is not None
    freqs = torch.tensor([result.freq], device=kernel.device)
    K = _symbol(kernel, g, freqs)[0]
    U, S, Vh = torch.linalg.svd(K, full_matrices=False)
    batch = D.shape[:-4]
    Df = _symbol_batched(D.reshape(-1, *D.shape[-4:]), g, freqs)  # (B, C_out, C_in)
    u1, v1 = U[:, 0], Vh[0].conj()
    p = Df @ v1                                          # (B, C_out)
    q = Df.mH @ u1                                       # (B, C_in)
    m, n = K.shape
    val = quadform_from_svd(S, U, Vh.mH, p, q, m, n)
    return val.reshape(batch).to(kernel.dtype)


def _symbol_batched(Ds: Tensor, g: _Geometry, freqs: Tensor) -> Tensor:
    """``D(f*)`` for a batch of kernels (B, C_out, C_in, kh, kw) -> (B, C_out, C_in)."""
    B, C_out, C_in, kh, kw = Ds.shape
    flat = Ds.permute(1, 0, 2, 3, 4).reshape(C_out, B * C_in, kh, kw)
    Kf = _symbol(flat, g, freqs)[0]                      # (C_out, B*C_in)
    return Kf.reshape(C_out, B, C_in).permute(1, 0, 2)


def conv_matrix_proxy(kernel: Tensor) -> Tensor:
    """The "matrix" definition: ``s_1`` of the kernel reshaped to ``C_out x (C_in kh kw)``.

    Parameters
    ----------
    kernel : Tensor (..., C_out, C_in, kh, kw)

    Returns
    -------
    Tensor (...)
    """
    return torch.linalg.matrix_norm(kernel.flatten(-3), ord=2)
