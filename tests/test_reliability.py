"""Reliability: crashes, resume, storage faults, locks and a catalogue of bad input."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
import zarr.storage
from helpers import held_worker, mlp64, train, wait_until

import trajlab
from trajlab.store.lock import StoreLockedError

sys.path.insert(0, str(Path(__file__).parent))
import crash_worker

STEPS = 40  # recorded steps of a crash run (chunk_steps=4)
CHUNKS = 14  # analysis chunks of a crash run's analysis (chunk_rows=3)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("ref") / "run.zarr"
    crash_worker.record(str(store), STEPS, resume=False)
    return trajlab.open_run(store)


def _assert_rows_equal(run, ref, n):
    assert run.steps.tolist() == list(range(n))
    if n == 0:
        return
    for name in ref.layers:
        a, b = run.layer(name).compute(), ref.layer(name).isel(step=slice(0, n)).compute()
        for v in a.data_vars:
            if v == "update_stored":  # a run's last row stores its update; a resumed one not
                continue
            np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=f"{name}/{v}")
    for v in ("lr", "loss", "indices", "batch_size"):
        np.testing.assert_array_equal(run.root[v].values, ref.root[v].values[:n])


def _committed_rows_after_a_kill(store: str, ref) -> int | None:
    """What a kill may leave: no store at all (killed before the writer laid it out: None), or
    a store that opens, verifies, and holds 0 or more committed rows equal to the uninterrupted
    run's (their number). Never a store that cannot be opened or read."""
    try:
        run = trajlab.open_run(store)
    except FileNotFoundError:
        return None
    n = run.n_steps
    _assert_rows_equal(run, ref, n)
    assert run.verify() == []
    return n


def _crash_trial(tmp_path, reference_run, hold_at: int, committed: int = 0, *,
                 name: str = "crash") -> int | None:
    """Kill a recording held after training step ``hold_at`` once ``committed`` rows are
    committed; check what is left, resume and compare the whole run."""
    store = str(tmp_path / f"{name}.zarr")
    with held_worker("record", store, str(STEPS), hold_at=hold_at):
        wait_until(lambda: crash_worker.committed_steps(store) >= committed,
                   f"{committed} committed rows")
    n = _committed_rows_after_a_kill(store, reference_run)
    assert committed <= (n or 0) <= hold_at + 1
    # The lock of the killed process is stale; a resumed run (here, in this process) takes it
    # over and appends (or records from the start where there was no store).
    crash_worker.record(store, STEPS, resume=True)
    _assert_rows_equal(trajlab.open_run(store), reference_run, STEPS)
    return n


def test_sigkill_before_the_store_exists_leaves_no_store_and_resumes(tmp_path, reference_run):
    """Killed after entering the Recorder, before the first step: no store (the writer lays it
    out at the first step), and a resume records the whole run."""
    assert _crash_trial(tmp_path, reference_run, hold_at=-1) is None
    assert not (tmp_path / "crash.zarr.lock").exists()


@pytest.mark.parametrize("hold_at,committed", [(0, 0), (13, 6)],
                         ids=["while-laid-out", "mid-run"])
def test_sigkill_while_recording_keeps_committed_steps(tmp_path, reference_run, hold_at,
                                                       committed):
    _crash_trial(tmp_path, reference_run, hold_at, committed)


@pytest.mark.slow
def test_sigkill_while_recording_many_trials(tmp_path, reference_run):
    """24 kills at drawn points: after a drawn step, with no wait (the writer anywhere behind
    the training) or once the rows up to the step before are committed."""
    rng = random.Random(100)
    committed = []
    for trial in range(24):
        hold_at = rng.randrange(-1, STEPS - 1)
        wait_for = max(hold_at, 0) if trial % 2 else 0
        committed.append(_crash_trial(tmp_path, reference_run, hold_at, wait_for,
                                      name=f"trial{trial}"))
    assert len(set(committed)) > 3  # the kills left stores of different lengths


def _analysis_crash_trial(tmp_path, reference_run, hold_at: int):
    """Kill an analysis held before writing chunk ``hold_at``; a rerun equals an uninterrupted
    analysis."""
    out = str(tmp_path / f"an{hold_at}.zarr")
    full = trajlab.analyze(reference_run, scheduler="synchronous", chunk_rows=3, progress=False)
    with held_worker("analyze", str(reference_run.store), out, hold_at=hold_at):
        pass
    resumed = trajlab.analyze(reference_run, out=out, scheduler="synchronous", chunk_rows=3,
                              progress=False)
    for k in full.data_vars:
        np.testing.assert_array_equal(resumed[k].values, full[k].values, err_msg=k)


@pytest.mark.parametrize("hold_at", [0, 5])
def test_sigkill_while_analysing_then_rerun_equals_uninterrupted(tmp_path, reference_run,
                                                                 hold_at):
    _analysis_crash_trial(tmp_path, reference_run, hold_at)


@pytest.mark.slow
def test_sigkill_while_analysing_many_trials(tmp_path, reference_run):
    for hold_at in range(-1, CHUNKS):
        _analysis_crash_trial(tmp_path, reference_run, hold_at)


# --------------------------------------------------------------------------- storage faults
class DiskFullStore(zarr.storage.WrapperStore):
    """A LocalStore whose chunk writes start failing with ENOSPC once ``fail`` is set."""

    fail = False

    async def set(self, key, value):
        if DiskFullStore.fail and not key.endswith("zarr.json"):
            raise OSError(28, "No space left on device")
        return await self._store.set(key, value)


@pytest.mark.parametrize("on_error", ["stop", "raise"])
def test_storage_failure_keeps_training_and_committed_steps(tmp_path, on_error):
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    ref = tmp_path / "ref.zarr"
    train(mlp64(), X, Y, steps=20, store=ref, recorder_kwargs={"chunk_steps": 4})
    DiskFullStore.fail = False
    store = DiskFullStore(zarr.storage.LocalStore(tmp_path / "full.zarr"))
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    raised = None
    with pytest.warns(RuntimeWarning, match="No space left") if on_error == "stop" else \
            _nullcontext():
        rec = trajlab.Recorder(model, store, optimizer=opt, chunk_steps=4, flush_seconds=0.0,
                               on_error=on_error)
        with rec:
            for step in range(20):
                if step == 9:  # let the writer commit what it has (no fixed sleep: loaded CI)
                    wait_until(lambda: crash_worker.committed_steps(tmp_path / "full.zarr")
                               >= 1, "a committed row before the disk fills")
                    DiskFullStore.fail = True
                idx = torch.randint(0, len(X), (8,), generator=g)
                opt.zero_grad()
                loss = F.cross_entropy(model(X[idx]), Y[idx])
                loss.backward()
                rec.log(loss=loss, indices=idx)
                try:
                    opt.step()
                except trajlab.RecorderError as e:
                    raised = e
                    opt.step()  # the user's training goes on after handling it
                if step == 10:  # the writer meets the full disk before training goes on
                    wait_until(lambda: rec._writer is None or rec._writer.error is not None,
                               "the writer meets the full disk")
    DiskFullStore.fail = False
    if on_error == "raise":
        assert raised is not None and "No space left" in str(raised)
    plain = train(mlp64(), X, Y, steps=20)
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)  # training unaffected
    run = trajlab.open_run(tmp_path / "full.zarr")
    assert 1 <= run.n_steps <= 12
    assert "No space left" in (run.meta.truncated or "")
    _assert_rows_equal(run, trajlab.open_run(ref), run.n_steps)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# --------------------------------------------------------------------------- locks
def test_second_recorder_on_same_store_is_refused(tmp_path):
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = tmp_path / "r.zarr"
    with pytest.warns(RuntimeWarning, match="no step was recorded"):
        with trajlab.Recorder(model, store, optimizer=opt):
            other = mlp64()
            with pytest.raises(StoreLockedError, match="another recorder"):
                trajlab.Recorder(other, store, optimizer=torch.optim.SGD(other.parameters(),
                                                                         lr=0.1),
                                 mode="a").__enter__()
    assert not Path(str(store) + ".lock").exists()


def test_stale_lock_is_taken_over(tmp_path):
    store = tmp_path / "r.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket

    Path(str(store) + ".lock").write_text(json.dumps({"pid": int(dead),
                                                      "host": socket.gethostname()}))
    X = torch.randn(16, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (16,))
    with pytest.warns(UserWarning, match="stale"):
        train(mlp64(), X, Y, steps=2, store=store)
    assert trajlab.open_run(store).n_steps == 2


def test_analysing_while_recording_reads_committed_steps(tmp_path):
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    store = tmp_path / "r.zarr"
    with trajlab.Recorder(model, store, optimizer=opt, flush_seconds=0.0, chunk_steps=4) as rec:
        for step in range(12):
            idx = torch.arange(8) + step
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            rec.log(indices=idx)
            opt.step()
        wait_until(lambda: crash_worker.committed_steps(store) >= 6, "6 committed rows")
        run = trajlab.open_run(store)  # a snapshot: the committed rows at this moment
        n = run.n_steps
        ds = trajlab.analyze(run, scheduler="synchronous", progress=False)
        assert ds.sizes["step"] == n >= 6
        assert np.isfinite(ds.K.values).all()


# --------------------------------------------------------------------------- bad input
def test_bad_input_catalogue(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run store"):
        trajlab.open_run(tmp_path / "nope.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(trajlab.StoreError, match="not a trajlab run store"):
        trajlab.open_run(tmp_path / "plain.zarr")
    X = torch.randn(32, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (32,))
    store = tmp_path / "r.zarr"
    train(mlp64(), X, Y, steps=3, store=store)
    g = zarr.open_group(store, mode="r+")
    meta = dict(g.attrs["trajlab"])
    meta["format_version"] = 99
    g.attrs["trajlab"] = meta
    with pytest.raises(trajlab.StoreError, match="newer than this trajlab reads"):
        trajlab.open_run(store)


def test_zero_step_run_writes_nothing_and_says_so(tmp_path):
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="no step was recorded"):
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt):
            pass
    with pytest.raises(FileNotFoundError):
        trajlab.open_run(tmp_path / "r.zarr")


def test_batch_size_one_and_lr_zero(tmp_path):
    X = torch.randn(32, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (32,))
    train(mlp64(), X, Y, steps=3, batch_size=1, store=tmp_path / "b1.zarr")
    with pytest.raises(ValueError, match="batch size >= 2"):
        trajlab.analyze(tmp_path / "b1.zarr", scheduler="synchronous", progress=False)
    train(mlp64(), X, Y, steps=3, batch_size=8, lr=0.0, store=tmp_path / "lr0.zarr")
    ds = trajlab.analyze(tmp_path / "lr0.zarr", scheduler="synchronous", progress=False)
    assert (ds.diffusion2 == 0).all() and (ds.drift_noise == 0).all()
    assert np.isfinite(ds.drift_flow).all()
    np.testing.assert_allclose(ds.K_pathwise, ds.K)  # nothing moves


def test_mixed_batch_sizes_leave_noise_undefined_only_where_b_is_one(tmp_path):
    X = torch.randn(33, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (33,))
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt) as rec:
        for idx in (torch.arange(0, 16), torch.arange(16, 32), torch.arange(32, 33)):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            rec.log(indices=idx)
            opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.root.batch_size.values.tolist() == [16, 16, 1]
    assert (run.root.indices.values[2, 1:] == -1).all()
    ds = trajlab.analyze(run, scheduler="synchronous", progress=False)
    assert np.isfinite(ds.diffusion2.isel(step=slice(0, 2))).all()
    assert np.isnan(ds.diffusion2.isel(step=2)).all()
    assert np.isfinite(ds.K.isel(step=2)).all()


def test_forward_that_changes_shape_is_a_clear_error(tmp_path):
    def run(store, **kw):
        model = mlp64()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with trajlab.Recorder(model, store, optimizer=opt, **kw) as rec:
            for x in (torch.randn(4, 6, dtype=torch.float64),
                      torch.randn(4, 3, 6, dtype=torch.float64)):
                opt.zero_grad()
                model(x).mean().backward()
                rec.log()
                opt.step()

    with pytest.raises(trajlab.RecorderError, match="must not change"):
        run(tmp_path / "a.zarr", on_error="raise")
    with pytest.warns(RuntimeWarning, match="must not change.*training continues"):
        run(tmp_path / "b.zarr")  # default: recording stops, training goes on
    kept = trajlab.open_run(tmp_path / "b.zarr")
    assert kept.n_steps == 1 and "must not change" in kept.meta.truncated


def test_no_pickle_or_torch_load_of_stored_content():
    root = Path(trajlab.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for bad in ("import pickle", "torch.load(", "allow_pickle=True", "np.load("):
            assert bad not in text, f"{path}: {bad}"
