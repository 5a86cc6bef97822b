"""Benchmark of trajlab.Recorder: step overhead, the I/O floor of recorded steps, bytes per step.

Usage: ``python benchmarks/record_overhead.py [--quick] [--threads N] [--writer W] [--errors]
[--bandwidth-gb G] [--dir DIR] [--capture] [--models mlp,convnet,cifar] [--device cpu|cuda]``.

Models: ``mlp`` (784-512-512-10, B=128), ``convnet`` (the digits demo ConvNet, B=64) and
``cifar`` (the paper-style ConvNet :func:`trajlab.models.cifar_convnet`: 3 conv + 2 linear,
3x32x32 inputs, B=128, random data). The default is ``mlp,convnet`` on the CPU and all three
with ``--device cuda`` (timed blocks then end with ``torch.cuda.synchronize()``).

Three tables, every figure a ratio against a baseline measured in the same run:

1. training step with a Recorder at ``every`` = 1, 10, 100 / without, and a whole 200-step run
   at every=100 with a fresh Recorder (construction, store creation and ``close()`` included) /
   200 plain steps (plus per-sample gradients with Opacus ``GradSampleModule`` and BackPACK
   ``BatchGrad`` where those are installed);
2. every=1 against the I/O floor: recorder time / max(plain step, stored bytes per step /
   sustained write bandwidth), the bandwidth measured here into the stores' directory, beside
   the CPU time a recorded step costs the whole process (all threads, a writer process
   included): divided by the CPUs it is the shortest wall time the work allows on few cores;
3. bytes per recorded step against the old layout (trajlab 0.1 codecs, rank 4, float32).

``--errors`` adds the error of every analysis term of float16 and rank-2 stores against the
float32 rank-4 store (``trajlab.analyze``, synchronous). Timed blocks are interleaved (baseline,
candidate, ...); tables give the median of the paired ratios with their min..max, and the load
average (``uptime``) while each row was measured. OpenMP threads spin while waiting by default,
which stalls training whenever another process (such as a writer process) holds a core, so this
script sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it; every table prints it.
Not a test.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import argparse
import contextlib
import copy
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import nn
from torch.func import functional_call, grad, vmap

import trajlab
import trajlab.record.recorder as recorder_module
import trajlab.record.session as session_module
from trajlab.data import load_digits
from trajlab.models import cifar_convnet
from trajlab.recipes import TrainConfig, digits_model
from trajlab.record.basis import SubspaceTracker
from trajlab.record.process_writer import ProcessWriter
from trajlab.record.rules import rule_for
from trajlab.record.writer import BackgroundWriter
from trajlab.sketches import sketch_kind
from trajlab.store.run_store import RunStoreWriter

TARGET_EVERY = {1: None, 10: 1.15, 100: 1.03}
TARGET_FLOOR = 1.25
#: Steps of the whole-run row (every=100, the Recorder's lifetime included; issue 26 item 3).
LIFETIME_STEPS = 200
OMP = os.environ.get("OMP_WAIT_POLICY", "")


#: CPUs this process may run on (the wall-time bound of CPU work is CPU seconds / NCPU).
NCPU = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


# ----------------------------------------------------------------------------- workloads
DEVICE = torch.device("cpu")


def sync() -> None:
    """Wait for the device (timed blocks end here, so that they include queued kernels)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


class Workload:
    """A model, its optimizer and a stream of random batches drawn from fixed data, all on
    ``DEVICE`` (batch indices are drawn on the CPU and moved)."""

    def __init__(self, name: str, model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch: int):
        self.name, self.batch = name, batch
        self.model, self.X, self.Y = model.to(DEVICE), X.to(DEVICE), Y.to(DEVICE)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.gen = torch.Generator().manual_seed(0)

    def copy(self) -> Workload:
        """An identical workload (same weights, same batches from here on)."""
        w = Workload(self.name, copy.deepcopy(self.model), self.X, self.Y, self.batch)
        w.gen.set_state(self.gen.get_state())
        return w

    def steps(self, n: int, rec: trajlab.Recorder | None = None) -> None:
        for _ in range(n):
            idx = torch.randint(0, len(self.X), (self.batch,), generator=self.gen)
            x, y = self.X[idx.to(DEVICE)], self.Y[idx.to(DEVICE)]
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            if rec is not None:
                rec.log(loss=loss, indices=idx)
            self.opt.step()
        sync()

    def batch_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X[: self.batch], self.Y[: self.batch]


def mlp_workload() -> Workload:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 784, generator=g)
    Y = torch.randint(0, 10, (4096,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    return Workload("mlp", model, X, Y, batch=128)


def convnet_workload() -> Workload:
    X, Y = load_digits(split="train")
    return Workload("convnet", digits_model(TrainConfig()), X, Y, batch=64)


def cifar_workload() -> Workload:
    """The paper-style ConvNet (3 conv + 2 linear) on CIFAR-shaped random data, B=128."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 3, 32, 32, generator=g)
    Y = torch.randint(0, 10, (2048,), generator=g)
    return Workload("cifar", cifar_convnet(10, seed=0), X, Y, batch=128)


WORKLOADS = {"mlp": mlp_workload, "convnet": convnet_workload, "cifar": cifar_workload}
#: (every=1 steps per block, every=10 and every=100 blocks) per model: full / --quick.
SIZES = {"mlp": ((50, 10), (16, 3)), "convnet": ((200, 10), (50, 3)),
         "cifar": ((20, 3), (8, 1))}


# ----------------------------------------------------------------------------- wiring
@contextlib.contextmanager
def writer_setup(writer: str = "thread", profile: str = "fast"):
    """Benchmark-only wiring: which writer and codec profile the Recorder gets (restored)."""
    make = ProcessWriter if writer == "process" else BackgroundWriter
    names = ("BackgroundWriter", "make_writer")
    saved = {n: getattr(recorder_module, n) for n in names if hasattr(recorder_module, n)}
    recorder_module.BackgroundWriter = make
    recorder_module.make_writer = lambda kind, w, **kw: make(w, **kw)
    saved_store_writer = session_module.RunStoreWriter  # the Session opens the store
    session_module.RunStoreWriter = lambda *a, **kw: RunStoreWriter(
        *a, **{**kw, "codec_profile": profile})
    try:
        yield
    finally:
        session_module.RunStoreWriter = saved_store_writer
        for n in names:
            if n in saved:
                setattr(recorder_module, n, saved[n])
            else:
                delattr(recorder_module, n)


def record(w: Workload, store: Path, n: int, **kw) -> tuple[float, float]:
    """(seconds of the loop, seconds including enter and close) recording ``n`` steps."""
    t0 = time.perf_counter()
    with trajlab.Recorder(w.model, store, optimizer=w.opt, **kw) as rec:
        t1 = time.perf_counter()
        w.steps(n, rec)
        t_hot = time.perf_counter() - t1
    return t_hot, time.perf_counter() - t0


def paired(base: list[float], cand: list[float]) -> list[float]:
    return [c / b for b, c in zip(base, cand)]


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3g}x ({min(xs):.3g}..{max(xs):.3g})"


# ----------------------------------------------------------------------------- table 1
def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process and its joined children (a writer process
    is a forked child, joined by ``Recorder.close``)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


def bench_every1(w: Workload, n: int, repeats: int, tmp: Path, writer: str) -> dict:
    """Fresh recorder per block (so each block pays its own final flush). Also the CPU time
    each block used, all threads and the writer process included: on a machine with few cores
    it bounds the wall time from below (CPU seconds / cores) whatever the bytes cost."""
    with writer_setup(writer):
        record(w, tmp / f"{w.name}-warm.zarr", 5, mode="w")  # zarr, writer, imports
        base, hot, total, loads, cpu, sys_ = [], [], [], [], [], []
        store = None
        for r in range(repeats):
            t0 = time.perf_counter()
            w.steps(n)
            base.append(time.perf_counter() - t0)
            store = tmp / f"{w.name}-{writer}-{r}.zarr"
            u0, s0 = cpu_seconds()
            h, t = record(w, store, n)
            u1, s1 = cpu_seconds()
            hot.append(h)
            total.append(t)
            cpu.append((u1 - u0 + s1 - s0) / n)
            sys_.append((s1 - s0) / n)
            loads.append(os.getloadavg()[0])
            if r < repeats - 1:
                shutil.rmtree(store)
    run = trajlab.open_run(store)
    return {"base_ms": statistics.median(base) / n * 1e3, "hot": paired(base, hot),
            "total": paired(base, total), "rec_ms": statistics.median(total) / n * 1e3,
            "bytes": run.nbytes_stored() / run.n_steps, "load": statistics.median(loads),
            "cpu_ms": statistics.median(cpu) * 1e3, "sys_ms": statistics.median(sys_) * 1e3}


def bench_every(w: Workload, every: int, blocks_of: int, repeats: int, tmp: Path,
                writer: str) -> dict:
    """Steady state of a long-lived recorder: blocks of ``blocks_of * every`` steps of an
    identical plain workload and of the recorded one, interleaved."""
    plain, recd = w.copy(), w.copy()
    n = blocks_of * every
    base, cand, loads = [], [], []
    with writer_setup(writer), trajlab.Recorder(recd.model, tmp / f"{w.name}-e{every}.zarr",
                                                optimizer=recd.opt, every=every) as rec:
        recd.steps(every, rec)  # the first recorded step creates the store
        plain.steps(every)
        plain.steps(n)  # untimed: the writer creates the store's arrays meanwhile (its GIL
        recd.steps(n, rec)  # time slowed the first timed plain block: ratios of 0.6-0.9)
        for _ in range(repeats):
            t0 = time.perf_counter()
            plain.steps(n)
            base.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            recd.steps(n, rec)
            cand.append(time.perf_counter() - t0)
            loads.append(os.getloadavg()[0])
    shutil.rmtree(tmp / f"{w.name}-e{every}.zarr")
    return {"ratio": paired(base, cand), "load": statistics.median(loads),
            "base_ms": statistics.median(base) / n * 1e3}


def bench_lifetime(w: Workload, steps: int, every: int, repeats: int, tmp: Path,
                   writer: str) -> dict:
    """A whole short run: ``steps`` steps at ``every`` with a fresh Recorder (construction,
    store creation, ``close()`` included) against ``steps`` plain steps of an identical
    workload, alternated (the fixed cost that short runs and sweeps pay on every run)."""
    plain, recd = w.copy(), w.copy()
    base, cand, loads = [], [], []
    with writer_setup(writer):
        record(recd, tmp / f"{w.name}-life-warm.zarr", every + 1, every=every)  # imports, zarr
        plain.steps(every + 1)
        for r in range(repeats):
            t0 = time.perf_counter()
            plain.steps(steps)
            base.append(time.perf_counter() - t0)
            store = tmp / f"{w.name}-life-{writer}-{r}.zarr"
            cand.append(record(recd, store, steps, every=every)[1])
            loads.append(os.getloadavg()[0])
            shutil.rmtree(store)
    shutil.rmtree(tmp / f"{w.name}-life-warm.zarr")
    return {"ratio": paired(base, cand), "load": statistics.median(loads),
            "base_ms": statistics.median(base) / steps * 1e3}


def opacus_step(w: Workload):
    try:
        from opacus import GradSampleModule
    except ImportError:
        return None
    model = GradSampleModule(copy.deepcopy(w.model))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)

    def steps(n):
        for _ in range(n):
            idx = torch.randint(0, len(w.X), (w.batch,), generator=g).to(DEVICE)
            model.zero_grad(set_to_none=True)  # also drops grad_sample (else it accumulates)
            F.cross_entropy(model(w.X[idx]), w.Y[idx]).backward()  # fills p.grad_sample
            opt.step()
        for p in model.parameters():
            p.grad_sample = None
        sync()

    return steps


def backpack_step(w: Workload):
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
    except ImportError:
        return None
    model = extend(copy.deepcopy(w.model))
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)

    def steps(n):
        for _ in range(n):
            idx = torch.randint(0, len(w.X), (w.batch,), generator=g).to(DEVICE)
            opt.zero_grad(set_to_none=True)
            with backpack(BatchGrad()):
                loss_fn(model(w.X[idx]), w.Y[idx]).backward()  # fills p.grad_batch
            opt.step()
        sync()

    return steps


def bench_alternative(w: Workload, make, n: int, repeats: int) -> dict | None:
    steps = make(w)
    if steps is None:
        return None
    plain = w.copy()
    base, cand, loads = [], [], []
    with warnings.catch_warnings():  # their full backward hooks warn on every model
        warnings.simplefilter("ignore")
        steps(3)
        plain.steps(3)
        for _ in range(repeats):
            t0 = time.perf_counter()
            plain.steps(n)
            base.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            steps(n)
            cand.append(time.perf_counter() - t0)
            loads.append(os.getloadavg()[0])
    return {"ratio": paired(base, cand), "load": statistics.median(loads)}


# ----------------------------------------------------------------------------- bandwidth
def write_bandwidth(directory: Path, gigabytes: float, block_mb: int = 16) -> float:
    """Sustained sequential write bandwidth (bytes/s) into ``directory``: ``gigabytes`` written
    in ``block_mb`` blocks, then fsync; the clock includes the fsync."""
    path = directory / "bandwidth.tmp"
    block = np.random.default_rng(0).integers(0, 255, block_mb << 20, dtype=np.uint8).tobytes()
    n = max(1, int(gigabytes * 1024 / block_mb))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, block)
        os.fsync(fd)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink()
    return n * len(block) / dt


# ----------------------------------------------------------------------------- table 3
def logical_nbytes(group: zarr.Group) -> int:
    """Uncompressed bytes of every array in the store (recursively)."""
    total = sum(int(a.nbytes) for _, a in group.arrays())
    for _, g in group.groups():
        total += logical_nbytes(g)
    return total


BYTES_CONFIGS = [
    ("old layout (0.1 codecs, rank 4, f32)", "plain", {"rank": 4}),
    ("fast codecs, rank 4", "fast", {"rank": 4}),
    ("small codecs, rank 4", "small", {"rank": 4}),
    ("fast + float16 per-sample, rank 4", "fast", {"per_sample_dtype": "float16", "rank": 4}),
    ("fast, rank 2 (default)", "fast", {"rank": 2}),
    ("fast + float16 + rank 2", "fast", {"per_sample_dtype": "float16", "rank": 2}),
    ("small + float16 + rank 2", "small", {"per_sample_dtype": "float16", "rank": 2}),
]


def bench_bytes(make, n: int, tmp: Path) -> list[dict]:
    rows = []
    for label, profile, kw in BYTES_CONFIGS:
        w = make()
        store = tmp / f"{w.name}-bytes.zarr"
        with writer_setup("thread", profile):
            record(w, store, n, **kw)
        run = trajlab.open_run(store)
        n_w = sum(m.weight.numel() for m in w.model.modules() if rule_for(m) is not None)
        rows.append({"label": label, "stored": run.nbytes_stored() / run.n_steps,
                     "raw": logical_nbytes(zarr.open_group(str(store), mode="r")) / run.n_steps,
                     "dense": w.batch * n_w * 4, "kw": kw, "profile": profile,
                     "store": store})
        shutil.move(str(store), str(tmp / f"{w.name}-bytes-{len(rows)}.zarr"))
        rows[-1]["store"] = tmp / f"{w.name}-bytes-{len(rows)}.zarr"
    return rows


#: Terms that are ~0 for plain SGD are scaled by the term they correct.
ERROR_SCALE = {"drift_optimizer": "drift", "logK_drift_optimizer": "logK_drift"}


def analysis_errors(rows: list[dict]) -> list[tuple[str, str, float, float, bool]]:
    """(configuration, variable, max |x - x_ref| / max |x_ref|, max |x_ref|, NaN pattern
    differs) of every analysis variable against the fast float32 rank-4 store (the same
    training run: recording does not change training)."""
    ref_row = next(r for r in rows if r["profile"] == "fast" and r["kw"] == {"rank": 4})
    ref = trajlab.analyze(ref_row["store"], scheduler="synchronous", progress=False)
    out = []
    for r in rows:
        if r is ref_row or r["profile"] != "fast":
            continue
        ds = trajlab.analyze(r["store"], scheduler="synchronous", progress=False)
        for v in ref.data_vars:
            a, b = np.asarray(ds[v].values, np.float64), np.asarray(ref[v].values, np.float64)
            s = np.asarray(ref[ERROR_SCALE.get(v, v)].values, np.float64)
            scale = float(np.max(np.abs(s[np.isfinite(s)]), initial=0.0))
            ok = np.isfinite(a) & np.isfinite(b)
            diff = float(np.max(np.abs(a[ok] - b[ok]), initial=0.0))
            out.append((r["label"], v, diff / scale if scale > 0 else diff, scale,
                        not np.array_equal(np.isfinite(a), np.isfinite(b))))
    return out


# ----------------------------------------------------------------------------- capture cost
def layer_inputs_and_grads(w: Workload):
    """Inputs and output gradients of every recordable layer for one plain fwd+bwd."""
    x, y = w.batch_tensors()
    seen: dict[str, list] = {}
    handles = []
    for name, m in w.model.named_modules():
        if rule_for(m) is None:
            continue

        def hook(mod, args, out, name=name):
            seen[name] = [mod, args[0].detach()]
            out.register_hook(lambda g, name=name: seen[name].append(g.detach()))

        handles.append(m.register_forward_hook(hook))
    try:
        w.model.zero_grad()
        F.cross_entropy(w.model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    return seen


def capture_fn(w: Workload):
    """The recorder's per-sample work for one batch (each rule's per-sample form, the sketch
    kernels, the basis of weight-shared layers), as the recorder runs it at rank 2."""
    seen = layer_inputs_and_grads(w)
    tracker = SubspaceTracker(2)
    rules = {n: rule_for(m) for n, (m, _, _) in seen.items()}

    def run():
        out = {}
        for n, (m, inp, g) in seen.items():
            rule = rules[n]
            matrix = rule.matrices(m)[0]
            ps = rule.per_sample(m, matrix, (inp,), {}, g)
            kind = sketch_kind(rule.describe(m, matrix, (inp,), {}).sketch)
            basis = None
            if kind.name == "subspace":
                basis = tracker.basis(n, rule.weight_matrix(m, matrix).detach())[:2]
            out[n] = ps.capture(kind, basis=basis, rank=2, want_per_sample=False)[0]
        sync()
        return out

    return run


def torch_func_fn(w: Workload):
    x, y = w.batch_tensors()
    weights = {f"{n}.weight" for n, m in w.model.named_modules() if rule_for(m) is not None}
    params = {k: v.detach() for k, v in w.model.named_parameters()}
    wp = {k: v for k, v in params.items() if k in weights}
    rest = {k: v for k, v in params.items() if k not in weights}

    def loss_one(wp, xi, yi):
        out = functional_call(w.model, {**wp, **rest}, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def run():
        out = per_sample(wp, x, y)
        sync()
        return out

    return run


def bench_capture(w: Workload, repeats: int) -> list[float]:
    fns = {"capture": capture_fn(w), "torch.func": torch_func_fn(w)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return paired(times["torch.func"], times["capture"])


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fast smoke run (a few minutes)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--writer", choices=("thread", "process", "both"), default="both",
                   help="writer(s) to time at every=1 (default both)")
    p.add_argument("--bandwidth-gb", type=float, default=None,
                   help="GB written to measure the disk's sustained bandwidth (default 3; "
                        "quick 1)")
    p.add_argument("--dir", default=None, help="directory for the stores (default: a temp dir)")
    p.add_argument("--models", default=None,
                   help="comma-separated models from mlp, convnet, cifar (default mlp,convnet; "
                        "all three with --device cuda)")
    p.add_argument("--only", choices=tuple(WORKLOADS), default=None,
                   help="one model (same as --models NAME)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--errors", action="store_true",
                   help="analysis-term errors of float16 / rank-2 stores (slow)")
    p.add_argument("--capture", action="store_true", help="capture cost vs torch.func")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    q = args.quick
    names = (args.only or args.models
             or ("mlp,convnet,cifar" if DEVICE.type == "cuda" else "mlp,convnet")).split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    steps1 = {n: SIZES[n][q][0] for n in names}
    blocks_for = {n: SIZES[n][q][1] for n in names}
    repeats = 3 if q else 7
    writers = ["thread", "process"] if args.writer == "both" else [args.writer]
    makers = [WORKLOADS[n] for n in names]
    where = (f"{torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda"
             else f"{os.cpu_count()} CPUs")
    print(f"trajlab {trajlab.__version__}, torch {torch.__version__}, device {DEVICE} "
          f"({where}), {torch.get_num_threads()} torch thread(s), "
          f"OMP_WAIT_POLICY={OMP or '(unset)'}; every=1 blocks {steps1} steps, {repeats} "
          "interleaved repeats")
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        gb = args.bandwidth_gb if args.bandwidth_gb is not None else (1.0 if q else 3.0)
        bw = write_bandwidth(tmp, gb)
        print(f"sustained write bandwidth into {tmp}: {bw / 1e6:.0f} MB/s ({gb:g} GB + fsync; "
              f"load {load()})")

        print(f"\n1. Step time with a Recorder / without (median of paired ratios, min..max); "
              f"OMP_WAIT_POLICY={OMP or '(unset)'}, load = 1-min load average")
        print(f"{'model':8} {'recorder':20} {'plain ms':>8} {'ratio':>26} {'target':>7} "
              f"{'load':>5}")
        every1: dict[tuple[str, str], dict] = {}
        for make in makers:
            w = make()
            w.steps(20)
            for writer in writers:
                r = bench_every1(w, steps1[w.name], repeats, tmp, writer)
                every1[(w.name, writer)] = r
                print(f"{w.name:8} {'every=1 ' + writer:20} {r['base_ms']:8.2f} "
                      f"{spread(r['total']):>26} {'-':>7} {r['load']:5.2f}", flush=True)
            for every in (10, 100):
                for writer in writers:
                    r = bench_every(w, every, blocks_for[w.name], repeats, tmp,
                                    writer)
                    print(f"{w.name:8} {f'every={every} ' + writer:20} {r['base_ms']:8.2f} "
                          f"{spread(r['ratio']):>26} {TARGET_EVERY[every]:6.2f}x "
                          f"{r['load']:5.2f}", flush=True)
            for writer in writers:
                r = bench_lifetime(w, LIFETIME_STEPS, 100, repeats, tmp, writer)
                print(f"{w.name:8} {f'run{LIFETIME_STEPS} e=100 ' + writer:20} "
                      f"{r['base_ms']:8.2f} {spread(r['ratio']):>26} {'-':>7} "
                      f"{r['load']:5.2f}", flush=True)
            for label, alt in (("Opacus GradSample", opacus_step), ("BackPACK BatchGrad",
                                                                    backpack_step)):
                r = bench_alternative(w, alt, steps1[w.name], repeats)
                if r is None:
                    print(f"{w.name:8} {label:20} (not installed: skipped)")
                else:
                    print(f"{w.name:8} {label:20} {'':8} {spread(r['ratio']):>26} {'-':>7} "
                          f"{r['load']:5.2f}", flush=True)

        print(f"\n2. every=1 against the I/O floor: recorder ms/step (incl. final flush) / "
              f"max(plain ms/step, stored bytes per step / {bw / 1e6:.0f} MB/s); "
              f"OMP_WAIT_POLICY={OMP or '(unset)'}")
        print(f"{'model':8} {'writer':8} {'plain ms':>8} {'KB/step':>8} {'I/O ms':>7} "
              f"{'rec. ms':>8} {'/ floor':>8} {'/ plain':>8} {'target':>7} {'CPU ms':>7} "
              f"{'sys ms':>7} {'CPU/' + str(NCPU):>7} {'load':>5}")
        for (name, writer), r in every1.items():
            io_ms = r["bytes"] / bw * 1e3
            floor = max(r["base_ms"], io_ms)
            print(f"{name:8} {writer:8} {r['base_ms']:8.2f} {r['bytes'] / 1e3:8.1f} "
                  f"{io_ms:7.2f} {r['rec_ms']:8.2f} {r['rec_ms'] / floor:7.2f}x "
                  f"{statistics.median(r['total']):7.2f}x {TARGET_FLOOR:6.2f}x "
                  f"{r['cpu_ms']:7.2f} {r['sys_ms']:7.2f} {r['cpu_ms'] / NCPU:7.2f} "
                  f"{r['load']:5.2f}")
        print(f"CPU ms: CPU time per recorded step of the whole process (all threads, the "
              f"writer process included), sys ms its system part (page faults, the writes "
              f"into the page cache); CPU/{NCPU}: the shortest wall time that CPU work allows "
              f"on this machine's {NCPU} CPUs")

        print("\n3. Bytes per recorded step (stored; raw = uncompressed) vs the old layout "
              "and vs dense float32 per-sample gradients (B x params x 4)")
        print(f"{'model':8} {'configuration':38} {'KB/step':>9} {'vs old':>7} {'raw KB':>8} "
              f"{'vs dense':>9}")
        bytes_rows = {}
        for make in makers:
            rows = bench_bytes(make, (8 if q else 24) if make is cifar_workload
                               else (24 if q else 64), tmp)
            bytes_rows[make.__name__] = rows
            old = rows[0]["stored"]
            for r in rows:
                print(f"{make.__name__.split('_')[0]:8} {r['label']:38} {r['stored'] / 1e3:9.1f} "
                      f"{old / r['stored']:6.2f}x {r['raw'] / 1e3:8.1f} "
                      f"{r['dense'] / r['stored']:8.1f}x")

        if args.errors:
            print("\n4. Analysis terms of reduced stores vs the fast float32 rank-4 store of the "
                  "same run: max |x - x_ref| / max |x_ref| over steps and layers (0: bit-identical; "
                  "drift_optimizer terms, ~0 for SGD, are scaled by the drift)")
            for name, rows in bytes_rows.items():
                errs = analysis_errors(rows)
                labels = list(dict.fromkeys(e[0] for e in errs))
                table = {(e[0], e[1]): e for e in errs}
                print(f"{name.split('_')[0]:32} {'max |x_ref|':>11} "
                      + " ".join(f"{lab[:26]:>27}" for lab in labels))
                for v in dict.fromkeys(e[1] for e in errs):
                    cells = [f"{table[(lab, v)][2]:26.2e}{'*' if table[(lab, v)][4] else ' '}"
                             for lab in labels]
                    print(f"  {v:30} {table[(labels[0], v)][3]:11.3g} " + " ".join(cells))
            print("  (* NaN pattern differs)")

        if args.capture:
            print("\nPer-sample capture (incl. basis) / torch.func vmap(grad), one batch")
            for make in makers:
                w = make()
                print(f"{w.name:8} {spread(bench_capture(w, 5 if q else 15))}")


if __name__ == "__main__":
    main()
