"""Benchmark of trajlab.Recorder: training-step overhead, capture cost and bytes per step.

Usage: ``python benchmarks/record_overhead.py [--quick] [--threads N] [--no-profile]``.

Every number is a ratio against a baseline measured in the same run: plain training steps,
``torch.func`` dense per-sample gradients, dense float32 per-sample gradients on disk. Timed
blocks are interleaved (baseline, recorder, baseline, recorder, ...) and the tables give the
median of the paired ratios with their min..max, because a shared machine is noisy. Not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import zarr
from torch import nn
from torch.func import functional_call, grad, vmap

import trajlab
from trajlab.data import load_digits
from trajlab.recipes import TrainConfig, digits_model
from trajlab.record.basis import SubspaceTracker
from trajlab.record.rules import rule_for
from trajlab.record.rules.base import rank1_sketch, subspace_sketch

TARGET_STEP = {"mlp": 1.3, "convnet": 2.0}


# ----------------------------------------------------------------------------- workloads
class Workload:
    """A model, its optimizer and a stream of random batches drawn from fixed data."""

    def __init__(self, name: str, model: nn.Module, X: torch.Tensor, Y: torch.Tensor, batch: int):
        self.name, self.model, self.X, self.Y, self.batch = name, model, X, Y, batch
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01)
        self.gen = torch.Generator().manual_seed(0)

    def steps(self, n: int, rec: trajlab.Recorder | None = None) -> None:
        for _ in range(n):
            idx = torch.randint(0, len(self.X), (self.batch,), generator=self.gen)
            x, y = self.X[idx], self.Y[idx]
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            if rec is not None:
                rec.log(loss=loss, indices=idx)
            self.opt.step()

    def batch_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(self.batch)
        return self.X[idx], self.Y[idx]


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


# ----------------------------------------------------------------------------- step overhead
def time_steps(w: Workload, n: int, store: Path | None) -> tuple[float, float]:
    """(seconds for the loop, seconds including the recorder's close/flush) for ``n`` steps."""
    t0 = time.perf_counter()
    if store is None:
        w.steps(n)
        t = time.perf_counter() - t0
        return t, t
    rec = trajlab.Recorder(w.model, store, optimizer=w.opt)
    with rec:
        w.steps(n, rec)
        t_hot = time.perf_counter() - t0
    return t_hot, time.perf_counter() - t0


def bench_steps(w: Workload, n: int, repeats: int, tmp: Path) -> dict:
    w.steps(20)  # warm-up: allocator, kernels
    time_steps(w, 10, tmp / f"{w.name}-warm.zarr")  # warm-up: zarr, writer thread, imports
    base, hot, total = [], [], []
    for r in range(repeats):
        base.append(time_steps(w, n, None)[0])
        h, t = time_steps(w, n, tmp / f"{w.name}-{r}.zarr")
        hot.append(h)
        total.append(t)
        if r > 0:  # keep the first store for the bytes table; the MLP writes ~7 MB a step
            shutil.rmtree(tmp / f"{w.name}-{r}.zarr")
    return {
        "base_ms": statistics.median(base) / n * 1e3,
        "hot": [h / b for h, b in zip(hot, base)],
        "total": [t / b for t, b in zip(total, base)],
        "store": tmp / f"{w.name}-0.zarr",
        "n": n,
    }


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


def capture_fn(w: Workload, with_basis: bool):
    """The recorder's per-sample work for one batch (rule patches + sketch kernels)."""
    seen = layer_inputs_and_grads(w)
    tracker = SubspaceTracker(4)
    rules = {n: rule_for(m) for n, (m, _, _) in seen.items()}
    bases = {n: tracker.basis(n, rules[n].weight_matrix(m).detach())
             for n, (m, inp, _) in seen.items() if inp.dim() != 2}

    def run():
        out = {}
        for n, (m, inp, g) in seen.items():
            act, delta = rules[n].patches(m, inp, g)
            if inp.dim() == 2:
                out[n] = rank1_sketch(act[..., 0], delta[..., 0])
            else:
                U, V, _ = (tracker.basis(n, rules[n].weight_matrix(m).detach())
                           if with_basis else bases[n])
                out[n] = subspace_sketch(act, delta, U, V)[0]
        return out

    return run


def torch_func_fn(w: Workload):
    """Dense per-sample gradients of every recorded weight with vmap(grad(...))."""
    x, y = w.batch_tensors()
    weights = {f"{n}.weight" for n, m in w.model.named_modules() if rule_for(m) is not None}
    params = {k: v.detach() for k, v in w.model.named_parameters()}
    wp = {k: v for k, v in params.items() if k in weights}
    rest = {k: v for k, v in params.items() if k not in weights}

    def loss_one(wp, xi, yi):
        out = functional_call(w.model, {**wp, **rest}, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    return lambda: per_sample(wp, x, y)


def plain_fwd_bwd_fn(w: Workload):
    x, y = w.batch_tensors()

    def run():
        w.model.zero_grad()
        F.cross_entropy(w.model(x), y).backward()

    return run


def interleaved(fns: dict, repeats: int, inner: int) -> dict[str, list[float]]:
    for f in fns.values():
        f()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            times[k].append((time.perf_counter() - t0) / inner)
    return times


def bench_capture(w: Workload, repeats: int, inner: int) -> dict:
    t = interleaved(
        {
            "capture": capture_fn(w, with_basis=False),
            "capture+basis": capture_fn(w, with_basis=True),
            "torch.func": torch_func_fn(w),
            "fwd+bwd": plain_fwd_bwd_fn(w),
        },
        repeats,
        inner,
    )
    return t


# ----------------------------------------------------------------------------- bytes
def logical_nbytes(group: zarr.Group) -> int:
    """Uncompressed bytes of every array in the store (recursively)."""
    total = sum(int(a.nbytes) for _, a in group.arrays())
    for _, g in group.groups():
        total += logical_nbytes(g)
    return total


def bench_bytes(w: Workload, store: Path) -> dict:
    run = trajlab.open_run(store)
    n = run.n_steps
    n_weights = sum(m.weight.numel() for m in w.model.modules() if rule_for(m) is not None)
    dense = w.batch * n_weights * 4
    stored = run.nbytes_stored() / n
    raw = logical_nbytes(zarr.open_group(str(store), mode="r")) / n
    return {"dense": dense, "stored": stored, "raw": raw, "n_weights": n_weights}


# ----------------------------------------------------------------------------- profile
def profile_recorded(w: Workload, n: int, store: Path) -> str:
    """cProfile of the training thread plus the writer thread's total append time."""
    from trajlab.store.run_store import RunStoreWriter

    spent = [0.0]
    original = RunStoreWriter.append

    def timed_append(self, records):
        t0 = time.perf_counter()
        try:
            return original(self, records)
        finally:
            spent[0] += time.perf_counter() - t0

    RunStoreWriter.append = timed_append  # benchmark-only instrumentation, restored below
    prof = cProfile.Profile()
    try:
        t0 = time.perf_counter()
        prof.enable()
        with trajlab.Recorder(w.model, store, optimizer=w.opt) as rec:
            w.steps(n, rec)
        prof.disable()
        wall = time.perf_counter() - t0
    finally:
        RunStoreWriter.append = original
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    lines = [ln[:150] for ln in s.getvalue().splitlines() if ln.strip()]
    head = (f"  {w.name}: {n} recorded steps, {wall / n * 1e3:.2f} ms/step wall; writer thread "
            f"in RunStoreWriter.append {spent[0] / n * 1e3:.2f} ms/step")
    return "\n".join([head] + ["    " + ln for ln in lines[3:]])


# ----------------------------------------------------------------------------- main
def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3g}x  ({min(xs):.3g}..{max(xs):.3g})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fast smoke run (< 60 s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile breakdown")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # The MLP's recorded steps are slow (the writer, see README), so it runs fewer of them.
    steps = {"mlp": 10, "convnet": 20} if args.quick else {"mlp": 50, "convnet": 200}
    repeats = 3 if args.quick else 7
    cap_repeats, cap_inner = (3, 1) if args.quick else (9, 5)
    print(f"trajlab {trajlab.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; steps per timed block {steps}, "
          f"{repeats} interleaved repeats")
    workloads = [mlp_workload(), convnet_workload()]
    over_target = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("\nStep time with Recorder(every=1) / without (median of paired ratios, min..max)")
        print(f"{'model':9} {'plain ms/step':>13} {'hot loop':>24} {'incl. final flush':>24}"
              f" {'target':>7}")
        results = {}
        for w in workloads:
            r = bench_steps(w, steps[w.name], repeats, tmp)
            results[w.name] = r
            print(f"{w.name:9} {r['base_ms']:13.2f} {spread(r['hot']):>24} "
                  f"{spread(r['total']):>24} {TARGET_STEP[w.name]:6.1f}x")
            if statistics.median(r["total"]) > TARGET_STEP[w.name]:
                over_target.append(w)

        print("\nPer-sample capture for one batch vs torch.func vmap(grad) dense per-sample "
              "gradients (median ms; ratio = capture / torch.func, min..max over repeats)")
        print(f"{'model':9} {'fwd+bwd':>8} {'torch.func':>10} {'capture':>8} {'ratio':>24} "
              f"{'capture+basis':>13} {'ratio':>24}")
        for w in workloads:
            t = bench_capture(w, cap_repeats, cap_inner)
            med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
            r1 = [a / b for a, b in zip(t["capture"], t["torch.func"])]
            r2 = [a / b for a, b in zip(t["capture+basis"], t["torch.func"])]
            print(f"{w.name:9} {med['fwd+bwd']:8.2f} {med['torch.func']:10.2f} "
                  f"{med['capture']:8.2f} {spread(r1):>24} {med['capture+basis']:13.2f} "
                  f"{spread(r2):>24}")

        print("\nBytes per recorded step vs dense float32 per-sample gradients of the recorded "
              "weights (B x params x 4)")
        print(f"{'model':9} {'params':>8} {'dense KB':>9} {'stored KB':>10} {'smaller':>8} "
              f"{'uncompr. KB':>11} {'smaller':>8} {'target':>7}")
        for w in workloads:
            b = bench_bytes(w, results[w.name]["store"])
            print(f"{w.name:9} {b['n_weights']:8d} {b['dense'] / 1e3:9.1f} "
                  f"{b['stored'] / 1e3:10.1f} {b['dense'] / b['stored']:7.1f}x "
                  f"{b['raw'] / 1e3:11.1f} {b['dense'] / b['raw']:7.1f}x {'10x':>7}")

        if over_target and not args.no_profile:
            print("\nOver target: where the recorded loop's time goes (training thread, "
                  "cProfile by own time)")
            for w in over_target:
                print(profile_recorded(w, steps[w.name], tmp / f"{w.name}-profile.zarr"))


if __name__ == "__main__":
    main()
