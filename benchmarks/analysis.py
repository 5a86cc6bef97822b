"""Benchmark of trajlab.analyze: vectorised vs per-step nodes, schedulers, sweeps, memory.

Usage: ``python benchmarks/analysis.py [--quick] [--only SECTION[,SECTION]]``; sections:

* ``vectorised``: every (layer, chunk) node of the demo run (digits ConvNet, 1000 steps) and of
  the MLP benchmark run (784-512-512-10, B=128, 60 steps of random data) computed by the
  vectorised :func:`trajlab.analysis.tasks.layer_chunk` and by the per-step reference
  :func:`trajlab.analysis.reference.layer_chunk_per_step`, interleaved node by node, in this
  process with one torch and one BLAS thread. Layer-steps per CPU-second (per core) of each, their
  ratio, and the largest difference of any variable (relative to the variable's scale).
* ``schedulers``: 60-step runs analysed end to end with the default scheduler ("auto"),
  ``"threads"``, ``"synchronous"`` and a fresh 2-worker LocalCluster (start-up included, as the
  default would pay it); interleaved repeats, medians. Prints ``_estimate_seconds`` and what
  "auto" chose.
* ``sweep``: 16 digits MLP runs of 64 (and of 256) steps analysed in one call on pre-started
  LocalClusters of 1 and 2 single-threaded workers (start-up reported apart); interleaved
  repeats.
* ``memory``: peak RSS of the 2 worker processes (psutil, sampled every 10 ms) and of this
  process while a fresh 2-worker cluster analyses 4, 8 and 16 such runs, and 16 runs of twice
  the steps. Flat means bounded by the node size, not by the number of runs or steps.

Every figure is measured in this run; the load average and OMP_WAIT_POLICY are printed with
it. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

import trajlab
from trajlab.analysis import engine
from trajlab.analysis.pipeline import _estimate_seconds
from trajlab.analysis.plan import AnalysisOptions, make_plan
from trajlab.analysis.reference import layer_chunk_per_step
from trajlab.analysis.tasks import layer_chunk
from trajlab.recipes import TrainConfig, record_digits

TARGET_VECTORISED = 5.0
TARGET_WORKERS = 1.8
#: Variables that are differences of larger terms: compared at the scale of those terms.
SCALE_OF = {"drift_optimizer": ("drift_optimizer", "drift_flow"),
            "drift_noise_cov": ("drift_noise_cov", "drift_noise"),
            "diffusion2_cov": ("diffusion2_cov", "diffusion2"),
            "drift_discretization": ("drift_discretization", "drift_noise")}


def conditions() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"load average {load} (1/5/15 min) on {os.cpu_count()} cores; OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}; torch threads "
            f"{torch.get_num_threads()}")


def quiet_distributed() -> None:
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


# ----------------------------------------------------------------------------- runs
def record_mlp(path: Path, steps: int) -> Path:
    """The record_overhead.py MLP (784-512-512-10, B=128) on random data."""
    import torch.nn.functional as F
    from torch import nn

    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 784, generator=g)
    Y = torch.randint(0, 10, (4096,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with trajlab.Recorder(model, path, optimizer=opt, loss_fn=F.cross_entropy, mode="w",
                          metadata={"model": "mlp784", "batch_size": 128}) as rec:
        for _ in range(steps):
            idx = torch.randint(0, 4096, (128,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
    return path


def record(path: Path, cfg: TrainConfig) -> Path:
    return record_digits(path, cfg, overwrite=True, progress=False)


# ----------------------------------------------------------------------------- vectorised
def _worst(a: dict, b: dict) -> float:
    """Largest |a - b| of any variable, relative to the variable's scale (max |b|)."""
    worst = 0.0
    for k, y in b.items():
        x = a[k]
        if y.dtype == bool:
            worst = max(worst, float((x != y).any()))
            continue
        if not np.array_equal(np.isnan(x), np.isnan(y)):
            return float("inf")
        fin = np.isfinite(y) & ~b["degenerate"].astype(bool).reshape(
            (-1,) + (1,) * (y.ndim - 1))
        if not fin.any():
            continue
        scale = max(float(np.abs(b[j][np.isfinite(b[j])]).max(initial=0))
                    for j in SCALE_OF.get(k, (k,)))
        if scale > 0:
            worst = max(worst, float(np.abs(x[fin] - y[fin]).max()) / scale)
    return worst


def bench_vectorised(runs: dict[str, Path]) -> None:
    print(f"\n== Vectorised node vs per-step reference ({conditions()})")
    print("CPU seconds of this process (one torch and one BLAS thread), every node of the "
          "default plan, interleaved; ratio = per-step / vectorised")
    print(f"{'run':8} {'layer':6} {'shape':12} {'sketch':9} {'rows':>5} {'vec ms/row':>10} "
          f"{'ref ms/row':>10} {'ratio':>6} {'max diff':>9}")
    with threadpool_limits(limits=1):
        for name, path in runs.items():
            run = trajlab.open_run(path)
            plan = make_plan(run, None, None, None, AnalysisOptions())
            tot_v = tot_r = 0.0
            rows_total = 0
            for li, lm in enumerate(plan.layers):
                layer_chunk(plan, li, plan.chunks[0])  # warm-up
                layer_chunk_per_step(plan, li, plan.chunks[0])
                tv = tr = 0.0
                worst = 0.0
                for ci, rows in enumerate(plan.chunks):
                    order = (layer_chunk, layer_chunk_per_step)[:: 1 if ci % 2 == 0 else -1]
                    res = {}
                    for fn in order:
                        t0 = time.process_time()
                        res[fn] = fn(plan, li, rows)
                        dt = time.process_time() - t0
                        if fn is layer_chunk:
                            tv += dt
                        else:
                            tr += dt
                    worst = max(worst, _worst(res[layer_chunk], res[layer_chunk_per_step]))
                n = plan.n_rows
                rows_total += n
                tot_v, tot_r = tot_v + tv, tot_r + tr
                print(f"{name:8} {lm.name:6} {lm.shape!s:12} {lm.sketch:9} {n:5d} "
                      f"{1e3 * tv / n:10.3f} {1e3 * tr / n:10.3f} {tr / tv:6.2f} {worst:9.1e}")
            print(f"{name:8} {'all':6} {'':12} {'':9} {rows_total:5d} layer-steps/s per core: "
                  f"vectorised {rows_total / tot_v:8.1f}, per-step {rows_total / tot_r:8.1f}, "
                  f"ratio {tot_r / tot_v:.2f}x (target {TARGET_VECTORISED}x)")


# ----------------------------------------------------------------------------- schedulers
def bench_schedulers(runs: dict[str, Path], repeats: int) -> None:
    print(f"\n== Schedulers on 60-step runs ({conditions()})")
    print(f"wall seconds of trajlab.analyze(run) in memory, median (min..max) of {repeats} "
          "interleaved repeats; 'cluster(2)' starts a fresh 2-worker LocalCluster each time")
    where = {"auto": "auto", "threads": "threads", "synchronous": "synchronous",
             "cluster(2)": None}
    for name, path in runs.items():
        run = trajlab.open_run(path)
        est = _estimate_seconds([make_plan(run, None, None, None, AnalysisOptions())])
        chosen = []
        trajlab.analyze(path, progress=False, on_schedule=chosen.append)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in where}
        for _ in range(repeats):
            for label, sched in where.items():
                t0 = time.perf_counter()
                trajlab.analyze(path, scheduler=sched, workers=2 if sched is None else None,
                                progress=False)
                times[label].append(time.perf_counter() - t0)
            quiet_distributed()
        cells = "  ".join(f"{k} {statistics.median(v):.2f} ({min(v):.2f}..{max(v):.2f})"
                          for k, v in times.items())
        print(f"{name:9} estimate {est:6.2f} s -> auto: {chosen[0]}\n          {cells}")
    print(f"default: in-process below engine.IN_PROCESS_SECONDS = {engine.IN_PROCESS_SECONDS} s"
          f" of estimated work, else a LocalCluster when CLUSTER_START_SECONDS = "
          f"{engine.CLUSTER_START_SECONDS} s + W / workers < W / min(workers, THREADS_SPEEDUP = "
          f"{engine.THREADS_SPEEDUP})")


# ----------------------------------------------------------------------------- sweeps
def start_cluster(n_workers: int):
    import dask
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=40, env=env)
    client = Client(cluster, set_as_default=False)
    client.wait_for_workers(n_workers)
    return cluster, client, time.perf_counter() - t0


def analyse_sweep(runs: list[Path], out: Path, client) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    outs = [out / f"{p.stem}.analysis.zarr" for p in runs]
    t0 = time.perf_counter()
    trajlab.analyze(runs, out=outs, scheduler=client, progress=False)
    return time.perf_counter() - t0


def sweep_runs(tmp: Path, n: int, steps: int) -> list[Path]:
    base = TrainConfig(model="mlp", hidden=32, steps=steps, batch_size=32, dtype="float64")
    paths = []
    for i in range(n):
        p = tmp / f"sweep-{steps}" / f"seed{i:02d}.zarr"
        if not p.exists():
            record(p, base.replace(sampling_seed=i))
        paths.append(p)
    return paths


def bench_sweep(tmp: Path, n_runs: int, steps: int, repeats: int) -> None:
    runs = sweep_runs(tmp, n_runs, steps)
    print(f"\n== One analyze() call over {n_runs} digits MLP runs of {steps} steps "
          f"({conditions()})")
    clusters = {n: start_cluster(n) for n in (1, 2)}
    quiet_distributed()
    try:
        for n, (_, client, _) in clusters.items():  # warm-up: imports, caches
            analyse_sweep(runs, tmp / f"warm{n}", client)
        times: dict[int, list[float]] = {1: [], 2: []}
        for r in range(repeats):
            for n, (_, client, _) in clusters.items():
                times[n].append(analyse_sweep(runs, tmp / f"an{n}-{r}", client))
    finally:
        for cluster, client, _ in clusters.values():
            client.close()
            cluster.close()
    ratios = [a / b for a, b in zip(times[1], times[2])]
    for n in (1, 2):
        ts = times[n]
        print(f"{n} worker{'s' if n > 1 else ' '}: start-up {clusters[n][2]:.2f} s, analysis "
              f"{statistics.median(ts):.2f} s ({min(ts):.2f}..{max(ts):.2f}), "
              f"{n_runs * steps / statistics.median(ts):.0f} steps/s")
    print(f"2 workers / 1 worker: {statistics.median(ratios):.2f}x ({min(ratios):.2f}.."
          f"{max(ratios):.2f}) over {repeats} paired repeats (target {TARGET_WORKERS}x)")


# ----------------------------------------------------------------------------- memory
@contextlib.contextmanager
def rss_sampler(pids: list[int], every: float = 0.01):
    import psutil

    procs = [psutil.Process(p) for p in pids]
    before = [p.memory_info().rss for p in procs]
    peak = list(before)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            for i, p in enumerate(procs):
                with contextlib.suppress(psutil.Error):
                    peak[i] = max(peak[i], p.memory_info().rss)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    result: dict[str, list[int]] = {"before": before, "peak": peak}
    try:
        yield result
    finally:
        done.set()
        th.join()


def bench_memory(tmp: Path, sizes: list[tuple[int, int]]) -> None:
    print(f"\n== Peak RSS of a fresh 2-worker cluster analysing a sweep in one call "
          f"({conditions()})")
    print(f"{'runs':>4} {'steps':>5} {'nodes':>5} {'worker RSS before MB':>20} "
          f"{'worker peak MB':>15} {'peak-before MB':>15} {'client peak-before MB':>21}")
    for n_runs, steps in sizes:
        runs = sweep_runs(tmp, n_runs, steps)
        plan = make_plan(trajlab.open_run(runs[0]), None, None, None, AnalysisOptions())
        nodes = n_runs * len(plan.chunks) * (len(plan.layers) + 1)
        cluster, client, _ = start_cluster(2)
        quiet_distributed()
        try:
            pids = list(client.run(os.getpid).values())
            analyse_sweep(runs[:1], tmp / "mem-warm", client)  # imports in the workers
            with rss_sampler(pids + [os.getpid()]) as rss:
                analyse_sweep(runs, tmp / "mem", client)
        finally:
            client.close()
            cluster.close()
        b, p = rss["before"], rss["peak"]
        mb = 1 / 2**20
        print(f"{n_runs:4d} {steps:5d} {nodes:5d} "
              f"{' / '.join(f'{x * mb:.0f}' for x in b[:-1]):>20} "
              f"{' / '.join(f'{x * mb:.0f}' for x in p[:-1]):>15} "
              f"{' / '.join(f'{(y - x) * mb:.0f}' for x, y in zip(b[:-1], p[:-1])):>15} "
              f"{(p[-1] - b[-1]) * mb:21.0f}")


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--only", default="vectorised,schedulers,sweep,memory",
                   help="comma-separated sections (default: all)")
    args = p.parse_args()
    only = set(args.only.split(","))
    torch.set_num_threads(1)
    q = args.quick
    print(f"trajlab {trajlab.__version__}, torch {torch.__version__}; {conditions()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "vectorised" in only:
            runs = {"demo": record(tmp / "demo.zarr", TrainConfig(model="convnet",
                                                                 steps=200 if q else 1000)),
                    "mlp784": record_mlp(tmp / "mlp784.zarr", 12 if q else 60)}
            bench_vectorised(runs)
        if "schedulers" in only:
            runs = {"convnet60": record(tmp / "convnet60.zarr",
                                        TrainConfig(model="convnet", steps=60)),
                    "mlp784-60": (tmp / "mlp784.zarr" if (tmp / "mlp784.zarr").exists()
                                  else record_mlp(tmp / "mlp784.zarr", 60))}
            bench_schedulers(runs, 1 if q else 3)
        if "sweep" in only:
            for steps in ((32,) if q else (64, 256)):  # 256: more work per run's fixed cost
                bench_sweep(tmp, 4 if q else 16, steps, 1 if q else 3)
        if "memory" in only:
            sizes = [(2, 32), (4, 32)] if q else [(4, 64), (8, 64), (16, 64), (16, 128)]
            bench_memory(tmp, sizes)


if __name__ == "__main__":
    sys.exit(main())
