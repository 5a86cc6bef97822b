"""Weights against the previous step (issue 26 item 2): bytes of lossless weight encodings.

Usage: ``python benchmarks/weight_encoding.py [--steps N] [--dir DIR]``.

Records two runs (the demo ConvNet on scikit-learn digits, B=64; an MLP 784-512-512-10 on
random data, SGD lr 0.05, B=64, N/2 steps), reads their weights back, and re-encodes them chunk
by chunk (16/128 rows for the ConvNet, 8/32/128 for the MLP) with blosc + bit shuffle as the
store does: the stored layout (step axis last, LZ4), XOR of the float bits with the previous
row (with and without the transpose), the integer difference of the bits, zstd-1 on the stored
layout and on XOR, and the order-0 entropy of the XOR bit planes (each bit position of the XOR
residuals coded at its own frequency: a bound for any per-bit-plane coder of them). Prints
bytes / raw bytes per encoding. Every encoding here is exact (XOR and the integer difference of
bit patterns invert bit for bit, NaN, inf and -0.0 included); the figures are in
docs/format.md, *Chunking and compression*.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numcodecs
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import trajlab
from trajlab.recipes import TrainConfig, record_digits


def _blosc(data: np.ndarray, cname: str) -> int:
    codec = numcodecs.Blosc(cname=cname, clevel=5 if cname == "lz4" else 1,
                            shuffle=numcodecs.Blosc.BITSHUFFLE, typesize=data.dtype.itemsize)
    return len(codec.encode(np.ascontiguousarray(data)))


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def encodings(bits: np.ndarray) -> dict[str, float]:
    """Encoded bytes of one chunk of weight rows (``bits``: (rows, ...) unsigned ints)."""
    xor = bits.copy()
    xor[1:] ^= bits[:-1]
    diff = bits.copy()
    diff[1:] = bits[1:] - bits[:-1]
    last = lambda a: np.moveaxis(a, 0, -1)  # the store's transpose (step last)
    width = 8 * bits.dtype.itemsize
    planes = ((xor[1:].reshape(-1, 1) >> np.arange(width, dtype=bits.dtype)) & 1).mean(0)
    return {
        "stored (step last, LZ4)": _blosc(last(bits), "lz4"),
        "XOR previous, LZ4": _blosc(xor, "lz4"),
        "XOR previous, step last, LZ4": _blosc(last(xor), "lz4"),
        "integer difference, step last, LZ4": _blosc(last(diff), "lz4"),
        "stored layout, zstd-1": _blosc(last(bits), "zstd"),
        "XOR, step last, zstd-1": _blosc(last(xor), "zstd"),
        "order-0 entropy of XOR bit planes": (_entropy_bits(planes).sum() / 8 * xor[1:].size
                                              + xor[0].nbytes),
    }


def measure(store: Path, rows_per_chunk: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """Ratio (encoded / raw) of every encoding per chunk length, over all recorded weights."""
    run = trajlab.open_run(store)
    weights = [run.rows.array(f"{run.layout.group_path(run.layer_meta(n))}/weight")[...]
               for n in run.layers]
    out = {}
    for c in rows_per_chunk:
        n = run.n_steps - run.n_steps % c
        if n == 0:
            continue  # the run is shorter than one chunk of this length
        total: dict[str, float] = {}
        raw = 0
        for w in weights:
            bits = w.view(np.uint32 if w.dtype == np.float32 else np.uint64)
            raw += bits[:n].nbytes
            for i in range(0, n, c):
                for k, v in encodings(bits[i:i + c]).items():
                    total[k] = total.get(k, 0.0) + v
        out[c] = {k: v / raw for k, v in total.items()}
    return out


def _record_mlp(store: Path, steps: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 784, generator=g)
    Y = torch.randint(0, 10, (2048,), generator=g)
    with trajlab.Recorder(model, store, optimizer=opt) as rec:
        for _ in range(steps):
            idx = torch.randint(0, 2048, (64,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--dir", type=Path, default=None)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        record_digits(root / "demo.zarr", TrainConfig(steps=args.steps), progress=False)
        _record_mlp(root / "mlp.zarr", args.steps // 2)
        for label, store, chunks in (("demo ConvNet", root / "demo.zarr", (16, 128)),
                                     ("MLP 784-512-512-10", root / "mlp.zarr", (8, 32, 128))):
            for c, ratios in measure(store, chunks).items():
                print(f"{label}, {c} rows per chunk: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
