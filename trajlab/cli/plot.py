"""``trajlab plot ANALYSIS``: the paper's figures of an analysis store as PNG files."""

from __future__ import annotations

import argparse
from pathlib import Path

from trajlab.cli._args import add_storage_options
from trajlab.cli._util import save_figure

PLOTS = {
    "validation": "plot_validation",
    "drift": "plot_drift",
    "noise": "plot_noise_split",
    "band": "plot_band",
}


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="write the figures of an analysis store as PNG")
    p.add_argument("analysis", help="analysis store written by `trajlab analyze`")
    p.add_argument("--kind", nargs="+", choices=list(PLOTS), default=None,
                   help="figures to write (default: all of them, "
                   f"{', '.join(PLOTS)})")
    p.add_argument("--out-dir", default=None,
                   help="folder for the PNGs (default: beside the store; for a URL store, "
                   "the current folder)")
    add_storage_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trajlab.analysis import open_analysis
    from trajlab.plot import needed_variables
    from trajlab.store.target import local_path

    ds = open_analysis(args.analysis, storage_options=args.storage_options)
    where = str(args.analysis).rstrip("/")
    name = Path(where).name.removesuffix(".zarr") or "analysis"
    local = local_path(args.analysis)
    out = Path(args.out_dir) if args.out_dir else (local.parent if local is not None
                                                   else Path.cwd())
    out.mkdir(parents=True, exist_ok=True)
    for kind in args.kind or list(PLOTS):
        fn = PLOTS[kind]
        sub = ds[needed_variables(fn, ds)].compute()  # only what the figure draws
        path = out / f"{name}_{kind}.png"
        try:
            fig = getattr(sub.lipschitz, fn)()
        except ValueError as e:  # nothing of this kind to draw (e.g. no noise terms)
            print(f"{kind}: not drawn: {e}")
            continue
        save_figure(fig, path)
        print(f"{kind} -> {path}")
    return 0
