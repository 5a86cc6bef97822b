"""Benchmark of trajlab.spectral: fast paths against their dense references.

Usage: ``python benchmarks/spectral.py [--quick] [--only conv-steps] [--threads N]``. Prints
tables of timings and ratios, all measured in this run (median of repeats,
``time.perf_counter``, one torch thread unless ``--threads``), with the machine's load average and
``OMP_WAIT_POLICY``. Not a test.

The ``conv-steps`` section times the exact operator norm of a small ResNet's 3x3 convolutions
(zero padding) along 40 slowly perturbed kernels, cold and warm-started, against one
``torch.linalg.svd`` of the reshaped ``C_out x C_in*9`` kernel measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

from trajlab.spectral import (
    conv_matrix_proxy,
    conv_opnorm,
    conv_opnorm_series,
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


#: A small ResNet's 3x3 convolutions: (channels, input size, stride), zero padding 1.
RESNET_LAYERS = [(16, 32, 1), (16, 32, 2), (32, 16, 1), (32, 16, 2), (64, 8, 1), (64, 8, 2)]


def kernel_sequence(c: int, steps: int, step_size: float, seed: int) -> torch.Tensor:
    """He-initialised ``(c, c, 3, 3)`` kernel and a random walk ``W_t = W_{t-1} + s * noise``.

    ``noise`` has standard normal entries (so a step moves each weight by ``step_size``, i.e.
    0.85% of the He scale for 16 channels, 1.7% for 64).
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, 3, 3, generator=g, dtype=torch.float64) * (2 / (9 * c)) ** 0.5
    noise = torch.randn(steps, c, c, 3, 3, generator=g, dtype=torch.float64)
    noise[0] = 0
    return w + step_size * noise.cumsum(0)


def _cpu_per_call(fn, repeats: int) -> float:
    """Median CPU time of ``fn()`` in this process (one thread: robust to other load)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return statistics.median(ts)


def bench_conv_steps(steps: int, cold_steps: int, power_steps: int, step_size: float,
                     block: int, tols: tuple[float, ...], layers=RESNET_LAYERS) -> list[str]:
    """Exact operator norm per training step (cold and warm-started) against one reshaped SVD.

    Times are CPU seconds of this single-threaded process (``time.process_time``), so that other
    jobs on the machine inflate them less than wall-clock times; ``warm wall`` gives the
    wall-clock time of the warm sequence for comparison. Per layer: ``svd`` = one
    ``torch.linalg.svd`` of the reshaped ``C_out x 9 C_in`` kernel (median of 200); ``cold`` =
    ``conv_opnorm(method="lobpcg")`` without ``init`` (median over ``cold_steps`` steps);
    ``warm`` = the same warm-started from the previous step through all ``steps``
    (``conv_opnorm_series``), iterations median/max; ``power`` = the former block power iteration,
    warm-started, over ``power_steps`` steps; ``dev`` = largest relative difference of the warm
    values from the independent cold ones.
    """
    lines = [(f"{'layer (zero pad 1, 3x3)':24s} {'tol':>6s} {'svd':>6s} {'cold':>7s} "
              f"{'cold it':>7s} {'warm':>6s} {'wall':>6s} {'warm it':>8s} {'warm/svd':>8s} "
              f"{'power':>6s} {'pow it':>6s} {'dev':>8s}   (ms per step)")]
    for c, size, stride in layers:
        ks = kernel_sequence(c, steps, step_size, seed=c + stride)
        mat = ks[-1].reshape(c, -1)
        t_svd = _cpu_per_call(lambda mat=mat: torch.linalg.svd(mat), 200)
        for tol in tols:
            kw = {"padding": 1, "stride": stride, "tol": tol, "block": block}
            cold, cold_it, cold_sig = [], [], []
            for t in range(cold_steps):
                t0 = time.process_time()
                r = conv_opnorm(ks[t], size, **kw, method="lobpcg")
                cold.append(time.process_time() - t0)
                cold_it.append(r.n_iter)
                cold_sig.append(float(r.sigma))
            first = conv_opnorm(ks[0], size, **kw, method="lobpcg")
            t0, w0 = time.process_time(), time.perf_counter()
            ser = conv_opnorm_series(ks[1:], size, **kw, method="lobpcg", init=first)
            t_warm = (time.process_time() - t0) / (steps - 1)
            w_warm = (time.perf_counter() - w0) / (steps - 1)
            dev = max(abs(float(ser.sigma[t - 1]) / s - 1) for t, s in enumerate(cold_sig) if t)
            its = ser.n_iter.float()
            t_pow, p_its = float("nan"), float("nan")
            if power_steps and tol == tols[0]:
                with warnings.catch_warnings():  # power may stop at max_iter: it is reported
                    warnings.simplefilter("ignore", RuntimeWarning)
                    prev = conv_opnorm(ks[0], size, **kw, method="power", max_iter=10000)
                    t0, n = time.process_time(), []
                    for k in ks[1:1 + power_steps]:
                        prev = conv_opnorm(k, size, **kw, method="power", max_iter=10000,
                                           init=prev)
                        n.append(prev.n_iter)
                    t_pow = (time.process_time() - t0) / power_steps
                    p_its = statistics.median(n)
            lines.append(
                f"{f'{c}->{c} @{size}x{size} s{stride}':24s} {tol:6.0e} {t_svd * 1e3:6.3f} "
                f"{statistics.median(cold) * 1e3:7.1f} {statistics.median(cold_it):7.0f} "
                f"{t_warm * 1e3:6.1f} {w_warm * 1e3:6.1f} "
                f"{f'{its.median():.0f}/{its.max():.0f}':>8s} {t_warm / t_svd:7.0f}x "
                f"{t_pow * 1e3:6.0f} {p_its:6.0f} {dev:8.1e}")
    return lines


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
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats/steps")
    ap.add_argument("--only", choices=["all", "matrices", "conv-steps"], default="all")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--steps", type=int, default=40, help="kernels per conv layer sequence")
    ap.add_argument("--step-size", type=float, default=1e-3,
                    help="W_t = W_{t-1} + step_size * N(0, 1) noise")
    ap.add_argument("--block", type=int, default=2, help="LOBPCG block size")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 5
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, load average {load}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    if args.only in ("all", "matrices"):
        rows: list = []
        bench_hessian(512, 512, 128, reps, rows)
        bench_hessian(*((1024, 512) if args.quick else (2048, 1024)), 128, reps, rows)
        bench_warm(1024 if args.quick else 2048, reps, rows)
        bench_conv(reps, 20 if args.quick else 100, rows)
        print(f"{'case':58s} {'ref [s]':>9s} {'fast [s]':>9s} {'ratio':>7s}  notes")
        for name, t_ref, t_fast, note in rows:
            print(f"{name:58s} {t_ref:9.4f} {t_fast:9.4f} {t_ref / t_fast:7.1f}x  {note}")
        for line in proxy_ratios():
            print(line)
    if args.only in ("all", "conv-steps"):
        steps = 10 if args.quick else args.steps
        print(f"\nexact conv operator norm along {steps} kernels W_t = W_(t-1) + "
              f"{args.step_size:g} * N(0, 1), He init, float64, LOBPCG block {args.block}")
        for line in bench_conv_steps(steps, 3, 0 if args.quick else 3, args.step_size,
                                     args.block, (1e-10,) if args.quick else (1e-10, 1e-6)):
            print(line)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at the end: {load}")


if __name__ == "__main__":
    main()
