"""Subprocess used by the crash tests: records (or analyses) and may be SIGKILLed any time.

    python crash_worker.py record STORE STEPS [--resume]
    python crash_worker.py analyze RUN OUT
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import trajlab


def model_and_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 6, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 4, (256,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 4)).double()
    return model, X, Y


def record(store: str, steps: int, resume: bool, *, chunk_steps: int = 4) -> None:
    model, X, Y = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    start = 0
    if resume:
        start = trajlab.open_run(store).n_steps  # every=1: next step index
    rec = None
    for step in range(steps):
        if step == start:
            rec = trajlab.Recorder(model, store, optimizer=opt, mode="a" if resume else "w-",
                                   flush_seconds=0.0, chunk_steps=chunk_steps)
            rec.__enter__()
        idx = torch.randint(0, len(X), (8,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        loss.backward()
        if rec is not None:
            rec.log(loss=loss, indices=idx)
        opt.step()
        if step == start:
            print("recording", flush=True)
    if rec is not None:
        rec.__exit__(None, None, None)
    print("done", flush=True)


def analyze(run: str, out: str) -> None:
    print("analysing", flush=True)
    trajlab.analyze(run, out=out, scheduler="synchronous", chunk_rows=3, progress=False)
    print("done", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "record":
        record(sys.argv[2], int(sys.argv[3]), "--resume" in sys.argv)
    else:
        analyze(sys.argv[2], sys.argv[3])
