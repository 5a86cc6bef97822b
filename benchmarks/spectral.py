"""Benchmark of trajlab.spectral: fast paths against their dense references.

Usage: ``python benchmarks/spectral.py [--quick]``. Prints a table of timings and ratios, all
measured in this run (median of repeats, ``time.perf_counter``, default torch thread count).
Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from trajlab.spectral import (
    conv_matrix_proxy,
    conv_opnorm,
    hessian_quadform_proj,
    top_singular,
)


def timeit(fn, repeats: int):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def spiked(m: int, n: int, dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian bulk (edge ~2) plus three strong directions (4, 3, 2.5): relative gap ~0.2."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64) / max(m, n) ** 0.5
    for s in (4.0, 3.0, 2.5):
        a = torch.randn(m, 1, generator=g, dtype=torch.float64)
        b = torch.randn(1, n, generator=g, dtype=torch.float64)
        W += s * (a / a.norm()) @ (b / b.norm())
    return W.to(dtype)


def bench_hessian(m: int, n: int, B: int, repeats: int, rows: list) -> None:
    dtype = torch.float64
    W = spiked(m, n, dtype)
    g = torch.Generator().manual_seed(1)
    top = top_singular(W, method="svd")
    # B per-sample gradients of a Linear layer, D_i = delta_i a_i^T (rank one), given as the
    # projections the recorder stores: D_i v_1 and D_i^T u_1.
    delta = torch.randn(B, m, generator=g, dtype=dtype)
    act = torch.randn(B, n, generator=g, dtype=dtype)
    Dv = delta * (act @ top.V[:, 0])[:, None]
    Dtu = act * (delta @ top.U[:, 0])[:, None]

    def svd_form():
        return hessian_quadform_proj(W, Dv, Dtu, method="svd")

    def resolvent():
        return hessian_quadform_proj(W, Dv, Dtu, method="resolvent", top=top, tol=1e-6)

    def resolvent_cold():  # includes computing (s_1, u_1, v_1) iteratively from scratch
        return hessian_quadform_proj(W, Dv, Dtu, method="resolvent", tol=1e-6)

    t_svd, ref = timeit(svd_form, repeats)
    t_res, val = timeit(resolvent, repeats)
    t_cold, val2 = timeit(resolvent_cold, repeats)
    err = float(((val - ref).abs() / ref.abs()).max())
    err2 = float(((val2 - ref).abs() / ref.abs()).max())
    name = f"hessian B={B} {m}x{n} f64 (gap {float(top.gap):.2f})"
    rows.append((name + " resolvent|top", t_svd, t_res, f"rel err {err:.1e}"))
    rows.append((name + " resolvent+top", t_svd, t_cold, f"rel err {err2:.1e}"))


def bench_warm(n: int, repeats: int, rows: list) -> None:
    for dtype in (torch.float64, torch.float32):
        W = spiked(n, n, dtype)
        g = torch.Generator().manual_seed(2)
        G = (torch.randn(n, 8, generator=g, dtype=dtype) @ torch.randn(8, n, generator=g,
                                                                          dtype=dtype)
             + 0.1 * torch.randn(n, n, generator=g, dtype=dtype))
        W1 = W + 1e-3 * W.norm() * G / G.norm()
        t0 = top_singular(W, method="svd")
        t_svd, _ = timeit(lambda: torch.linalg.svd(W1), repeats)
        t_warm, r = timeit(lambda: top_singular(W1, init=t0, method="iterative"), repeats)
        ref = torch.linalg.svdvals(W1.double())[0]
        err = abs(float(r.S[0]) - float(ref)) / float(ref)
        rows.append((f"top_singular warm {n}x{n} {str(dtype)[6:]}", t_svd, t_warm,
                     f"{r.n_iter} it, res {float(r.residual):.1e}, s1 err {err:.1e}"))


def bench_conv(repeats: int, iters: int, rows: list) -> None:
    dtype = torch.float64
    g = torch.Generator().manual_seed(3)
    k = torch.randn(64, 64, 3, 3, generator=g, dtype=dtype) * (2 / (64 * 9)) ** 0.5
    kw = dict(padding=1, padding_mode="circular")
    t_fft, a = timeit(lambda: conv_opnorm(k, 32, **kw), repeats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t_pow, b = timeit(lambda: conv_opnorm(k, 32, **kw, method="power", max_iter=iters), 1)
    err = abs(float(b.sigma - a.sigma)) / float(a.sigma)
    rows.append((f"conv 64x64x3x3 @32x32 circ: fft vs power({iters} it)", t_pow, t_fft,
                 f"power rel err {err:.1e}, res {float(b.residual):.1e}"))


def proxy_ratios() -> list[str]:
    out = []
    for shape in ((64, 64, 3, 3), (16, 3, 3, 3)):
        g = torch.Generator().manual_seed(4)
        fan_in = shape[1] * shape[2] * shape[3]
        k = torch.randn(shape, generator=g, dtype=torch.float64) * (2 / fan_in) ** 0.5
        exact = conv_opnorm(k, 32, padding=1, padding_mode="circular").sigma
        out.append(f"He-init {'x'.join(map(str, shape))} on 32x32 (circular, pad 1): "
                   f"exact/proxy = {float(exact / conv_matrix_proxy(k)):.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    args = ap.parse_args()
    reps = 3 if args.quick else 5
    rows: list = []
    bench_hessian(512, 512, 128, reps, rows)
    bench_hessian(*((1024, 512) if args.quick else (2048, 1024)), 128, reps, rows)
    bench_warm(1024 if args.quick else 2048, reps, rows)
    bench_conv(reps, 20 if args.quick else 100, rows)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'case':58s} {'ref [s]':>9s} {'fast [s]':>9s} {'ratio':>7s}  notes")
    for name, t_ref, t_fast, note in rows:
        print(f"{name:58s} {t_ref:9.4f} {t_fast:9.4f} {t_ref / t_fast:7.1f}x  {note}")
    for line in proxy_ratios():
        print(line)


if __name__ == "__main__":
    main()
