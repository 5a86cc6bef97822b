"""Benchmark of the layer rules on the layers real models are made of.

Usage: ``python benchmarks/record_layers.py [--quick]``.

Workloads: a small Transformer (Embedding, two ``nn.TransformerEncoderLayer`` with PyTorch's
defaults except ``batch_first=True``, a Linear head), a Conv1d model and, when ``transformers``
is installed, GPT-2 from its config class (2 blocks x 64 wide, its ``Conv1D`` layers) with a
mean-pooled Linear head. ``--workloads gpt2`` runs that one only. Every number is a ratio
against a baseline measured in the same run, from interleaved blocks (baseline, candidate,
baseline, ...), as the median of the paired ratios with min..max:

* step time with ``Recorder(every=1, self_check=False)`` / without;
* the recorder's per-sample work for one batch (each rule's ``per_sample`` + its sketch kind's
  capture, with and without recomputing the top-k basis) / ``torch.func`` ``vmap(grad)`` dense
  per-sample gradients of the same weights;
* per layer: the dedicated rule / the generic torch.func fallback on the same layer;
* GPT-2's ``Conv1D`` layers: their rule and the generic fallback, summed over the model's
  Conv1D matrices, each / one plain training step of the model (forward, backward, AdamW);
* bytes per recorded step / dense float32 per-sample gradients (B x recorded params x 4);
* the share of weight-matrix parameters recorded (goal: 100%);
* wide weight-shared layers (min(m, n) > 256): the warm-started basis of
  ``SubspaceTracker`` / one training-step backward of that layer, with the basis residual;
* ``reconstruct_subspace`` at k = 100 with ``einsum(optimize=True)`` / without.

Runs with one torch thread (other jobs share the machine); the load average and
``OMP_WAIT_POLICY`` are printed with the figures. Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import trajlab
from trajlab.record.basis import SubspaceTracker
from trajlab.record.rules import GenericRule, rule_for
from trajlab.sketches import reconstruct_subspace, sketch_kind


# ----------------------------------------------------------------------------- workloads
class Transformer(nn.Module):
    """Embedding, two TransformerEncoderLayers (defaults: dim_feedforward 2048, dropout 0.1,
    ReLU, post-norm; batch_first=True), mean pooling, Linear head."""

    def __init__(self, vocab=1000, d=64, heads=4, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.Sequential(*(nn.TransformerEncoderLayer(d, heads, batch_first=True)
                                      for _ in range(2)))
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.layers(self.emb(tokens)).mean(1))


class Conv1dNet(nn.Module):
    def __init__(self, c_in=8, classes=10):
        super().__init__()
        self.c1 = nn.Conv1d(c_in, 32, 5, padding=2)
        self.c2 = nn.Conv1d(32, 64, 5, stride=2, padding=2, padding_mode="reflect")
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean(-1))


class Workload:
    def __init__(self, name, model, X, Y, batch):
        self.name, self.model, self.X, self.Y, self.batch = name, model, X, Y, batch
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01)
        self.gen = torch.Generator().manual_seed(0)

    def steps(self, n, rec=None):
        for _ in range(n):
            idx = torch.randint(0, len(self.X), (self.batch,), generator=self.gen)
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(self.X[idx]), self.Y[idx])
            loss.backward()
            if rec is not None:
                rec.log(loss=loss, indices=idx)
            self.opt.step()

    def batch_tensors(self):
        return self.X[:self.batch], self.Y[:self.batch]


class GPT2Classifier(nn.Module):
    """transformers' GPT2Model (2 blocks x 64 wide, 4 heads, dropout 0.1) from its config
    class, mean pooling, a Linear head: the Conv1D layers of GPT-2 on (batch, 32 tokens)."""

    def __init__(self, vocab=1000, d=64, classes=10):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        self.body = GPT2Model(GPT2Config(n_layer=2, n_embd=d, n_head=4, vocab_size=vocab,
                                         n_positions=64, bos_token_id=0, eos_token_id=0))
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.body(input_ids=tokens).last_hidden_state.mean(1))


def workloads(names=None) -> list[Workload]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    out = []
    if names is None or "transformer" in names:
        out.append(Workload("transformer", Transformer(),
                            torch.randint(0, 1000, (2048, 32), generator=g),
                            torch.randint(0, 10, (2048,), generator=g), batch=32))
    if names is None or "conv1d" in names:
        out.append(Workload("conv1d", Conv1dNet(), torch.randn(2048, 8, 128, generator=g),
                            torch.randint(0, 10, (2048,), generator=g), batch=64))
    if names is None or "gpt2" in names:
        try:
            model = GPT2Classifier()
        except ImportError:
            print("(transformers is not installed: no GPT-2 workload)")
        else:
            w = Workload("gpt2", model, torch.randint(0, 1000, (2048, 32), generator=g),
                         torch.randint(0, 10, (2048,), generator=g), batch=32)
            w.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            out.append(w)
    return out


# ----------------------------------------------------------------------------- helpers
def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3g}x ({min(xs):.3g}..{max(xs):.3g})"


def interleaved(fns: dict, repeats: int, inner: int = 1) -> dict[str, list[float]]:
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


def targets(model: nn.Module):
    """(module name, module, rule, matrix) of every matrix the recorder records."""
    out = []
    claimed = set()
    for name, m in model.named_modules():
        rule = rule_for(m)
        if rule is None or name in claimed or rule.refuse(m):
            continue
        claimed.update(f"{name}.{c}" for c in rule.claims(m))
        out += [(name, m, rule, mx) for mx in rule.matrices(m)]
    return out


def captured(w: Workload):
    """Inputs, keyword inputs and output gradients each recorded module saw in one plain
    forward+backward, through the rules' own hooks."""
    seen: dict[str, list] = {}
    handles = []
    for name, m, rule, _ in targets(w.model):
        if name in seen:
            continue
        seen[name] = []

        def on_forward(args, kwargs, out, name=name, rule=rule):
            seen[name][:] = [args, kwargs]
            rule.grad_output(out).register_hook(lambda g, name=name: seen[name].append(g))

        handles += rule.install(m, on_forward)
    x, y = w.batch_tensors()
    try:
        w.model.zero_grad()
        F.cross_entropy(w.model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    return seen


def capture_fn(w: Workload, *, with_basis: bool, only=None, generic=False):
    """The recorder's per-sample work for one batch: per_sample + sketch capture per matrix."""
    seen = captured(w)
    tracker = SubspaceTracker(4)
    work = []
    for name, m, rule, mx in targets(w.model):
        if only is not None and (name, mx.part) != only:
            continue
        args, kwargs, g = seen[name]
        if generic:
            rule = GenericRule(f"generic:{type(m).__name__}")
            mx = next(x for x in rule.matrices(m) if x.param == mx.param)
            kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_trajlab")}
        desc = rule.describe(m, mx, args, kwargs)
        kind = sketch_kind(desc.sketch)
        W = rule.weight_matrix(m, mx).detach()
        key = f"{name}:{mx.part}"
        basis = tracker.basis(key, W) if kind.name == "subspace" else None
        work.append((m, rule, mx, args, kwargs, g, kind, W, key, basis, desc.rank))

    def run():
        for m, rule, mx, args, kwargs, g, kind, W, key, basis, rank in work:
            if with_basis and basis is not None:
                basis = tracker.basis(key, W)
            ps = rule.per_sample(m, mx, args, kwargs, g)
            ps.capture(kind, basis=None if basis is None else basis[:2], rank=rank,
                       want_per_sample=False)

    return run


def torch_func_fn(w: Workload):
    """Dense per-sample gradients of every recorded weight with vmap(grad(...))."""
    x, y = w.batch_tensors()
    names = {f"{n}.{mx.param}" if n else mx.param for n, _, _, mx in targets(w.model)}
    params = {k: v.detach() for k, v in w.model.named_parameters()}
    wp = {k: v for k, v in params.items() if k in names}
    rest = {k: v for k, v in params.items() if k not in names}

    def loss_one(wp, xi, yi):
        return F.cross_entropy(functional_call(w.model, {**wp, **rest}, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")
    return lambda: per_sample(wp, x, y)


def fwd_bwd_fn(w: Workload):
    x, y = w.batch_tensors()

    def run():
        w.model.zero_grad()
        F.cross_entropy(w.model(x), y).backward()

    return run


# ----------------------------------------------------------------------------- sections
def bench_steps(w: Workload, n: int, repeats: int, tmp: Path) -> dict:
    w.steps(5)
    with trajlab.Recorder(w.model, tmp / f"{w.name}-warm.zarr", optimizer=w.opt,
                          self_check=False) as rec:
        w.steps(3, rec)
    base, rec_t = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        w.steps(n)
        base.append(time.perf_counter() - t0)
        store = tmp / f"{w.name}-{r}.zarr"
        t0 = time.perf_counter()
        with trajlab.Recorder(w.model, store, optimizer=w.opt, self_check=False) as rec:
            w.steps(n, rec)
        rec_t.append(time.perf_counter() - t0)
        if r:
            shutil.rmtree(store)
    return {"base_ms": statistics.median(base) / n * 1e3,
            "ratio": [a / b for a, b in zip(rec_t, base)], "store": tmp / f"{w.name}-0.zarr",
            "summary": rec.summary}


def bench_layers(w: Workload, repeats: int) -> list[tuple]:
    """Per matrix: dedicated rule vs generic fallback (where the fallback applies)."""
    rows = []
    for name, m, rule, mx in targets(w.model):
        label = f"{name}:{mx.part}" if mx.part else name
        fns = {"rule": capture_fn(w, with_basis=False, only=(name, mx.part))}
        why = None
        if mx.param not in [n for n, p in m.named_parameters(recurse=False) if p.dim() == 2]:
            why = "the fallback covers own 2-D parameters only"
        else:
            try:
                fns["generic"] = capture_fn(w, with_basis=False, only=(name, mx.part),
                                            generic=True)
                fns["generic"]()
            except Exception as e:  # noqa: BLE001 - reported in the table
                fns.pop("generic", None)
                why = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
        t = interleaved(fns, repeats)
        ms = statistics.median(t["rule"]) * 1e3
        if "generic" in t:
            rows.append((label, rule.module_type, ms, statistics.median(t["generic"]) * 1e3,
                         [a / b for a, b in zip(t["generic"], t["rule"])], None))
        else:
            rows.append((label, rule.module_type, ms, None, None, why))
    return rows


def bench_conv1d_vs_step(w: Workload, repeats: int) -> list[tuple] | None:
    """GPT-2's Conv1D matrices: the rule's and the generic fallback's per-sample work summed
    over them, and one plain training step of the model, interleaved."""
    conv = [(name, mx) for name, m, rule, mx in targets(w.model)
            if rule.module_type == "Conv1D"]
    if not conv:
        return None
    rules = [capture_fn(w, with_basis=False, only=(n, mx.part)) for n, mx in conv]
    generic = [capture_fn(w, with_basis=False, only=(n, mx.part), generic=True)
               for n, mx in conv]
    # the Linear rule on an nn.Linear holding the same matrix, fed the same inputs and output
    # gradients: what the Conv1D rule should cost
    seen = captured(w)
    modules = dict(w.model.named_modules())
    linear_rule = rule_for(nn.Linear(1, 1))
    tracker = SubspaceTracker(4)
    work = []
    for n, _ in conv:
        m = modules[n]
        lin = nn.Linear(m.nx, m.nf)
        with torch.no_grad():
            lin.weight.copy_(m.weight.T)
        args, kwargs, g = seen[n]
        mx = linear_rule.matrices(lin)[0]
        kind = sketch_kind(linear_rule.describe(lin, mx, args, kwargs).sketch)
        basis = tracker.basis(n, lin.weight.detach()) if kind.name == "subspace" else None
        work.append((lin, mx, args, kwargs, g, kind, basis))

    def linear():
        for lin, mx, args, kwargs, g, kind, basis in work:
            ps = linear_rule.per_sample(lin, mx, args, kwargs, g)
            ps.capture(kind, basis=None if basis is None else basis[:2], rank=0,
                       want_per_sample=False)

    def plain_step():
        w.steps(1)

    t = interleaved({"step": plain_step,
                     "rule": lambda: [f() for f in rules],
                     "linear": linear,
                     "generic": lambda: [f() for f in generic]}, repeats)

    def ratio(a, b):
        return [x / y for x, y in zip(t[a], t[b])]

    med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
    return [(len(conv), med, ratio("rule", "step"), ratio("generic", "step"),
             ratio("generic", "rule"), ratio("rule", "linear"))]


def bench_bytes(w: Workload, res: dict) -> dict:
    run = trajlab.open_run(res["store"])
    n_rec = sum(mx_rule.weight_matrix(m, mx).numel() for _, m, mx_rule, mx in targets(w.model)
                if mx_rule.parameter(m, mx).dim() >= 2)
    summary = res["summary"]
    recorded = sum(e.get("recorded_parameters", 0) for e in summary["modules"])
    return {"stored": run.nbytes_stored() / run.n_steps, "dense": w.batch * n_rec * 4,
            "coverage": recorded / summary["weight_parameters"],
            "weight_parameters": summary["weight_parameters"], "recorded": recorded,
            "diagonal": sum(1 for e in summary["modules"] if "diagonal" in e.get("how", "")),
            "not_recorded": [e["name"] for e in summary["modules"] if not e["recorded"]]}


def bench_wide(shapes, repeats: int) -> list[tuple]:
    """Warm-started top-k basis of a wide Linear over sequences vs its backward in a step."""
    out = []
    B, L = 16, 32
    for n_in, n_out in shapes:
        torch.manual_seed(0)
        layer = nn.Linear(n_in, n_out)
        x = torch.randn(B, L, n_in, requires_grad=True)
        dy = torch.randn(B, L, n_out) / (B * L)
        tracker = SubspaceTracker(4)
        W = layer.weight.detach().clone()
        tracker.basis("w", W)  # the first step: dense SVD
        steps = [W]
        for _ in range(repeats + 2):  # the weights of consecutive SGD steps
            y = layer(x)
            gW, = torch.autograd.grad(y, layer.weight, dy)
            with torch.no_grad():
                layer.weight -= 0.05 * gW
            steps.append(layer.weight.detach().clone())
        it = iter(steps[1:])

        def backward(layer=layer, x=x, dy=dy):
            y = layer(x)
            torch.autograd.grad(y, (x, layer.weight), dy)

        def basis(tracker=tracker, it=it):
            tracker.basis("w", next(it))

        t = interleaved({"backward": backward, "basis": basis}, repeats)
        res = tracker._prev["w"]
        out.append((f"Linear {n_in}->{n_out} (B={B}, L={L})",
                    statistics.median(t["backward"]) * 1e3, statistics.median(t["basis"]) * 1e3,
                    [a / b for a, b in zip(t["basis"], t["backward"])], float(res.residual),
                    res.n_iter))
    return out


def bench_reconstruct(repeats: int, quick: bool) -> tuple[float, float, float]:
    B, m, n, k = (16, 128, 128, 100) if quick else (32, 128, 128, 100)
    g = np.random.default_rng(0)
    U = np.linalg.qr(g.standard_normal((m, k)))[0]
    V = np.linalg.qr(g.standard_normal((n, k)))[0]
    po, pi = g.standard_normal((B, m, k)), g.standard_normal((B, n, k))
    t0 = time.perf_counter()
    for _ in range(repeats):
        fast = reconstruct_subspace(po, pi, U, V)
    t_fast = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    core = np.einsum("mk,bml->bkl", U, po)
    slow = (np.einsum("mk,bnk->bmn", U, pi) + np.einsum("bmk,nk->bmn", po, V)
            - np.einsum("mk,bkl,nl->bmn", U, core, V))  # optimize=False: the old code
    t_slow = time.perf_counter() - t0
    err = float(np.abs(fast - slow).max() / np.abs(slow).max())
    return t_slow, t_fast, err, (B, m, n, k)


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fast smoke run (about a minute)")
    p.add_argument("--workloads", default=None,
                   help="comma-separated subset of transformer,conv1d,gpt2 (default: all)")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*performance drop.*")
    steps, repeats = (3, 3) if args.quick else (10, 7)
    load = os.getloadavg()
    print(f"trajlab {trajlab.__version__}, torch {torch.__version__}, 1 torch thread, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs); "
          f"{steps} steps per timed block, {repeats} interleaved repeats")
    ws = workloads(args.workloads.split(",") if args.workloads else None)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("\nStep time with Recorder(every=1, self_check=False) / without "
              "(median of paired ratios, min..max)")
        res = {}
        for w in ws:
            res[w.name] = r = bench_steps(w, steps, repeats, tmp)
            print(f"  {w.name:12} plain {r['base_ms']:8.2f} ms/step   recorded/plain "
                  f"{spread(r['ratio'])}")

        print("\nPer-sample work for one batch vs torch.func vmap(grad) of the same weights "
              "(median ms; ratio = recorder / torch.func)")
        for w in ws:
            t = interleaved({"fwd+bwd": fwd_bwd_fn(w),
                             "torch.func": torch_func_fn(w),
                             "capture": capture_fn(w, with_basis=False),
                             "capture+basis": capture_fn(w, with_basis=True)},
                            max(3, repeats // 2))
            med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
            r1 = [a / b for a, b in zip(t["capture"], t["torch.func"])]
            r2 = [a / b for a, b in zip(t["capture+basis"], t["torch.func"])]
            print(f"  {w.name:12} fwd+bwd {med['fwd+bwd']:7.1f}  torch.func "
                  f"{med['torch.func']:8.1f}  capture {med['capture']:7.1f} ({spread(r1)})  "
                  f"capture+basis {med['capture+basis']:7.1f} ({spread(r2)})")

        print("\nPer matrix: dedicated rule vs the generic torch.func fallback on the same "
              "layer (per_sample + sketch capture, median ms; ratio = generic / rule)")
        for w in ws:
            for name, kind, ms, gms, ratio, why in bench_layers(w, max(3, repeats // 2)):
                g = (f"generic {gms:8.2f}  {spread(ratio)}" if gms is not None else
                     f"generic  n/a: {why}")
                print(f"  {w.name:12} {name:24} {kind:18} rule {ms:7.2f}   {g}")

        for w in ws:
            rows = bench_conv1d_vs_step(w, max(3, repeats))
            if rows is None:
                continue
            print("\nGPT-2 Conv1D (transformers.pytorch_utils): per-sample work of the rule and "
                  "of the generic torch.func fallback, summed over the model's Conv1D matrices, "
                  "against one plain training step of the whole model (median ms; ratios: "
                  "median of paired ratios, min..max)")
            for n, med, r_step, g_step, g_rule, r_lin in rows:
                print(f"  {w.name:12} {n} Conv1D matrices: plain step {med['step']:7.2f}  "
                      f"Conv1D rule {med['rule']:7.2f} ({spread(r_step)} of a step)  generic "
                      f"{med['generic']:7.2f} ({spread(g_step)} of a step)  generic / rule "
                      f"{spread(g_rule)}\n  {'':12} the Linear rule on nn.Linear copies of "
                      f"the same matrices and inputs {med['linear']:7.2f}: Conv1D rule / Linear "
                      f"rule {spread(r_lin)}")

        print("\nBytes per recorded step and coverage of the weight matrices")
        for w in ws:
            b = bench_bytes(w, res[w.name])
            print(f"  {w.name:12} stored {b['stored'] / 1e3:9.1f} kB/step vs dense float32 "
                  f"per-sample {b['dense'] / 1e3:9.1f} kB: {b['dense'] / b['stored']:6.1f}x "
                  f"smaller; {b['recorded']}/{b['weight_parameters']} weight-matrix "
                  f"parameters recorded ({100 * b['coverage']:.0f}%), {b['diagonal']} "
                  f"normalisation scales recorded; not recorded: {b['not_recorded'] or 'none'}")

    shapes = [(270, 260), (512, 512)] if args.quick else [(270, 260), (512, 512), (1024, 768)]
    print("\nWide weight-shared layers: warm-started top-4 basis (SubspaceTracker) vs one "
          "training-step backward of the layer (median ms; ratio = basis / backward, target "
          "<= 1)")
    for label, bw, bs, ratio, resid, n_iter in bench_wide(shapes, repeats):
        print(f"  {label:34} backward {bw:7.2f}  basis {bs:7.2f}  {spread(ratio)}  "
              f"basis residual {resid:.1e} ({n_iter} iterations)")

    t_slow, t_fast, err, (B, m, n, k) = bench_reconstruct(3 if args.quick else 5, args.quick)
    print(f"\nreconstruct_subspace (per_sample_gradients of a subspace layer) at B={B}, "
          f"{m}x{n}, k={k}: einsum without optimize {t_slow:.3f} s, with optimize=True "
          f"{t_fast:.4f} s ({t_slow / t_fast:.0f}x; max relative difference {err:.1e})")
    load = os.getloadavg()
    print(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
