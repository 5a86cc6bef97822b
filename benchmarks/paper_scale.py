"""Paper-scale benchmark (issue 26, item 5): the paper's five-layer ConvNet recorded and analysed,
and both of the paper's runs projected from what this run measures.

Usage: ``python benchmarks/paper_scale.py [--quick] [--steps N] [--steps-every10 M]
[--batch B[,B]] [--blocks K] [--device cpu|cuda] [--threads T] [--skip-analysis] [--dir DIR]``.

The model is :func:`trajlab.models.cifar_convnet` (3 conv + 2 linear) on CIFAR-shaped random data
(the workload of ``record_overhead.py --models cifar``, whose helpers this script imports), at
B=128 and 256 (``--batch``). For each batch size:

1. **Recording.** ``trajlab.Recorder(every=1)`` for ``--steps`` recorded steps and
   ``every=10`` for ``--steps-every10`` recorded steps (ten times as many training steps), each on
   one long-lived recorder whose timed blocks alternate with blocks of a plain copy of the same
   workload (same weights, same batches; the order alternates too). Reported: the median of the
   paired ratios recorded / plain with their min..max; the first recorded step (store creation)
   and ``close()`` apart; bytes per recorded step, logical (uncompressed arrays), stored
   (compressed chunks, ``Run.nbytes_stored``) and on disk (every file of the store).
2. **Analysis** of the every=1 store with ``trajlab.analyze(..., scheduler="synchronous",
   torch_threads=1)`` under one BLAS thread, into an analysis store, with the default
   ``conv_definition="matrix"`` and with ``"operator"`` (exact convolution norms, MATH.md §6b):
   CPU seconds (``time.process_time``, so other users' load does not count) and wall seconds per
   layer-step.
3. **Projection** of the paper's runs, Fig. 2 (30,000 steps) and Fig. 3 (344,370 steps), at
   every=1 and every=10: disk and recording hours through :class:`trajlab.cost.CostEstimate`
   (the projection ``trajlab.estimate`` prints, fed with this run's figures), and analysis hours
   on 1, 8 and 64 Dask workers: recorded steps x layers x the CPU seconds per layer-step / workers
   (perfect scaling, a lower bound; ``analysis.py`` measures 1.6-1.8x on 2 workers).

Every figure is printed beside the 1-min load average (``os.getloadavg``) while it was measured
and ``OMP_WAIT_POLICY`` (set to PASSIVE unless the environment sets it). ``--device cuda`` runs
the recording on the GPU (timed blocks end with ``torch.cuda.synchronize()``); the analysis
stays on the CPU. Not a test.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import zarr
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record_overhead as ro  # Workload, cifar_workload, logical_nbytes, paired, sync

import trajlab
from trajlab.cost import CostEstimate

#: The paper's runs (PAPER.md): Fig. 2, five-layer ConvNet, 30,000 steps; Fig. 3, one run of
#: 344,370 steps.
PAPER_RUNS = {"Fig. 2": 30_000, "Fig. 3": 344_370}
WORKERS = (1, 8, 64)
EVERY = (1, 10)
CONV_DEFINITIONS = ("matrix", "operator")
OMP = os.environ.get("OMP_WAIT_POLICY", "(unset)")


def load() -> float:
    """1-min load average."""
    return os.getloadavg()[0]


def git(*args: str) -> str:
    """Output of a git command in the checkout trajlab is imported from ('' where that is not
    a git checkout)."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False,
                              cwd=Path(trajlab.__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def conditions() -> str:
    """One line: where and under what load the figures were taken."""
    la = " ".join(f"{x:.2f}" for x in os.getloadavg())
    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        commit = f"not a git checkout: {Path(trajlab.__file__).parent}"
    elif git("status", "--porcelain", "--", "."):
        commit += " + uncommitted changes in trajlab/"
    dev = (torch.cuda.get_device_name(ro.DEVICE) if ro.DEVICE.type == "cuda"
           else f"cpu ({ro.NCPU} CPUs)")
    return (f"trajlab {trajlab.__version__} (commit {commit}), torch {torch.__version__}, "
            f"{dev}, {torch.get_num_threads()} torch thread(s), OMP_WAIT_POLICY={OMP}, load "
            f"average {la} (1/5/15 min)")


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (chunks and metadata documents)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- recording
@dataclass
class Recording:
    """What one (batch, every) configuration measured."""

    batch: int
    every: int
    recorded: int            # recorded steps in the store
    plain_s: float           # median plain step (s)
    step_s: float            # median step with the recorder, averaged over its block (s)
    ratios: list[float]      # paired block ratios recorded / plain
    first_s: float           # first recorded step (creates the store), s
    close_s: float           # close(): queue drain, last write, commit, s
    logical: float           # bytes per recorded step, uncompressed arrays
    stored: float            # bytes per recorded step, compressed chunks
    on_disk: float           # bytes per recorded step, every file of the store
    load: float              # median 1-min load average over the blocks
    store: Path

    @property
    def recorded_step_s(self) -> float:
        """Time of one recorded step such that ``every - 1`` plain steps and one recorded step
        take what the measured blocks took (every=1: the recorded step itself)."""
        return self.every * self.step_s - (self.every - 1) * self.plain_s

    def estimate(self, steps: int) -> CostEstimate:
        """The projection :func:`trajlab.estimate` would print, from this run's figures."""
        return CostEstimate(
            bytes_per_recorded_step=self.stored, plain_step_seconds=self.plain_s,
            recorded_step_seconds=self.recorded_step_s,
            fixed_seconds=max(0.0, self.first_s - self.recorded_step_s) + self.close_s,
            steps=steps, every=self.every, budget_bytes=None, free_bytes=None,
            measured_steps=self.recorded)


def workload(batch: int) -> ro.Workload:
    """The paper ConvNet on CIFAR-shaped random data (record_overhead's), at batch ``batch``."""
    w = ro.cifar_workload()
    w.batch = batch
    return w


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    ro.sync()
    return time.perf_counter() - t0


def bench_recording(batch: int, every: int, recorded: int, blocks: int, tmp: Path
                    ) -> Recording:
    """``recorded`` recorded steps (after the first) in ``blocks`` blocks, each alternating with
    a plain block of as many steps on an identical copy."""
    rec_w = workload(batch)
    plain_w = rec_w.copy()
    rec_w.steps(2)  # warm-up of both (allocator, kernels); keeps them identical
    plain_w.steps(2)
    per_block = max(1, -(-recorded // blocks)) * every
    store = tmp / f"cifar-b{batch}-every{every}.zarr"
    plain_t, rec_t, loads = [], [], []
    rec = trajlab.Recorder(rec_w.model, store, optimizer=rec_w.opt, every=every)
    with rec:
        first = timed(rec_w.steps, 1, rec)  # recorded: creates the store
        rec_w.steps(every - 1, rec)         # back in step with the plain copy's phase
        plain_w.steps(every)
        for i in range(blocks):
            pair = [(plain_t, plain_w, None), (rec_t, rec_w, rec)]
            for out, w, r in (pair if i % 2 == 0 else pair[::-1]):
                out.append(timed(w.steps, per_block, r) / per_block)
            loads.append(load())
        t0 = time.perf_counter()
    close = time.perf_counter() - t0
    run = trajlab.open_run(store)
    n = run.n_steps
    return Recording(
        batch=batch, every=every, recorded=n, plain_s=statistics.median(plain_t),
        step_s=statistics.median(rec_t), ratios=ro.paired(plain_t, rec_t), first_s=first,
        close_s=close,
        logical=ro.logical_nbytes(zarr.open_group(str(store), mode="r")) / n,
        stored=run.nbytes_stored() / n, on_disk=dir_bytes(store) / n,
        load=statistics.median(loads), store=store)


# ----------------------------------------------------------------------------- analysis
@dataclass
class Analysis:
    """The analysis of one every=1 store with one conv definition (medians over repeats)."""

    batch: int
    conv_definition: str
    layer_steps: int
    cpu_s: float
    wall_s: float
    load: float              # median 1-min load average over the repeats

    @property
    def cpu_per_layer_step(self) -> float:
        return self.cpu_s / self.layer_steps


def analyse(run: trajlab.Run, conv_definition: str, out: Path | None,
            steps: tuple[int, int] | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds of ``trajlab.analyze`` in this process, one thread."""
    with threadpool_limits(1):
        t0, c0 = time.perf_counter(), time.process_time()
        trajlab.analyze(run, out=out, steps=steps, scheduler="synchronous", torch_threads=1,
                        conv_definition=conv_definition, progress=False, overwrite=True)
        return time.perf_counter() - t0, time.process_time() - c0


def bench_analysis(r: Recording, repeats: int, tmp: Path) -> list[Analysis]:
    """The every=1 store analysed with each conv definition, ``repeats`` times in alternating
    order after an untimed warm-up on its first steps; the median of each."""
    run = trajlab.open_run(r.store)
    for cd in CONV_DEFINITIONS:
        analyse(run, cd, None, (0, min(2, run.n_steps)))
    times: dict[str, list[tuple[float, float, float]]] = {cd: [] for cd in CONV_DEFINITIONS}
    for i in range(repeats):
        for cd in (CONV_DEFINITIONS if i % 2 == 0 else CONV_DEFINITIONS[::-1]):
            out = tmp / f"{r.store.stem}-{cd}.analysis.zarr"
            times[cd].append((*analyse(run, cd, out), load()))
    n = run.n_steps * len(run.layers)
    return [Analysis(r.batch, cd, n, statistics.median(t[1] for t in ts),
                     statistics.median(t[0] for t in ts), statistics.median(t[2] for t in ts))
            for cd, ts in times.items()]


# ----------------------------------------------------------------------------- report
def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def hours(seconds: float) -> str:
    h = seconds / 3600
    return f"{h:.3g} h" if h >= 0.1 else f"{seconds / 60:.2g} min"


def print_recordings(recs: list[Recording]) -> None:
    print(f"\n1. Recording (median of paired block ratios recorded / plain, min..max); bytes per "
          f"recorded step; OMP_WAIT_POLICY={OMP}, load = median 1-min load average")
    print(f"{'B':>4} {'every':>5} {'rec.':>5} {'plain ms':>9} {'step ms':>8} {'ratio':>22} "
          f"{'1st ms':>7} {'close ms':>8} {'logical':>9} {'stored':>9} {'on disk':>9} "
          f"{'load':>5}")
    for r in recs:
        ratio = f"{statistics.median(r.ratios):.3g}x ({min(r.ratios):.3g}..{max(r.ratios):.3g})"
        print(f"{r.batch:4d} {r.every:5d} {r.recorded:5d} {r.plain_s * 1e3:9.1f} "
              f"{r.step_s * 1e3:8.1f} {ratio:>22} {r.first_s * 1e3:7.0f} {r.close_s * 1e3:8.0f} "
              f"{human(r.logical):>9} {human(r.stored):>9} {human(r.on_disk):>9} {r.load:5.2f}")


def print_analyses(ans: list[Analysis]) -> None:
    print(f"\n2. Analysis of the every=1 stores (synchronous, 1 thread, into an analysis store); "
          f"CPU = process time; OMP_WAIT_POLICY={OMP}")
    print(f"{'B':>4} {'conv_definition':>15} {'layer-steps':>11} {'CPU s':>7} {'wall s':>7} "
          f"{'CPU ms/layer-step':>17} {'wall ms/layer-step':>18} {'load':>5}")
    for a in ans:
        print(f"{a.batch:4d} {a.conv_definition:>15} {a.layer_steps:11d} {a.cpu_s:7.1f} "
              f"{a.wall_s:7.1f} {a.cpu_per_layer_step * 1e3:17.1f} "
              f"{a.wall_s / a.layer_steps * 1e3:18.1f} {a.load:5.2f}")


def print_projection(recs: list[Recording], ans: list[Analysis], layers: int) -> None:
    cost = {(a.batch, a.conv_definition): a.cpu_per_layer_step for a in ans}
    work = " / ".join(f"{w}" for w in WORKERS)
    print(f"\n3. Projection of the paper's runs from the figures above (device {ro.DEVICE}; "
          f"recording: trajlab.cost.CostEstimate; analysis: recorded steps x {layers} layers x "
          f"CPU s per layer-step / workers, perfect scaling)")
    print(f"{'run':7} {'steps':>7} {'B':>4} {'every':>5} {'recorded':>8} {'disk':>9} "
          f"{'rec. hours':>10} {'plain hours':>11} "
          f"{'analysis, matrix (' + work + ' workers)':>36} "
          f"{'analysis, operator (' + work + ')':>30} {'load':>5}")
    for name, steps in PAPER_RUNS.items():
        for r in recs:
            e = r.estimate(steps)
            cells = []
            for cd in CONV_DEFINITIONS:
                c = cost.get((r.batch, cd))
                cells.append("-" if c is None else " / ".join(
                    hours(e.recorded_steps * layers * c / w) for w in WORKERS))
            print(f"{name:7} {steps:7d} {r.batch:4d} {r.every:5d} {e.recorded_steps:8d} "
                  f"{human(e.total_bytes):>9} {hours(e.total_seconds):>10} "
                  f"{hours(steps * r.plain_s):>11} {cells[0]:>36} {cells[1]:>30} {r.load:5.2f}")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 blocks, default 20 steps, one analysis each")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed recorded steps at every=1, rounded up to a multiple of "
                    "--blocks; the store also holds the untimed first (default 100; --quick 20)")
    ap.add_argument("--steps-every10", type=int, default=None,
                    help="recorded steps at every=10 (default half of --steps)")
    ap.add_argument("--batch", default="128,256", help="batch sizes, comma-separated")
    ap.add_argument("--blocks", type=int, default=None,
                    help="timed block pairs per configuration (default 6; --quick 2)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--skip-analysis", action="store_true")
    ap.add_argument("--dir", type=Path, default=None, help="where the stores go (default: tmp)")
    args = ap.parse_args(argv)

    steps = args.steps if args.steps is not None else (20 if args.quick else 100)
    steps10 = args.steps_every10 if args.steps_every10 is not None else max(2, steps // 2)
    blocks = args.blocks if args.blocks is not None else (2 if args.quick else 6)
    if min(steps, steps10, blocks) < 1:
        raise SystemExit("--steps, --steps-every10 and --blocks must be at least 1")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise SystemExit(f"--batch takes integers separated by commas, got {args.batch!r}"
                         ) from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here")
    ro.DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    # a killed run removes its stores (TemporaryDirectory's cleanup runs on SystemExit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(conditions())
    print(f"paper ConvNet (trajlab.models.cifar_convnet), CIFAR-shaped random data; B in "
          f"{batches}; {steps} recorded steps at every=1, {steps10} at every=10 "
          f"({10 * steps10} training steps), {blocks} block pairs each", flush=True)

    with tempfile.TemporaryDirectory(prefix="paper-scale-", dir=args.dir) as tmp_dir:
        tmp = Path(tmp_dir)
        recs: list[Recording] = []
        ans: list[Analysis] = []
        layers = 0
        for b in batches:
            for every, n in ((1, steps), (10, steps10)):
                recs.append(bench_recording(b, every, n, blocks, tmp))
                print_recordings(recs[-1:])
            layers = len(trajlab.open_run(recs[-2].store).layers)
            if not args.skip_analysis:
                ans += bench_analysis(recs[-2], 1 if args.quick else 2, tmp)
                print_analyses(ans[-2:])
            print_projection(recs[-2:], ans[-2:], layers)  # what a cut-off run has so far
        print(f"\n{conditions()}")
        print_recordings(recs)
        if ans:
            print_analyses(ans)
        print_projection(recs, ans, layers)


if __name__ == "__main__":
    main()
