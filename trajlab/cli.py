"""The ``trajlab`` command: demo, info, analyze, plot. A thin shell over the library."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _sigma1(W: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(W, dtype=np.float64), ord=2))


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def format_info(path: str) -> str:
    """Human-readable summary of a run store: layers, shapes, steps, sizes and integrity."""
    import trajlab

    run = trajlab.open_run(path)
    meta = run.meta
    steps = run.steps
    lines = [f"run store   {path}", f"format      v{meta.format_version}, dtype {meta.dtype}, "
             f"created {meta.created}, trajlab {meta.trajlab_version}, torch {meta.torch_version}"]
    if steps.size:
        lines.append(
            f"steps       {steps.size} recorded (every {meta.every}): {steps[0]} .. {steps[-1]}"
        )
    else:
        lines.append("steps       none committed")
    lines.append(f"sampler     {meta.sampler}, dataset size {meta.dataset_size}")
    bs = run.root.batch_size.values
    if bs.size:
        lines.append(f"batch size  {int(bs.min())}..{int(bs.max())}")
    lines.append("layers")
    width = max(len(n) for n in run.layers)
    for name in run.layers:
        lm = run.layer_meta(name)
        ds = run.layer(name)
        sk = "exact rank-1 factors" if lm.sketch == "rank1" else f"top-{lm.rank} subspace sketch"
        nonfinite = int(ds.nonfinite.sum().values) if steps.size else 0
        extra = f", {nonfinite} steps with NaN/Inf" if nonfinite else ""
        lines.append(
            f"  {name:<{width}}  {lm.module:<7} W {lm.shape[0]}x{lm.shape[1]}  "
            f"{lm.positions} position(s)  {sk}  {_human(run.layer_nbytes_stored(name))}{extra}"
        )
    problems = _integrity(run)
    lines.append(f"stored      {_human(run.nbytes_stored())} compressed")
    lines.append("integrity   " + ("ok" if not problems else "; ".join(problems)))
    return "\n".join(lines)


def _integrity(run) -> list[str]:
    problems = []
    if run.meta.truncated:
        problems.append(f"truncated ({run.meta.truncated})")
    steps = run.steps
    if steps.size > 1:
        gaps = np.flatnonzero(np.diff(steps) != run.meta.every)
        if gaps.size:
            problems.append(f"{gaps.size} gap(s) in the step sequence (first after {steps[gaps[0]]})")
    raw = run._group["step"]
    if raw.shape[0] > run.n_steps:
        problems.append(f"{raw.shape[0] - run.n_steps} row(s) past the commit marker ignored "
                        "(still recording, or an interrupted write)")
    return problems


def cmd_info(args: argparse.Namespace) -> int:
    print(format_info(args.run))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import trajlab
    from trajlab.recipes import TrainConfig, record_digits

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "run.zarr"
    if store.exists() and not args.overwrite:
        raise FileExistsError(f"{store} exists; pass --overwrite to replace the demo run")
    cfg = TrainConfig(model="convnet", steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    print(f"trajlab demo: training a ConvNet on scikit-learn's digits for {cfg.steps} steps "
          f"(batch {cfg.batch_size}, lr {cfg.lr}), recording every step into {store}")
    t0 = time.perf_counter()
    record_digits(store, cfg, overwrite=args.overwrite, progress=not args.quiet)
    t_rec = time.perf_counter() - t0
    run = trajlab.open_run(store)
    print(f"recorded {run.n_steps} steps in {t_rec:.1f} s; store {_human(run.nbytes_stored())}")
    print(f"{'layer':<8}{'module':<8}{'W shape':<10}{'K(start)':>10}{'K(end)':>10}")
    k0 = k1 = 1.0
    for name in run.layers:
        lm = run.layer_meta(name)
        w = run.layer(name).weight
        a, b = _sigma1(w[0].values), _sigma1(w[-1].values)
        k0, k1 = k0 * a, k1 * b
        print(f"{name:<8}{lm.module:<8}{f'{lm.shape[0]}x{lm.shape[1]}':<10}{a:>10.4f}{b:>10.4f}")
    print(f"{'network bound (product)':<26}{k0:>10.4f}{k1:>10.4f}")
    loss = run.root.loss.values
    print(f"loss {loss[0]:.3f} -> {np.nanmean(loss[-20:]):.3f} (mean of the last 20 steps)")
    return _demo_analysis(store, out, args)


def _demo_analysis(store: Path, out: Path, args: argparse.Namespace) -> int:
    from trajlab.analysis import analyze

    t0 = time.perf_counter()
    scheduler = "threads" if args.workers == 0 else None
    where = "threads" if scheduler else f"a local Dask cluster ({args.workers or 'one worker per core'})"
    print(f"analysing on {where} ...")
    ds = analyze(store, out=out / "analysis.zarr", overwrite=True, progress=not args.quiet,
                 scheduler=scheduler, workers=args.workers)
    print(f"analysed {ds.sizes['step']} steps x {ds.sizes['layer']} layers in "
          f"{time.perf_counter() - t0:.1f} s -> {out / 'analysis.zarr'}")
    last = ds.isel(step=-1).compute()
    err = float(np.abs(last.K_pathwise - last.K).max() / last.K.max())
    print(f"pathwise reconstruction of K at the last step: max relative error {err:.1e}")
    print(f"log K_net: measured change {float(last.logK - ds.logK[0]):+.3f}, SDE drift "
          f"predicts {float(last.logK_pred_mean - ds.logK[0]):+.3f} "
          f"(± {1.96 * float(np.sqrt(last.logK_pred_var)):.3f}, 95%)")
    path = out / "theory_vs_measured.png"
    _save(ds.lipschitz.plot_validation(), path)
    _save(ds.lipschitz.plot_drift(), out / "drift_decomposition.png")
    print(f"figures -> {path}, {out / 'drift_decomposition.png'}")
    return 0


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_steps(text: str | None):
    if text is None:
        return None
    lo, _, hi = text.partition(":")
    return (int(lo) if lo else -(2**62), int(hi) if hi else 2**62)


def cmd_analyze(args: argparse.Namespace) -> int:
    from trajlab.analysis import analyze

    t0 = time.perf_counter()
    ds = analyze(
        args.run,
        out=args.out,
        layers=args.layers,
        steps=_parse_steps(args.steps),
        scheduler=args.scheduler,
        workers=args.workers,
        chunk_rows=args.chunk_rows,
        gradient=args.gradient,
        conv_definition=args.conv_definition,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(f"analysed {ds.sizes['step']} steps x {ds.sizes['layer']} layers in "
          f"{time.perf_counter() - t0:.1f} s -> {args.out}")
    print("open it with: trajlab.open_analysis(" + repr(str(args.out)) + ")")
    return 0


PLOTS = {
    "validation": "plot_validation",
    "drift": "plot_drift",
    "noise": "plot_noise_split",
    "band": "plot_band",
}


def cmd_plot(args: argparse.Namespace) -> int:
    from trajlab.analysis import open_analysis

    ds = open_analysis(args.analysis).compute()
    out = Path(args.out_dir or Path(str(args.analysis)).parent)
    out.mkdir(parents=True, exist_ok=True)
    for kind in args.kind:
        path = out / f"{kind}.png"
        _save(getattr(ds.lipschitz, PLOTS[kind])(), path)
        print(f"{kind} -> {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trajlab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="record, analyse and plot a short run on the digits data")
    d.add_argument("--out", default="trajlab-demo", help="output folder (default: %(default)s)")
    d.add_argument("--steps", type=int, default=1000)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--lr", type=float, default=0.05)
    d.add_argument("--overwrite", action="store_true", help="replace an existing demo run")
    d.add_argument("--workers", type=int, default=None,
                   help="Dask worker processes for the analysis (default: one per core; "
                   "0 = threads in this process)")
    d.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    a = sub.add_parser("analyze", help="compute the SDE terms of a run into an analysis store")
    a.add_argument("run", help="run store (path or URL)")
    a.add_argument("--out", required=True, help="analysis store to write (resumed if unfinished)")
    a.add_argument("--scheduler", default=None,
                   help="Dask scheduler address (tcp://host:8786) or threads|processes|"
                   "synchronous; default: a local cluster")
    a.add_argument("--workers", type=int, default=None, help="local cluster worker processes")
    a.add_argument("--layers", nargs="+", default=None, help="layers to analyse (default all)")
    a.add_argument("--steps", default=None, help="step range START:STOP (stop exclusive)")
    a.add_argument("--chunk-rows", type=int, default=None, help="steps per task")
    a.add_argument("--gradient", choices=["auto", "batch", "probe"], default="auto")
    a.add_argument("--conv-definition", choices=["matrix", "operator"], default="matrix",
                   help="operator: also compute exact conv operator norms (MATH.md §6b)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing analysis")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_analyze)

    pl = sub.add_parser("plot", help="write the figures of an analysis store as PNG")
    pl.add_argument("analysis", help="analysis store written by `trajlab analyze`")
    pl.add_argument("--kind", nargs="+", choices=sorted(PLOTS), default=["validation", "drift"])
    pl.add_argument("--out-dir", default=None, help="folder for the PNGs (default: beside it)")
    pl.set_defaults(func=cmd_plot)

    i = sub.add_parser("info", help="describe a run store: layers, shapes, steps, sizes, integrity")
    i.add_argument("run")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    import trajlab

    if "MPLBACKEND" not in __import__("os").environ:
        import matplotlib

        matplotlib.use("Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, trajlab.StoreError, ValueError, KeyError) as e:
        print(f"trajlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
