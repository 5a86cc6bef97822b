"""A Recorder's fixed cost on a small MLP: store creation, the first recorded step, ``close()``.

Usage: ``python benchmarks/fixed_cost.py [--repeats 5] [--dir DIR] [--profile]``.

Model: 784-384-384-10 MLP, B=128, SGD, one torch thread, random data (issue 26 item 3). Each
repeat measures, against the median plain step measured in the same repeat:

* ``enter``: ``Recorder.__enter__`` (store lock, writer thread start);
* ``step0``: the first recorded step (training-thread time, self-check included), and the
  same step with ``self_check=False`` (a second Recorder; the difference is the self-check);
* ``commit``: from the start of step 0 until the store's first commit returns (writer thread);
* ``create``: ``RunStoreWriter.create`` (writer thread), ``append``: the first append;
* ``after``: the 10 unrecorded steps right after step 0, each / the plain step (median, max);
* ``close``: ``Recorder.close()``; ``finalize``: its trim of every array to the committed rows
  (writer thread);
* ``run200``: 200 steps at every=100 (construction, enter and close included) / 200 plain steps
  (the hidden check's ratio), alternated with its baseline.

Bytes written: the store's file sizes (and its files and directories). Their I/O time is
estimated by writing the same bytes into the same directory, as one file and as one file per
store file (each to a temporary name renamed into place, as Zarr does; no fsync, as the store
does none), beside one file with fsync for reference. ``--profile`` adds cProfile tables of
``RunStoreWriter.create`` (writer thread) and of step 0 (training thread). Load average and
``OMP_WAIT_POLICY`` (set to PASSIVE unless given) are printed beside each figure. Not a test.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import argparse
import cProfile
import io
import pstats
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

import trajlab
from trajlab.store.run_store import RunStoreWriter

OMP = os.environ.get("OMP_WAIT_POLICY", "")


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


class Mlp:
    """784-384-384-10 MLP, B=128, on fixed random data."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.X = torch.randn(4096, 784, generator=g)
        self.Y = torch.randint(0, 10, (4096,), generator=g)
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(784, 384), nn.ReLU(), nn.Linear(384, 384),
                                   nn.ReLU(), nn.Linear(384, 10))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.gen = torch.Generator().manual_seed(0)

    def step(self, rec: trajlab.Recorder | None = None) -> float:
        """One training step; its seconds."""
        t0 = time.perf_counter()
        idx = torch.randint(0, len(self.X), (128,), generator=self.gen)
        x, y = self.X[idx], self.Y[idx]
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if rec is not None:
            rec.log(loss=loss, indices=idx)
        self.opt.step()
        return time.perf_counter() - t0


class Probe:
    """Benchmark-only timers around RunStoreWriter.create/append/finalize (writer thread)."""

    def __init__(self, profile: bool = False) -> None:
        self.profile = profile
        self.events: dict[str, float] = {}
        self.stats: pstats.Stats | None = None
        self._saved = (RunStoreWriter.create, RunStoreWriter.append, RunStoreWriter.finalize)

    def __enter__(self) -> Self:
        create, append, finalize = self._saved
        probe = self

        def timed_create(w, *a, **kw):
            t0 = time.perf_counter()
            prof = cProfile.Profile() if probe.profile else None
            if prof is not None:
                prof.enable()
            try:
                return create(w, *a, **kw)
            finally:
                if prof is not None:
                    prof.disable()
                    probe.stats = pstats.Stats(prof)
                probe.events.setdefault("create", time.perf_counter() - t0)
                probe.events.setdefault("create_end", time.perf_counter())

        def timed_append(w, *a, **kw):
            t0 = time.perf_counter()
            out = append(w, *a, **kw)
            probe.events.setdefault("append", time.perf_counter() - t0)
            probe.events.setdefault("commit_at", time.perf_counter())
            return out

        def timed_finalize(w, *a, **kw):
            t0 = time.perf_counter()
            out = finalize(w, *a, **kw)
            probe.events.setdefault("finalize", time.perf_counter() - t0)
            return out

        RunStoreWriter.create, RunStoreWriter.append = timed_create, timed_append
        RunStoreWriter.finalize = timed_finalize
        return self

    def __exit__(self, *exc) -> None:
        (RunStoreWriter.create, RunStoreWriter.append,
         RunStoreWriter.finalize) = self._saved


def store_files(root: Path) -> tuple[int, list[int], int]:
    """(bytes, sizes of the files, directories) under ``root``."""
    sizes, dirs = [], 0
    for _, ds, fs in os.walk(root):
        dirs += len(ds)
        sizes += [os.path.getsize(os.path.join(_, f)) for f in fs]
    return sum(sizes), sizes, dirs


def io_time(directory: Path, sizes: list[int], dirs: int) -> dict[str, float]:
    """Seconds to write ``sizes`` into ``directory``: one file; one file each (tmp + rename,
    in ``dirs`` directories, no fsync); one file with fsync."""
    out = {}
    d = Path(tempfile.mkdtemp(dir=directory))
    total = sum(sizes)
    data = os.urandom(max(sizes + [total]))
    try:
        t0 = time.perf_counter()
        with open(d / "one", "wb") as f:
            f.write(data[:total])
        out["one"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with open(d / "sync", "wb") as f:
            f.write(data[:total])
            f.flush()
            os.fsync(f.fileno())
        out["fsync"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        subdirs = [d / f"d{i}" for i in range(max(1, dirs))]
        for s in subdirs:
            s.mkdir()
        for i, n in enumerate(sizes):
            p = subdirs[i % len(subdirs)] / f"f{i}"
            tmp = p.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(data[:n])
            os.replace(tmp, p)
        out["files"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(d)
    return out


def one_repeat(tmp: Path, k: int, profile: bool) -> dict:
    w = Mlp()
    for _ in range(10):
        w.step()
    plain = statistics.median(w.step() for _ in range(20))
    store = tmp / f"run{k}"
    with Probe(profile) as probe:
        rec = trajlab.Recorder(w.model, store, optimizer=w.opt, every=100)
        t0 = time.perf_counter()
        rec.__enter__()
        enter = time.perf_counter() - t0
        prof = cProfile.Profile() if profile else None
        t_step0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        step0 = w.step(rec)
        if prof is not None:
            prof.disable()
        after = [w.step(rec) for _ in range(10)]
        t0 = time.perf_counter()
        rec.close()
        close = time.perf_counter() - t0
    ev = probe.events
    nbytes, sizes, dirs = store_files(store)
    with trajlab.Recorder(w.model, tmp / f"nocheck{k}", optimizer=w.opt, every=100,
                          self_check=False) as rec:
        nocheck = w.step(rec)
    r = {"plain": plain, "enter": enter, "step0": step0, "close": close, "after": after,
         "nocheck": nocheck,
         "create": ev.get("create", float("nan")), "append": ev.get("append", float("nan")),
         "finalize": ev.get("finalize", float("nan")),
         "commit": ev.get("commit_at", float("nan")) - t_step0,
         "create_done": ev.get("create_end", float("nan")) - t_step0,
         "bytes": nbytes, "files": len(sizes), "dirs": dirs, "load": load(),
         "io": io_time(tmp, sizes, dirs)}
    if profile:
        r["profile_create"] = probe.stats
        r["profile_step0"] = pstats.Stats(prof)
    return r


def run200(tmp: Path, k: int) -> tuple[float, float]:
    """(seconds of 200 plain steps, of 200 steps at every=100 with the Recorder's lifetime)."""
    w = Mlp()
    for _ in range(10):
        w.step()
    t0 = time.perf_counter()
    for _ in range(200):
        w.step()
    plain = time.perf_counter() - t0
    w = Mlp()
    for _ in range(10):
        w.step()
    t0 = time.perf_counter()
    with trajlab.Recorder(w.model, tmp / f"r200_{k}", optimizer=w.opt, every=100) as rec:
        for _ in range(200):
            w.step(rec)
    return plain, time.perf_counter() - t0


def ms(xs: list[float]) -> str:
    xs = [x * 1e3 for x in xs]
    return f"{statistics.median(xs):7.1f} ms ({min(xs):.1f}..{max(xs):.1f})"


def ratio(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}x ({min(xs):.2f}..{max(xs):.2f})"


def print_profile(stats: pstats.Stats, title: str, n: int = 25) -> None:
    s = io.StringIO()
    stats.stream = s
    stats.sort_stats("cumulative").print_stats(n)
    print(f"\n--- {title}\n" + "\n".join(s.getvalue().splitlines()[:n + 12]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="directory for the stores (default: a temp dir)")
    p.add_argument("--profile", action="store_true", help="cProfile create and step 0 (once)")
    p.add_argument("--no-run200", action="store_true", help="skip the 200-step runs")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(dir=args.dir, prefix="trajlab-fixed-"))
    try:
        if args.profile:
            r = one_repeat(tmp, 99, True)
            print_profile(r["profile_create"], "RunStoreWriter.create (writer thread)")
            print_profile(r["profile_step0"], "step 0 (training thread)")
        rows, pairs = [], []
        for k in range(args.repeats):
            rows.append(one_repeat(tmp, k, False))
            if not args.no_run200:
                pairs.append((*run200(tmp, k), load()))
        col = lambda key: [r[key] for r in rows]
        loads = " ".join(r["load"] for r in rows)
        print(f"784-384-384-10 MLP, B=128, 1 torch thread; OMP_WAIT_POLICY={OMP or 'unset'}; "
              f"{args.repeats} repeats, median (min..max); load per repeat: {loads}")
        print(f"plain step            {ms(col('plain'))}")
        print(f"Recorder.__enter__    {ms(col('enter'))}")
        print(f"step 0 (recorded)     {ms(col('step0'))}  "
              f"beyond plain {ms([r['step0'] - r['plain'] for r in rows])}")
        print(f"  self_check=False    {ms(col('nocheck'))}  beyond plain "
              f"{ms([r['nocheck'] - r['plain'] for r in rows])}")
        print(f"  create (writer)     {ms(col('create'))}  done at "
              f"{ms(col('create_done'))} after step 0 began")
        print(f"  first append        {ms(col('append'))}")
        print(f"  first commit at     {ms(col('commit'))} after step 0 began")
        print(f"close()               {ms(col('close'))}")
        print(f"  finalize (writer)   {ms(col('finalize'))}  (trim to the committed rows)")
        fixed = [r["enter"] + r["step0"] - r["plain"] + r["close"] for r in rows]
        print(f"fixed cost (enter + step 0 - plain + close) {ms(fixed)}")
        print("steps 1-10 / plain    median "
              + ratio([statistics.median(r["after"]) / r["plain"] for r in rows])
              + ", max " + ratio([max(r["after"]) / r["plain"] for r in rows])
              + ", sum beyond plain "
              + ms([sum(r["after"]) - 10 * r["plain"] for r in rows]))
        print(f"store: {statistics.median(col('bytes')) / 1e6:.2f} MB in "
              f"{statistics.median(col('files')):.0f} files, "
              f"{statistics.median(col('dirs')):.0f} directories")
        for key, what in (("one", "one file"), ("files", "same files (tmp+rename)"),
                          ("fsync", "one file + fsync")):
            print(f"  I/O estimate, {what:24s} {ms([r['io'][key] for r in rows])}")
        over = [f - r["io"]["files"] for f, r in zip(fixed, rows)]
        print(f"fixed cost beyond the bytes' I/O (same files) {ms(over)}")
        if pairs:
            print("200 steps at every=100 / 200 plain steps "
                  + ratio([b / a for a, b, _ in pairs]) + f"  (plain {ms([a for a, _, _ in pairs])}"
                  + f"; load {' '.join(x for *_, x in pairs)})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
