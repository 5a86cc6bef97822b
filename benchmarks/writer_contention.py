"""What a busy writer costs the training thread: GIL hold times and step times beside a flush.

Usage: ``python benchmarks/writer_contention.py [--quick] [--seconds S] [--threads N]``.

Records 9 steps of the MLP 784-512-512-10 (B=128) of ``record_overhead.py`` to get real rows,
then, against a baseline measured in the same run:

1. **GIL probe**: a thread that sleeps 0.2 ms in a loop measures how late it wakes while
   another thread runs one piece of the writer's work in a loop (chunk encoding, transposition,
   checksums of both CRC32C libraries, file writes, the whole flush). A late wake-up means the
   GIL was held: every small op of the training thread waits the same way.
2. **Step time** of plain training steps alone, beside a writer *thread* flushing 8-row chunks
   without pause, and beside a writer *process* doing the same (no GIL shared). Stores go to a
   temporary directory.

Prints the load average and ``OMP_WAIT_POLICY`` (set to PASSIVE unless the environment sets it).
Not a test.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import argparse
import copy
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

import trajlab
import trajlab.record.writer as writer_module
from trajlab.store.run_store import RunStoreWriter

sys.path.insert(0, str(Path(__file__).parent))
import record_overhead as ro  # the benchmark's workloads


def real_rows(tmp: Path):
    """Run meta and 8 materialized step records of the MLP workload."""
    caught = []
    put = writer_module.BackgroundWriter.put

    def spy(self, record):
        caught.append(record)
        return put(self, record)

    writer_module.BackgroundWriter.put = spy
    try:
        w = ro.mlp_workload()
        w.steps(10)
        with trajlab.Recorder(w.model, tmp / "src.zarr", optimizer=w.opt, every=1) as rec:
            w.steps(9, rec)
    finally:
        writer_module.BackgroundWriter.put = put
    return trajlab.open_run(tmp / "src.zarr").meta, [r.materialize() for r in caught[1:9]]


def flush_forever(store: str, meta, rows, stop, flushes, ready) -> None:
    """Append the 8 rows again and again (one flush each) until ``stop`` is set."""
    torch.set_num_threads(1)
    wr = RunStoreWriter(store, mode="w")
    wr.create(meta, sample_capacity=128)
    sink = writer_module.RowSink(wr, flush_seconds=1e9)
    while not stop.is_set():
        for r in rows:
            r2 = copy.copy(r)
            r2.layers = {k: dict(v) for k, v in r.layers.items()}
            sink._buffer.append(r2)
        sink.flush()
        ready.set()
        with flushes.get_lock():
            flushes.value += 1
    wr.finalize()


def gil_probe(work, seconds: float) -> np.ndarray:
    """Wake-up delays (ms) of a thread sleeping 0.2 ms while ``work()`` runs in a loop."""
    lat: list[float] = []
    stop = threading.Event()

    def probe():
        while not stop.is_set():
            t0 = time.perf_counter()
            time.sleep(0.0002)
            lat.append(time.perf_counter() - t0 - 0.0002)

    def busy():
        while not stop.is_set():
            work()

    p = threading.Thread(target=probe)
    p.start()
    time.sleep(0.2)
    if work is not None:
        lat.clear()
        b = threading.Thread(target=busy)
        b.start()
    time.sleep(seconds)
    stop.set()
    p.join()
    if work is not None:
        b.join()
    return np.asarray(lat) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (0.5 s per measurement)")
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args()
    if args.quick:
        args.seconds = 0.5
    torch.set_num_threads(args.threads)
    print(f"trajlab {trajlab.__version__}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"torch thread(s), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"{os.cpu_count()} CPUs, load {ro.load()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        meta, rows = real_rows(tmp)
        weight = np.stack([r.layers["0"]["weight"] for r in rows])  # (8, 512, 784) float32
        moved = np.empty(weight.transpose(1, 2, 0).shape, weight.dtype)
        import google_crc32c
        import numcodecs
        from crc32c import crc32c

        blosc = numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE)
        encoded = blosc.encode(np.ascontiguousarray(weight.transpose(1, 2, 0)))

        def write_file():
            with open(tmp / "chunk.partial", "wb") as f:
                f.write(encoded)
            os.replace(tmp / "chunk.partial", tmp / "chunk")

        flushes = mp.Value("i", 0)
        wr_state = {}

        def flush_once():
            if "sink" not in wr_state:
                wr = RunStoreWriter(str(tmp / "probe.zarr"), mode="w")
                wr.create(meta, sample_capacity=128)
                wr_state["sink"] = writer_module.RowSink(wr, flush_seconds=1e9)
            sink = wr_state["sink"]
            for r in rows:
                r2 = copy.copy(r)
                r2.layers = {k: dict(v) for k, v in r.layers.items()}
                sink._buffer.append(r2)
            sink.flush()

        flush_once()  # creates the store outside the probe
        print(f"\n1. GIL probe: wake-up delay (ms) of a thread sleeping 0.2 ms while another "
              f"runs the work in a loop ({args.seconds:g} s each)")
        print(f"{'work':44} {'p50':>6} {'p99':>6} {'max':>7}")
        works = [("(nothing)", None),
                 ("transpose 12.8 MB weight chunk (np.copyto)",
                  lambda: np.copyto(moved, weight.transpose(1, 2, 0))),
                 ("blosc LZ4 bitshuffle, 12.8 MB", lambda: blosc.encode(moved)),
                 ("crc32c package, 12.8 MB", lambda: crc32c(moved)),
                 ("google_crc32c (Zarr's), 12.8 MB", lambda: google_crc32c.value(moved)),
                 ("file write, 9 MB", write_file),
                 ("RowSink.flush of 8 MLP rows (28 MB)", flush_once)]
        for label, work in works:
            lat = gil_probe(work, args.seconds)
            print(f"{label:44} {np.percentile(lat, 50):6.2f} {np.percentile(lat, 99):6.2f} "
                  f"{lat.max():7.2f}", flush=True)

        print("\n2. Plain MLP step (ms) alone and beside a writer flushing 8-row chunks "
              "without pause")
        w = ro.mlp_workload()
        w.steps(20)

        def step_ms(n=150):
            t0 = time.perf_counter()
            w.steps(n)
            return (time.perf_counter() - t0) / n * 1e3

        print(f"{'writer':10} {'alone':>7} {'beside':>7} {'ratio':>6} {'flushes/s':>9} "
              f"{'load':>5}")
        for kind in ("thread", "process"):
            alone = float(np.median([step_ms() for _ in range(3)]))
            flushes.value = 0
            if kind == "thread":
                stop, ready = threading.Event(), threading.Event()
                worker = threading.Thread(target=flush_forever, args=(
                    str(tmp / "bg.zarr"), meta, rows, stop, flushes, ready))
            else:
                ctx = mp.get_context("fork")
                stop, ready = ctx.Event(), ctx.Event()
                worker = ctx.Process(target=flush_forever, args=(
                    str(tmp / "bg.zarr"), meta, rows, stop, flushes, ready))
            worker.start()
            ready.wait()
            n0, t0 = flushes.value, time.perf_counter()
            beside = float(np.median([step_ms() for _ in range(3)]))
            rate = (flushes.value - n0) / (time.perf_counter() - t0)
            stop.set()
            worker.join()
            print(f"{kind:10} {alone:7.2f} {beside:7.2f} {beside / alone:5.2f}x {rate:9.1f} "
                  f"{ro.load():>5}", flush=True)


if __name__ == "__main__":
    main()
