"""Benchmark of trajlab.analyze: steps per second with 1 and 2 Dask workers, and peak memory.

Usage: ``python benchmarks/analysis.py [--quick] [--steps T]``.

Records the digits demo run with T and 4T steps, then

* throughput: analyses the T-step run on LocalClusters of 1 and 2 single-threaded worker
  processes, both started *before* timing (start-up reported separately), and on Dask's threaded
  scheduler for reference; runs are interleaved (threads, 1 worker, 2 workers, ...) and the table
  gives medians with min..max;
* memory: analyses the T- and 4T-step runs in fresh subprocesses with the synchronous scheduler
  and reports their peak RSS (``ru_maxrss``) above the RSS right before ``analyze``. Flat means
  bounded by the chunk size, not by the run's length.

All numbers are measured in this run. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask

import trajlab
from trajlab.recipes import TrainConfig, record_digits

TARGET_SPEEDUP = 1.7


def start_cluster(n_workers: int):
    """A LocalCluster like trajlab's default one (single-threaded worker processes)."""
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=40,
            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        )
    client = Client(cluster, set_as_default=False)
    client.wait_for_workers(n_workers)
    return cluster, client, time.perf_counter() - t0


def timed_analyze(run: Path, out: Path, scheduler, steps=None) -> float:
    # Clients are made with set_as_default=False (two live side by side), but analyze() needs
    # the one it is given to be current (engine.run_graph's as_completed looks up the default).
    ctx = scheduler.as_current() if not isinstance(scheduler, str) else contextlib.nullcontext()
    with ctx:
        t0 = time.perf_counter()
        trajlab.analyze(str(run), out=str(out), overwrite=True, scheduler=scheduler,
                        progress=False, steps=steps)
        return time.perf_counter() - t0


def bench_throughput(run: Path, tmp: Path, repeats: int) -> None:
    T = trajlab.open_run(run).n_steps
    clusters = {}
    for n in (1, 2):
        clusters[n] = start_cluster(n)
    for name in list(logging.root.manager.loggerDict):  # shutdown chatter of the clusters
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        where = {"threads": "threads", "1 worker": clusters[1][1], "2 workers": clusters[2][1]}
        for name, s in where.items():  # warm-up: imports in the workers, file caches
            timed_analyze(run, tmp / f"warm-{name}.zarr", s)
        times: dict[str, list[float]] = {k: [] for k in where}
        fixed = []  # per-call cost that does not scale with steps: a 1-step analysis, 1 worker
        for r in range(repeats):
            for name, s in where.items():
                times[name].append(timed_analyze(run, tmp / f"a-{name}.zarr", s))
            fixed.append(timed_analyze(run, tmp / "a-fixed.zarr", clusters[1][1], steps=(0, 1)))
    finally:
        for cluster, client, _ in clusters.values():
            client.close()
            cluster.close()
    meta = trajlab.open_run(run).meta
    print(f"\nThroughput on the {T}-step digits run (chunk_steps {meta.chunk_steps}, "
          f"{len(meta.layers)} layers); {repeats} interleaved repeats, median (min..max)")
    print(f"{'scheduler':10} {'start-up s':>10} {'s / analysis':>22} {'steps/s':>9} "
          f"{'vs 1 worker':>22}")
    one = times["1 worker"]
    for name, ts in times.items():
        start = {"1 worker": clusters[1][2], "2 workers": clusters[2][2]}.get(name)
        ratios = [a / b for a, b in zip(one, ts)]
        start_s = f"{start:10.2f}" if start is not None else f"{'-':>10}"
        print(f"{name:10} {start_s} {statistics.median(ts):8.3f} ({min(ts):.3f}..{max(ts):.3f})"
              f" {T / statistics.median(ts):9.1f} {statistics.median(ratios):8.2f}x "
              f"({min(ratios):.2f}..{max(ratios):.2f})")
    print(f"per-call fixed cost (1-step analysis, 1 worker): {statistics.median(fixed):.3f} s "
          f"({min(fixed):.3f}..{max(fixed):.3f})")
    print(f"target: 2 workers >= {TARGET_SPEEDUP}x 1 worker")


def peak_child(run: str, out: str) -> None:
    """Subprocess entry: analyse ``run`` synchronously, print RSS figures as JSON."""
    import threading

    import psutil

    r = trajlab.open_run(run)
    # Warm-up on one step: imports, torch/zarr thread pools, first allocations.
    trajlab.analyze(r, out=out + ".warm", overwrite=True, scheduler="synchronous",
                    progress=False, steps=(int(r.steps[0]), int(r.steps[0]) + 1))
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    sampled = [rss_before]
    done = threading.Event()

    def sample() -> None:  # ru_maxrss is a high-water mark since start: sample RSS as well
        while not done.wait(0.002):
            sampled.append(proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    trajlab.analyze(r, out=out, overwrite=True, scheduler="synchronous", progress=False)
    done.set()
    sampler.join()
    print(json.dumps({
        "rss_before_kb": rss_before // 1024,
        "peak_kb": max(sampled) // 1024,
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))


def bench_memory(runs: dict[int, Path], tmp: Path, repeats: int) -> None:
    print("\nPeak RSS of analyze() in a fresh process (synchronous scheduler; RSS sampled every "
          f"2 ms, after a 1-step warm-up), median (min..max) over {repeats} runs")
    print(f"{'steps':>6} {'chunk rows':>10} {'RSS before MB':>13} {'peak MB':>22} "
          f"{'peak - before MB':>22} {'ru_maxrss MB':>12}")
    rows = {}
    for _ in range(repeats):  # interleaved: T, 4T, T, 4T, ...
        for T, run in runs.items():
            proc = subprocess.run(
                [sys.executable, __file__, "--_peak", str(run), str(tmp / f"peak-{T}.zarr")],
                check=True, capture_output=True, text=True,
            )
            rows.setdefault(T, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    grow = {}
    for T, rs in rows.items():
        peak = [r["peak_kb"] / 1024 for r in rs]
        delta = [(r["peak_kb"] - r["rss_before_kb"]) / 1024 for r in rs]
        grow[T] = statistics.median(delta)
        attrs = trajlab.open_analysis(str(tmp / f"peak-{T}.zarr")).attrs
        chunk = attrs.get("trajlab", {}).get("chunk_rows", "?")
        print(f"{T:6d} {chunk!s:>10} {statistics.median(r['rss_before_kb'] for r in rs) / 1024:13.0f}"
              f" {statistics.median(peak):8.0f} ({min(peak):.0f}..{max(peak):.0f})"
              f" {statistics.median(delta):8.1f} ({min(delta):.1f}..{max(delta):.1f})"
              f" {statistics.median(r['maxrss_kb'] for r in rs) / 1024:12.0f}")
    small, big = sorted(grow)
    print(f"growth from {small} to {big} steps: {grow[big] - grow[small]:+.1f} MB "
          "(target: flat, bounded by the chunk size)")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--_peak":
        peak_child(sys.argv[2], sys.argv[3])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fast smoke run (< 60 s)")
    p.add_argument("--steps", type=int, default=None, help="T: steps of the shorter run")
    args = p.parse_args()
    T = args.steps or (32 if args.quick else 256)
    repeats = 2 if args.quick else 4
    mem_repeats = 1 if args.quick else 2
    print(f"trajlab {trajlab.__version__}; digits ConvNet runs of {T} and {4 * T} steps")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        runs = {}
        for steps in (T, 4 * T):
            t0 = time.perf_counter()
            runs[steps] = record_digits(tmp / f"run-{steps}.zarr", TrainConfig(steps=steps),
                                        progress=False)
            print(f"recorded {steps} steps in {time.perf_counter() - t0:.1f} s")
        bench_throughput(runs[T], tmp, repeats)
        bench_memory(runs, tmp, mem_repeats)


if __name__ == "__main__":
    main()
