"""Subprocess of the kill matrix (tests/store/test_kill_matrix.py): records a run whose batch sizes
vary (so the sample axis grows), and dies at a chosen point of the store writer.

    python kill_worker.py STORE STEPS WRITER [--resume]

``TRAJLAB_KILL=point:nth:who`` kills at the nth time the writer reaches ``point``:

* ``create`` – right after the group document is written, before any array exists;
* ``chunk`` – right after a chunk write (a chunk file, or a Zarr write in older formats);
* ``resize`` – half-way through resizing the arrays along ``step``;
* ``grow`` – half-way through growing the sample axis;
* ``commit_before`` / ``commit_after`` – just before / after the commit marker is written;
* ``close`` – after the final trim, before the recorder returns.

``who`` is ``self`` (the process that reaches the point: the training process with the thread
writer, the writer child with the process writer) or ``parent`` (the writer child kills the
training process and carries on; the kernel then stops the child).
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.nn.functional as F

import trajlab
from trajlab.store import run_store as rs

BATCHES = (4, 6, 5, 9, 7, 12, 8, 3, 16, 10, 11, 6, 20, 5, 13, 9)


def _install_kill(spec: str) -> None:
    point, nth, who = spec.split(":")
    seen = {"n": 0}

    def reached() -> None:
        seen["n"] += 1
        if seen["n"] == int(nth):
            if who == "parent":
                os.kill(os.getppid(), signal.SIGKILL)
                return
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "create":
        orig_create = rs.create_group

        def create_group(*a, **k):
            out = orig_create(*a, **k)
            reached()
            return out

        rs.create_group = create_group
    elif point == "chunk":
        orig_many, orig_whole = rs.write_many, rs.RunStoreWriter._write_chunk_file

        def write_many(items):
            orig_many(items)
            reached()

        def write_whole(self, *a):
            out = orig_whole(self, *a)
            reached()
            return out

        rs.write_many = write_many
        rs.RunStoreWriter._write_chunk_file = write_whole  # every chunk file (format 3)
    elif point in ("resize", "grow"):
        orig_resize, orig_grow = rs.resize_many, rs.RunStoreWriter._grow_samples
        if point == "resize":
            # arrays are created with MIN_CAPACITY rows: one chunk of them here, so that the
            # 24-step run grows its arrays while recording (the kill lands mid-growth)
            rs.MIN_CAPACITY = 4
        state = {"growing": False}

        def resize_many(items):
            items = list(items)
            if (point == "grow") != state["growing"] or len(items) < 2:
                return orig_resize(items)
            orig_resize(items[: len(items) // 2])
            reached()
            orig_resize(items[len(items) // 2:])

        def grow(self, n):
            state["growing"] = True
            try:
                return orig_grow(self, n)
            finally:
                state["growing"] = False

        rs.resize_many = resize_many
        rs.RunStoreWriter._grow_samples = grow
    elif point in ("commit_before", "commit_after"):
        orig_append = rs.RunStoreWriter.append

        class Attrs:
            def __init__(self, attrs):
                self._attrs = attrs

            def update(self, d):
                if point == "commit_before":
                    reached()
                self._attrs.update(d)
                if point == "commit_after":
                    reached()

            def __getattr__(self, name):
                return getattr(self._attrs, name)

        class Group:
            def __init__(self, group):
                self._group = group
                self.attrs = Attrs(group.attrs)

            def __getattr__(self, name):
                return getattr(self._group, name)

            def __getitem__(self, key):
                return self._group[key]

        def append(self, records):
            real = self.group
            self.group = Group(real)
            try:
                return orig_append(self, records)
            finally:
                self.group = real

        rs.RunStoreWriter.append = append
    elif point == "close":
        orig_finalize = rs.RunStoreWriter.finalize

        def finalize(self):
            orig_finalize(self)
            reached()

        rs.RunStoreWriter.finalize = finalize
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def record(store: str, steps: int, writer: str, resume: bool) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 6, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 4, (256,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 4)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = trajlab.open_run(store).n_steps if resume else 0
    rec = None
    for step in range(steps):
        if step == start:
            rec = trajlab.Recorder(model, store, optimizer=opt, mode="a" if resume else "w-",
                                   flush_seconds=0.0, chunk_steps=4, writer=writer)
            rec.__enter__()
        b = BATCHES[step % len(BATCHES)]
        idx = (torch.arange(b) * 7 + step * 13) % len(X)
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        loss.backward()
        if rec is not None:
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
        opt.step()
    if rec is not None:
        rec.__exit__(None, None, None)
    print("done", flush=True)


if __name__ == "__main__":
    if os.environ.get("TRAJLAB_KILL"):
        _install_kill(os.environ["TRAJLAB_KILL"])
    record(sys.argv[1], int(sys.argv[2]), sys.argv[3], "--resume" in sys.argv)
