#!/usr/bin/env python
"""Record a training run on scikit-learn's handwritten digits (no download needed).

Examples
--------
    python recorders/digits.py runs/base.zarr --steps 2000 --lr 0.05
    python recorders/digits.py runs/mlp.zarr --model mlp --optimizer momentum --label-noise 0.2
    python recorders/digits.py runs/rr.zarr --sampler reshuffle --probe-every 50
"""

from __future__ import annotations

import argparse

from trajlab.cli import format_info
from trajlab.recipes import add_config_arguments, config_from_arguments, record_digits, run_script


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", help="run store to create (path or fsspec URL)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(p)
    return p


def record(args: argparse.Namespace) -> None:
    cfg = config_from_arguments(args)
    path = record_digits(args.out, cfg, overwrite=args.overwrite, progress=not args.quiet)
    print(format_info(str(path)))


if __name__ == "__main__":
    run_script(parser(), record)
