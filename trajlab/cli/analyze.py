"""``trajlab analyze RUN [RUN ...] --out OUT``: the SDE terms of one or many runs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from trajlab.cli._args import add_storage_options, positive_int, step_range, unit_interval
from trajlab.cli._util import prediction_line

#: How to get a forward prediction where a run has none.
PROBE_HINT = ("record the run with a full-data probe (trajlab.Recorder(..., "
              "probe=trajlab.FullGradientProbe(...)))")


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="compute the SDE terms of runs into analysis stores")
    p.add_argument("run", nargs="+", help="run store(s) (paths or URLs)")
    p.add_argument("--out", required=True,
                   help="analysis store to write (resumed if unfinished); with several runs, a "
                   "folder that receives one <run name>.zarr per run")
    p.add_argument("--scheduler", default="auto",
                   help="auto (default: in-process for small analyses, a local cluster when it "
                   "pays), cluster, threads, processes, synchronous, or a Dask scheduler "
                   "address (tcp://host:8786)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="worker processes of the local cluster (threads of 'threads')")
    p.add_argument("--layers", nargs="+", default=None, help="layers to analyse (default all)")
    p.add_argument("--steps", type=step_range, default=None,
                   help="step range START:STOP (stop exclusive)")
    p.add_argument("--chunk-rows", type=positive_int, default=None, help="steps per task")
    p.add_argument("--gradient", choices=["auto", "batch", "probe"], default="auto")
    p.add_argument("--gap-tol", type=unit_interval, default=1e-3,
                   help="relative spectral gap below which steps are flagged degenerate")
    p.add_argument("--conv-definition", choices=["matrix", "operator"], default="matrix",
                   help="operator: also compute exact convolution operator norms (MATH.md §6b)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing analysis stores (never anything else)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_storage_options(p)
    p.set_defaults(func=run)


def outputs(runs: list[str], out: str) -> list[str]:
    """One analysis store per run: ``out`` itself for one run, ``out/<run name>.zarr`` for
    several (names must differ)."""
    if len(runs) == 1:
        return [out]
    names = [Path(r.rstrip("/")).name.removesuffix(".zarr") for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"several runs are named {dupes[0]!r}; give each run store a distinct "
                         "name or analyse them one at a time")
    if out.rstrip("/").endswith(".zarr"):
        raise ValueError(f"with several runs --out is a folder that gets one analysis store per "
                         f"run ({names[0]}.zarr, ...); {out!r} looks like one store's name: "
                         "give a folder (e.g. --out analyses/)")
    if "://" not in out:
        Path(out).mkdir(parents=True, exist_ok=True)
    return [f"{out.rstrip('/')}/{n}.zarr" for n in names]


def run(args: argparse.Namespace) -> int:
    from trajlab.analysis import analyze, engine

    outs = outputs(args.run, args.out)
    scheduler = {"cluster": None}.get(args.scheduler, args.scheduler)
    if scheduler != "auto":
        print(f"analysing on {engine.describe(scheduler, args.workers)}")
    t0 = time.perf_counter()
    result = analyze(
        args.run if len(args.run) > 1 else args.run[0],
        out=outs if len(args.run) > 1 else outs[0],
        layers=args.layers, steps=args.steps, scheduler=scheduler, workers=args.workers,
        chunk_rows=args.chunk_rows, gradient=args.gradient, gap_tol=args.gap_tol,
        conv_definition=args.conv_definition, overwrite=args.overwrite,
        progress=not args.quiet, on_schedule=None if scheduler != "auto" else _announce,
        storage_options=args.storage_options,
    )
    datasets = result if isinstance(result, list) else [result]
    took = time.perf_counter() - t0
    for ds, out in zip(datasets, outs):
        print(f"analysed {ds.sizes['step']} steps x {ds.sizes['layer']} layers -> {out}")
        line = prediction_line(ds, missing=PROBE_HINT)
        print(f"  {line}" if len(datasets) > 1 else line)
    print(f"done in {took:.1f} s; open with trajlab.open_analysis({outs[0]!r})"
          + (" or trajlab.open_analyses([...])" if len(outs) > 1 else ""))
    return 0


def _announce(where: str) -> None:
    print(f"analysing on {where}")
