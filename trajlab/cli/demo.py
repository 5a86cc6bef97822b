"""``trajlab demo``: record, analyse and plot a short run on the embedded digits data."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from trajlab.cli._args import batch_size, nonnegative_int, positive_float, positive_int
from trajlab.cli._util import human, prediction_line, save_figure


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="record, analyse and plot a short run on the digits data")
    p.add_argument("--out", default="trajlab-demo", help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--batch-size", type=batch_size, default=64)
    p.add_argument("--lr", type=positive_float, default=0.05)
    p.add_argument("--probe-every", type=nonnegative_int, default=10,
                   help="full-data gradient every k steps, the expected gradient of the "
                   "forward prediction (0 = none: no prediction; default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the demo's run and analysis stores")
    p.add_argument("--workers", type=nonnegative_int, default=None,
                   help="Dask worker processes for the analysis (default: chosen by the amount "
                   "of work; 0 = threads in this process)")
    p.add_argument("--threads", type=nonnegative_int, default=0,
                   help="torch threads for training (0 = torch default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import trajlab
    from trajlab.recipes import TrainConfig, record_digits

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "run.zarr"
    cfg = TrainConfig(model="convnet", steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      probe_every=args.probe_every)
    probe = (f", a full-data gradient every {cfg.probe_every} steps" if cfg.probe_every
             else ", no full-data gradient (no forward prediction)")
    print(f"trajlab demo: training a ConvNet on scikit-learn's digits for {cfg.steps} steps "
          f"(batch {cfg.batch_size}, lr {cfg.lr}{probe}), recording every step into {store}")
    t0 = time.perf_counter()
    record_digits(store, cfg, overwrite=args.overwrite, progress=not args.quiet)
    t_rec = time.perf_counter() - t0
    run = trajlab.open_run(store)
    print(f"recorded {run.n_steps} steps in {t_rec:.1f} s; store {human(run.nbytes_stored())}")
    print(f"{'layer':<8}{'module':<8}{'W shape':<10}{'K(start)':>10}{'K(end)':>10}")
    k0 = k1 = 1.0
    for name in run.layers:
        lm = run.layer_meta(name)
        w = run.layer_rows(name, ["weight"], (0, 1))["weight"][0]
        w1 = run.layer_rows(name, ["weight"], (run.n_steps - 1, run.n_steps))["weight"][0]
        a, b = _sigma1(w), _sigma1(w1)
        k0, k1 = k0 * a, k1 * b
        print(f"{name:<8}{lm.module:<8}{f'{lm.shape[0]}x{lm.shape[1]}':<10}{a:>10.4f}{b:>10.4f}")
    print(f"{'product of the layer norms':<26}{k0:>10.4f}{k1:>10.4f}")
    loss = run.root_rows(["loss"])["loss"]
    print(f"loss {loss[0]:.3f} -> {np.nanmean(loss[-20:]):.3f} (mean of the last 20 steps)")
    return _analysis(store, out, args)


def _sigma1(W: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(W, dtype=np.float64), ord=2))


def _analysis(store: Path, out: Path, args: argparse.Namespace) -> int:
    from trajlab.analysis import analyze

    t0 = time.perf_counter()
    scheduler = "threads" if args.workers == 0 else ("auto" if args.workers is None else None)
    ds = analyze(store, out=out / "analysis.zarr", overwrite=True, progress=not args.quiet,
                 scheduler=scheduler, workers=args.workers or None,
                 on_schedule=lambda where: print(f"analysing on {where} ..."))
    print(f"analysed {ds.sizes['step']} steps x {ds.sizes['layer']} layers in "
          f"{time.perf_counter() - t0:.1f} s -> {out / 'analysis.zarr'}")
    last = ds.isel(step=-1).compute()
    err = float(np.abs(last.K_pathwise - last.K).max() / last.K.max())
    print(f"pathwise reconstruction of K at the last step: max relative error {err:.1e}")
    print(prediction_line(ds, missing="run with --probe-every k (a full-data gradient every k "
                                      "steps)"))
    path = out / "theory_vs_measured.png"
    save_figure(ds.lipschitz.plot_validation(), path)
    save_figure(ds.lipschitz.plot_drift(), out / "drift_decomposition.png")
    print(f"figures -> {path}, {out / 'drift_decomposition.png'}")
    return 0
