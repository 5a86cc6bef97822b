"""Bytes per recorded step of the paper ConvNet, per layer and per variable, with the default
sketches and with ``rank1_basis`` for its Linear layers (issue 26 item 1).

Usage: ``python benchmarks/sketch_bytes.py [--quick] [--steps N] [--batch B] [--min-saving F]
[--dir DIR]``.

Records :func:`trajlab.models.cifar_convnet` on CIFAR-shaped random data (the workload of
``record_overhead.py --models cifar``) for ``--steps`` recorded steps at every=1 twice: with the
default rules (Linear layers: ``rank1`` factors) and with
:class:`~trajlab.record.rules.linear_basis.LinearBasisRule` (``rank1_basis`` where it saves at
least ``--min-saving`` times, chosen per layer from its shape). Prints, per layer and variable,
the stored (compressed, default codecs) and logical bytes per recorded step, and the totals. The
sizes do not depend on the machine or its load; the data are random, so compression is what
random-like floats give. Not a test.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import zarr
from torch import nn

import trajlab
from trajlab.models import cifar_convnet
from trajlab.record.rules import LinearRule, register_rule
from trajlab.record.rules.linear_basis import LinearBasisRule


def record(store: Path, steps: int, batch: int) -> trajlab.Run:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4 * batch, 3, 32, 32, generator=g)
    Y = torch.randint(0, 10, (4 * batch,), generator=g)
    model = cifar_convnet(10, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with trajlab.Recorder(model, store, optimizer=opt) as rec:  # self_check: no rank1 grad
        for _ in range(steps):
            idx = torch.randperm(len(X), generator=g)[:batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx)
            opt.step()
    return trajlab.open_run(store)


def breakdown(store: Path, steps: int) -> dict[str, dict[str, tuple[float, float]]]:
    """{group: {variable: (stored, logical) bytes per step}}; ``_root`` for root arrays."""
    root = zarr.open_group(str(store), mode="r")
    out: dict[str, dict[str, tuple[float, float]]] = {"_root": {}}
    for name, a in root.arrays():
        out["_root"][name] = (a.nbytes_stored() / steps, a.nbytes / a.shape[0] * 1.0
                              if a.shape else 0.0)
    for gname, grp in root["layers"].groups():
        out[gname] = {}
        for name, a in grp.arrays():
            rows = a.shape[0] if a.shape else 1
            out[gname][name] = (a.nbytes_stored() / steps, a.nbytes / max(rows, 1))
    return out


def show(label: str, run: trajlab.Run, parts: dict) -> float:
    total = sum(s for g in parts.values() for s, _ in g.values())
    logical = sum(v for g in parts.values() for _, v in g.values())
    print(f"\n{label}: {total / 1e6:.3f} MB stored per recorded step "
          f"({logical / 1e6:.3f} MB logical); format {run.meta.format_version}")
    sketch = {lm.group: f"{lm.sketch} {lm.shape[0]}x{lm.shape[1]}" for lm in run.meta.layers}
    for g, vs in parts.items():
        gs = sum(s for s, _ in vs.values())
        print(f"  {g:10s} {sketch.get(g, ''):24s} {gs / 1e6:8.3f} MB  " + ", ".join(
            f"{k} {s / 1e3:.1f}k" for k, (s, _) in sorted(vs.items(), key=lambda kv: -kv[1][0])
            if s >= 1e3))
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 recorded steps (one chunk)")
    ap.add_argument("--steps", type=int, default=None,
                    help="recorded steps (default 32: whole chunks for both layouts)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--min-saving", type=float, default=2.0)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps = a.steps if a.steps is not None else (16 if a.quick else 32)
    with tempfile.TemporaryDirectory(prefix="sketch_bytes_") as scratch:
        run_both(Path(a.dir or scratch), steps, a.batch, a.min_saving)


def run_both(tmp: Path, steps: int, batch: int, min_saving: float) -> None:
    totals = {}
    try:
        for label, rule in (("default (rank1 Linear)", LinearRule()),
                            (f"rank1_basis Linear (min_saving={min_saving:g})",
                             LinearBasisRule(min_saving=min_saving))):
            register_rule(nn.Linear, rule, overwrite=True)
            store = tmp / f"{len(totals)}.zarr"
            run = record(store, steps, batch)
            totals[label] = show(label, run, breakdown(store, run.n_steps))
    finally:
        register_rule(nn.Linear, LinearRule(), overwrite=True)
    (d, b) = totals.values()
    print(f"\nB={batch}: {d / 1e6:.3f} -> {b / 1e6:.3f} MB per recorded step ({d / b:.2f}x)")


if __name__ == "__main__":
    main()
