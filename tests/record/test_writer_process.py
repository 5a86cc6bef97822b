"""The writer process: same store as the writer thread, crash safety, errors and flags."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr.storage
from helpers import held_worker, wait_until
from test_writer import _assert_same_store, _record, use_writer

import trajlab
from trajlab.record.process_writer import ProcessWriter, make_writer, record_bytes
from trajlab.record.writer import BackgroundWriter, PendingRecord
from trajlab.store.run_store import RunStoreWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import crash_worker  # noqa: E402

STEPS = 40  # recorded steps of a crash run


@pytest.fixture
def process_writer(monkeypatch):
    """Recorders of this test write through a writer process."""

    def use(**kw):
        use_writer(monkeypatch, functools.partial(ProcessWriter, **kw))

    use()
    return use


@pytest.mark.parametrize("kw", [{}, {"optimizer": "adamw", "every": 2, "edit_at": 4},
                                {"per_sample_dtype": "float16", "flush_seconds": 0.0}],
                         ids=["sgd", "adamw-every2-edited", "float16-flush-every-row"])
def test_process_writes_the_thread_store_bit_for_bit(tmp_path, monkeypatch, kw):
    kw = {"flush_seconds": 3600.0, **kw}
    _record(tmp_path / "thread.zarr", **kw)
    use_writer(monkeypatch, ProcessWriter)
    _record(tmp_path / "process.zarr", **kw)
    _assert_same_store(tmp_path / "thread.zarr", tmp_path / "process.zarr")


def test_records_larger_than_a_slot_go_through_the_pipe(tmp_path, process_writer):
    _record(tmp_path / "thread.zarr", flush_seconds=3600.0, steps=5)
    process_writer(slot_bytes=256)  # every record is larger
    _record(tmp_path / "process.zarr", flush_seconds=3600.0, steps=5)
    _assert_same_store(tmp_path / "thread.zarr", tmp_path / "process.zarr")


def test_nonfinite_flags_come_back_from_the_process(tmp_path, process_writer):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    X = torch.randn(4, 6)

    def train():
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, self_check=False):
            for s in range(3):
                opt.zero_grad()
                x = X.clone()
                if s == 1:
                    x[0, 0] = float("nan")
                F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
                opt.step()

    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        train()
    assert trajlab.open_run(tmp_path / "r.zarr").layer("0").nonfinite.values.tolist() == [
        False, True, True]


def test_storage_failure_in_the_process_stops_recording_not_training(tmp_path, monkeypatch,
                                                                     process_writer):
    original = RunStoreWriter.append

    def failing(self, records):  # inherited by the forked child
        if self.committed >= 4:
            raise OSError(28, "No space left on device")
        return original(self, records)

    monkeypatch.setattr(RunStoreWriter, "append", failing)
    with pytest.warns(RuntimeWarning, match="No space left"):
        trained = _record(tmp_path / "r.zarr", steps=12, chunk_steps=2, flush_seconds=0.0)
    monkeypatch.undo()
    plain = _record(tmp_path / "plain.zarr", steps=12, flush_seconds=0.0)
    for a, b in zip(plain.parameters(), trained.parameters()):
        assert torch.equal(a, b)  # training unaffected
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.n_steps == 4 and "No space left" in (run.meta.truncated or "")
    ref = trajlab.open_run(tmp_path / "plain.zarr")
    for name in ref.layers:
        np.testing.assert_array_equal(run.layer(name).weight.values,
                                      ref.layer(name).weight.values[:4])


class _Event:
    """Stands for the CUDA event after non-blocking copies into pinned buffers."""

    def __init__(self):
        self.synchronized = False

    def synchronize(self):
        self.synchronized = True


def test_device_copies_are_awaited_before_the_slot_is_written(tmp_path, monkeypatch):
    seen = []
    original = ProcessWriter._start

    def start(self, first):
        seen.append(first.events[0].synchronized)  # the event was awaited before the first copy
        return original(self, first)

    monkeypatch.setattr(ProcessWriter, "_start", start)
    w = RunStoreWriter(tmp_path / "r.zarr")
    pw = ProcessWriter(w, flush_seconds=3600.0)
    rec = PendingRecord({"x": torch.arange(3)}, {"l": {"y": torch.ones(2, 2)}}, [_Event()])
    assert record_bytes(rec) == 128
    pw.put(rec)
    pw.close()  # no store was created: the child had nothing to write
    assert seen == [True] and pw.error is not None  # a row without a store is an error


def test_make_writer_falls_back_to_the_thread_for_non_path_stores(tmp_path):
    mem = RunStoreWriter(zarr.storage.MemoryStore())
    assert isinstance(make_writer("process", mem), BackgroundWriter)
    local = RunStoreWriter(tmp_path / "r.zarr")
    w = make_writer("process", local)
    try:
        assert isinstance(w, ProcessWriter)
    finally:
        w.close()
    with pytest.raises(ValueError, match="thread"):
        make_writer("fiber", local)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "children").read_text().split()
        except OSError:  # the thread ended since the listing
            continue
        out += [int(c) for c in text]
    return out


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted crash-worker run (the thread writer: the process writer writes the
    same bits, test_process_writes_the_thread_store_bit_for_bit)."""
    store = tmp_path_factory.mktemp("ref") / "run.zarr"
    crash_worker.record(str(store), STEPS, resume=False)
    return trajlab.open_run(store)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("hold_at,committed", [(0, 0), (13, 6)],
                         ids=["while-laid-out", "mid-run"])
def test_sigkill_with_a_writer_process_keeps_committed_steps(tmp_path, reference_run, hold_at,
                                                            committed):
    """The training process is killed while held after step ``hold_at`` (once ``committed``
    rows are in): its writer process exits by itself, the committed rows are intact, and a
    resume finishes the run."""
    store = str(tmp_path / "crash.zarr")
    with held_worker("record", store, str(STEPS), "--writer", "process",
                     hold_at=hold_at) as proc:
        # the writer process starts with the first record (from the recorder's feeder thread)
        wait_until(lambda: _children(proc.pid), "the worker records through a writer process")
        children = _children(proc.pid)
        wait_until(lambda: crash_worker.committed_steps(store) >= committed,
                   f"{committed} committed rows")
    wait_until(lambda: not any(_alive(c) for c in children),
               "the writer process exits once the training process is gone")
    try:
        run = trajlab.open_run(store)
    except FileNotFoundError:  # killed before the writer laid the store out
        n = 0
    else:
        n = run.n_steps
        _assert_rows_equal(run, reference_run, n)
        assert run.verify() == []
    assert committed <= n <= hold_at + 1
    # resume after the crash (the stale lock is taken over) and finish the run
    crash_worker.record(store, STEPS, resume=True, writer="process")
    _assert_rows_equal(trajlab.open_run(store), reference_run, STEPS)


def _assert_rows_equal(run, ref, n):
    assert run.steps.tolist() == list(range(n))
    for name in ref.layers:
        a = run.layer(name).compute()
        b = ref.layer(name).isel(step=slice(0, n)).compute()
        for v in a.data_vars:
            if v != "update_stored":  # a run's last row stores its update; a resumed one not
                np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=f"{name}/{v}")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


def test_no_orphan_after_close(tmp_path, process_writer):
    before = set(_children(os.getpid()))
    _record(tmp_path / "r.zarr", steps=3)
    assert set(_children(os.getpid())) <= before
