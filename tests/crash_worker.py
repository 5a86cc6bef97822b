"""Subprocess used by the crash tests: records (or analyses) and is SIGKILLed by the test.

    python crash_worker.py record STORE STEPS [--resume] [--hold-at K] [--writer process]
    python crash_worker.py analyze RUN OUT [--hold-at K]

``--hold-at K`` stops the worker at a point given by its progress, not by the clock: the record
worker after training step K (K = -1: after entering the Recorder, before the first step, so
that no store exists yet), the analyse worker before writing its chunk K (K = -1: before the
analysis starts). It prints ``held K`` and waits there until its stdin closes (the test kills it
first); meanwhile the background writer goes on with what it has, so the kill still lands at a
moment of the writer that no one chose. Without ``--hold-at`` the worker runs to the end.
"""

from __future__ import annotations

import os
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


def hold(at: int) -> None:
    """Tell the test where the worker is, then wait to be killed (stdin closes if the test dies
    first: the worker then exits instead of waiting forever)."""
    print(f"held {at}", flush=True)
    sys.stdin.readline()
    os._exit(3)


def committed_steps(store: str) -> int:
    """Rows committed in ``store``; 0 when a kill came before the store existed."""
    try:
        return trajlab.open_run(store).n_steps
    except FileNotFoundError:
        return 0


def record(store: str, steps: int, resume: bool, *, chunk_steps: int = 4,
           hold_at: int | None = None, writer: str = "thread") -> None:
    model, X, Y = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    start = committed_steps(store) if resume else 0  # every=1: next step index
    rec = None
    for step in range(steps):
        if step == start:
            rec = trajlab.Recorder(model, store, optimizer=opt, mode="a" if resume else "w-",
                                   flush_seconds=0.0, chunk_steps=chunk_steps, writer=writer)
            rec.__enter__()
            if hold_at == -1:
                hold(-1)
        idx = torch.randint(0, len(X), (8,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        loss.backward()
        if rec is not None:
            rec.log(loss=loss, indices=idx)
        opt.step()
        if step == start:
            print("recording", flush=True)
        if step == hold_at:
            hold(step)
    if rec is not None:
        rec.__exit__(None, None, None)
    print("done", flush=True)


def analyze(run: str, out: str, *, hold_at: int | None = None) -> None:
    print("analysing", flush=True)
    if hold_at == -1:
        hold(-1)
    if hold_at is not None:
        from trajlab.store.analysis_store import AnalysisStore

        write_chunk, written = AnalysisStore.write_chunk, []

        def counted(self, *args, **kwargs):  # the synchronous scheduler: one chunk at a time
            if len(written) == hold_at:
                hold(hold_at)
            write_chunk(self, *args, **kwargs)
            written.append(1)

        AnalysisStore.write_chunk = counted
    trajlab.analyze(run, out=out, scheduler="synchronous", chunk_rows=3, progress=False)
    print("done", flush=True)


def main(argv: list[str]) -> None:
    hold_at = int(argv[argv.index("--hold-at") + 1]) if "--hold-at" in argv else None
    if argv[0] == "record":
        writer = argv[argv.index("--writer") + 1] if "--writer" in argv else "thread"
        record(argv[1], int(argv[2]), "--resume" in argv, hold_at=hold_at, writer=writer)
    else:
        analyze(argv[1], argv[2], hold_at=hold_at)


if __name__ == "__main__":
    main(sys.argv[1:])
