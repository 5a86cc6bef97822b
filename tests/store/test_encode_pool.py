"""The writer's encoding pool: standby threads encode only while the producer waits."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DEADLINE, wait_until
from torch import nn

import trajlab
import trajlab.store.run_store as run_store_module
from trajlab.record.process_writer import ProcessWriter
from trajlab.record.writer import BackgroundWriter
from trajlab.store.encode_pool import EncodePool
from trajlab.store.run_store import RunStoreWriter

WAIT = DEADLINE  # seconds: bounds on waits that end at once (only a failing test waits)


def test_tasks_results_and_errors_through_futures():
    pool = EncodePool(2, 1)
    futs = [pool.submit(pow, i, 2) for i in range(20)]
    bad = pool.submit(divmod, 1, 0)
    assert [f.result(WAIT) for f in futs] == [i * i for i in range(20)]
    with pytest.raises(ZeroDivisionError):
        bad.result(WAIT)
    pool.shutdown()
    pool.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(pow, 2, 2)


def test_shutdown_runs_every_submitted_task():
    pool = EncodePool(1, 1)
    gate = threading.Event()
    first = pool.submit(gate.wait, WAIT)
    rest = [pool.submit(pow, i, 3) for i in range(5)]
    gate.set()
    pool.shutdown()
    assert first.result(0) is True
    assert [f.result(0) for f in rest] == [i ** 3 for i in range(5)]


def test_standby_threads_take_tasks_only_while_assisting():
    pool = EncodePool(1, 1)
    gate, started = threading.Event(), threading.Event()
    names = []

    def block():
        names.append(threading.current_thread().name)
        gate.wait(WAIT)

    def second():
        names.append(threading.current_thread().name)
        started.set()

    busy = pool.submit(block)  # occupies the only regular thread
    waiting = pool.submit(second)
    # not assisting: the standby thread must leave the task queued behind the busy worker
    assert not started.wait(0.3)
    assert not waiting.running() and not waiting.done()
    pool.assist(True)
    assert started.wait(WAIT), "the standby thread did not take the queued task"
    assert "standby" in names[1] and "worker" in names[0]
    assert not busy.done()  # it ran beside the blocked regular worker
    pool.assist(False)
    gate.set()
    pool.shutdown()


def test_standby_threads_follow_an_assist_source():
    """The writer process's signal: a flag set elsewhere, polled while tasks wait."""
    flag = [False]
    pool = EncodePool(1, 1, assist_source=lambda: flag[0])
    gate, started = threading.Event(), threading.Event()
    busy = pool.submit(gate.wait, WAIT)
    pool.submit(started.set)
    assert not started.wait(0.3)
    assert not pool.assisting
    flag[0] = True  # no assist() call: the standby thread notices by itself
    assert started.wait(WAIT)
    assert pool.assisting and not busy.done()
    gate.set()
    pool.shutdown()


def test_process_writer_raises_its_flag_while_behind(tmp_path):
    pw = ProcessWriter(RunStoreWriter(tmp_path / "s.zarr"), queue_size=4)
    try:
        assert pw._behind_flag.value == 0
        pw._set_behind(True)
        assert pw._behind_flag.value == 1
        pw._set_behind(False)
        assert pw._behind_flag.value == 0
    finally:
        pw.close()
    assert pw.error is None


class _SlowStore:
    """A RunStoreWriter stand-in whose create() blocks until released."""

    def __init__(self):
        self.meta = None
        self.committed = 0
        self.derives_updates = True
        self.release, self.entered = threading.Event(), threading.Event()
        self.assists: list[bool] = []

    def create(self, meta, *, sample_capacity):
        self.entered.set()
        self.release.wait(WAIT)

    def assist(self, on):
        self.assists.append(on)

    def finalize(self):
        pass


def test_producer_asks_for_help_while_the_writer_is_behind():
    """Behind = three quarters of the queue waiting (or put() blocked on the full queue);
    caught up again at the first put that finds less."""
    store = _SlowStore()
    bw = BackgroundWriter(store, queue_size=4, flush_seconds=60)
    bw.create(None, 1)  # taken by the writer thread, which blocks in create()
    assert store.entered.wait(WAIT)
    bw.create(None, 1)
    bw.create(None, 1)  # 2 of 4 queued
    assert store.assists == []
    bw.create(None, 1)  # 3 of 4: behind
    assert store.assists == [True]
    bw.create(None, 1)  # full
    done = threading.Event()

    def blocked():
        bw.create(None, 1)  # waits on the full queue
        done.set()

    t = threading.Thread(target=blocked)
    t.start()
    assert not done.wait(0.2)
    assert store.assists == [True]  # still behind, no churn
    store.release.set()
    assert done.wait(WAIT)
    t.join(WAIT)
    wait_until(lambda: bw._queue.qsize() == 0, "the writer takes every queued item")
    bw.create(None, 1)  # the writer caught up
    assert store.assists == [True, False]
    bw.close()
    assert bw.error is None


def _record(path, steps=264):  # one whole 256-row chunk (small arrays) and a tail
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    with trajlab.Recorder(model, path, optimizer=opt, flush_seconds=60) as rec:
        for s in range(steps):
            idx = torch.arange(8 * (s % 8), 8 * (s % 8) + 8)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx)
            opt.step()
    return trajlab.open_run(path)


def test_a_store_encoded_with_standby_threads_is_bit_identical(tmp_path, monkeypatch):
    ref = _record(tmp_path / "ref.zarr")
    used = []

    class OnlyStandby(EncodePool):
        """Every task runs on a standby thread (three of them, always assisting)."""

        def __init__(self, regular, standby, **kw):
            super().__init__(regular, standby + 2, **kw)
            super().assist(True)

        def assist(self, on):  # the producer's signal is ignored
            pass

        def _loop(self, standby):
            if standby:
                return super()._loop(standby)
            with self._cv:  # the regular thread idles
                while not self._closed:
                    self._cv.wait()

    write = run_store_module.RunStoreWriter._encode_chunk  # the pool's task (format 3)

    def spy(self, *args):
        used.append(threading.current_thread().name)
        return write(self, *args)

    monkeypatch.setattr(run_store_module, "EncodePool", OnlyStandby)
    monkeypatch.setattr(run_store_module.RunStoreWriter, "_encode_chunk", spy)
    got = _record(tmp_path / "got.zarr")
    assert used and all("standby" in n for n in used), used
    for name in ref.layers:
        a, b = ref.layer(name).compute(), got.layer(name).compute()
        for var in a.data_vars:
            x, y = np.asarray(a[var].values), np.asarray(b[var].values)
            assert x.tobytes() == y.tobytes(), (name, var)
