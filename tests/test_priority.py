"""Background threads yield the CPU to the training thread (trajlab.priority)."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import wait_until
from torch import nn

import trajlab
from trajlab.priority import BACKGROUND_NICE, background_thread, spare_cpus

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice")


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


@linux
def test_background_thread_lowers_only_itself_once():
    main = _nice(threading.get_native_id())
    seen = {}

    def work():
        background_thread()
        background_thread()  # not lowered twice
        seen["self"] = _nice(threading.get_native_id())
        inner = threading.Thread(target=lambda: seen.update(child=_nice(
            threading.get_native_id())))
        inner.start()
        inner.join()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["self"] == min(19, main + BACKGROUND_NICE)
    assert seen["child"] == seen["self"]  # inherited by the threads it starts
    assert _nice(threading.get_native_id()) == main  # the caller's thread is untouched


def test_spare_cpus_keeps_one_for_training(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert spare_cpus() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert spare_cpus() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert spare_cpus() == 2 and spare_cpus(cap=8) == 8


@linux
def test_writer_and_encoders_run_below_training(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    X, Y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    main = _nice(threading.get_native_id())
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, chunk_steps=2) as rec:
        for step in range(4):
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            opt.step()
        writer = rec._writer._thread
        store = rec._writer.writer
        # the writer thread starts the encoders at its first whole chunk
        wait_until(lambda: getattr(store, "_executor", None) is not None
                   and store._executor._threads, "the writer starts its encoder threads")
        pool = store._executor
        assert _nice(writer.native_id) == min(19, main + BACKGROUND_NICE)
        assert all(_nice(t.native_id) == min(19, main + BACKGROUND_NICE)
                   for t in pool._threads)
    assert _nice(threading.get_native_id()) == main
