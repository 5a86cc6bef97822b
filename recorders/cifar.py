#!/usr/bin/env python
"""Record the five-layer ConvNet on CIFAR-10/100 from the official *binary* distribution.

Download cifar-10-binary.tar.gz or cifar-100-binary.tar.gz from
https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and pass the folder as --root.

Examples
--------
    python recorders/cifar.py runs/cifar10.zarr --root ~/data --steps 5000 --batch-size 128
    python recorders/cifar.py runs/c100.zarr --root ~/data --dataset cifar100 --every 10
"""

from __future__ import annotations

import argparse

from trajlab.cli import format_info
from trajlab.recipes import add_config_arguments, config_from_arguments, record_cifar, run_script


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", help="run store to create (path or fsspec URL)")
    p.add_argument("--root", required=True, help="folder holding cifar-10-batches-bin/ or "
                   "cifar-100-binary/ (or that folder itself)")
    p.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(p, exclude=("model", "hidden", "channels"))  # the ConvNet is fixed
    return p


def record(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    cfg = config_from_arguments(args)
    path = record_cifar(args.root, args.out, cfg, dataset=args.dataset, limit=args.limit,
                        overwrite=args.overwrite, progress=not args.quiet)
    print(format_info(str(path)))


if __name__ == "__main__":
    run_script(parser(), record)
