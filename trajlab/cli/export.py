"""``trajlab export ANALYSIS --tensorboard DIR``: an analysis as TensorBoard scalars."""

from __future__ import annotations

import argparse

from trajlab.cli._args import add_storage_options, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write an analysis store's curves into another tool "
                       "(TensorBoard scalars at the run's optimizer steps)")
    p.add_argument("analysis", help="analysis store written by `trajlab analyze`")
    p.add_argument("--tensorboard", required=True, metavar="DIR",
                   help="TensorBoard log directory; the run's own one puts the curves beside "
                   "its training curves (needs: pip install \"trajlab[tensorboard]\")")
    p.add_argument("--run-name", default=None,
                   help="sub-folder of DIR to write into (a separate TensorBoard run)")
    p.add_argument("--layers", nargs="+", default=None, help="layers to write (default all)")
    p.add_argument("--every", type=positive_int, default=1,
                   help="write every N-th analysed step (default 1: all)")
    add_storage_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trajlab.export import to_tensorboard

    out = to_tensorboard(args.analysis, args.tensorboard, run_name=args.run_name,
                         layers=args.layers, every=args.every,
                         storage_options=args.storage_options)
    print(f"tensorboard -> {out} (view: tensorboard --logdir {args.tensorboard})")
    return 0
