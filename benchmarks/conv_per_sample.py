"""Benchmark: the two ways of forming a Conv2d layer's per-sample weight gradients.

Usage: ``python benchmarks/conv_per_sample.py [--quick] [--device cpu|cuda] [--batch B]
[--threads N]``.

For 3x3 convolutions over a grid of input channels C, spatial sizes H, output channels m and
strides: the time of im2col + batched matmul (``F.unfold`` then ``torch.bmm``) and of one
weight-gradient convolution with ``groups = B`` (``torch.nn.grad.conv2d_weight``), best of
three after a warm-up, their ratio, the method
:func:`trajlab.record.rules.conv2d.grouped_is_faster` picks for the shape, and what the pick
costs against the faster of the two. Both give the same numbers to float rounding
(tests/record/test_conv_per_sample.py). Not a test.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from trajlab.record.rules.conv2d import grouped_is_faster, grouped_weight_grads


def timed(fn, device: torch.device) -> float:
    """Best of three (ms) after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few shapes only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    B = args.batch
    chans, sizes, outs = ([3, 32, 128], [8, 32], [16, 128]) if args.quick else (
        [1, 3, 16, 32, 64, 128], [4, 8, 16, 32], [16, 64, 128])
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load "
          f"{os.getloadavg()[0]:.2f}, batch {B}, 3x3 kernels, padding 1")
    print(f"{'C':>4} {'H':>3} {'m':>4} {'s':>2} {'P':>5} {'im2col ms':>10} {'grouped ms':>11} "
          f"{'ratio':>6}  pick     pick/best")
    regret = []
    totals = {"im2col": 0.0, "pick": 0.0, "best": 0.0}
    for C, H, m, s in itertools.product(chans, sizes, outs, [1, 2]):
        if C * H * H * B > 8e6 or (m > C * 8 and C > 3):
            continue
        x = torch.randn(B, C, H, H, device=device)
        oh = (H + 2 - 3) // s + 1
        d = torch.randn(B, m, oh, oh, device=device)

        def im2col(x=x, d=d, s=s, m=m):
            act = F.unfold(x, 3, padding=1, stride=s)
            return torch.bmm(d.reshape(B, m, -1), act.transpose(1, 2))

        def grouped(x=x, d=d, s=s):
            return grouped_weight_grads(x, d, (3, 3), (s, s), (1, 1), (1, 1))

        a, b = timed(im2col, device), timed(grouped, device)
        pick = grouped_is_faster(device, C, m, oh * oh)
        cost = (b if pick else a) / min(a, b)
        regret.append(cost)
        totals["im2col"] += a
        totals["pick"] += b if pick else a
        totals["best"] += min(a, b)
        print(f"{C:4d} {H:3d} {m:4d} {s:2d} {oh * oh:5d} {a:10.3f} {b:11.3f} {b / a:6.2f}  "
              f"{'grouped' if pick else 'im2col ':8} {cost:6.2f}x", flush=True)
    regret.sort()
    print(f"\npick / best over {len(regret)} shapes: median {regret[len(regret) // 2]:.2f}x, "
          f"worst {regret[-1]:.2f}x; summed over the shapes: im2col always "
          f"{totals['im2col']:.1f} ms, the pick {totals['pick']:.1f} ms, the best "
          f"{totals['best']:.1f} ms")


if __name__ == "__main__":
    main()
