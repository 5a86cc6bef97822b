"""Faults that lost or hid data (issue 24, items 0-3), each reproduced: these tests failed before
the fix."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from helpers import ConvModel, mlp64, train

import trajlab


def _record_varying_batches(store, batches, *, model=None, mode="w-", seed=0, **kw):
    """A conv model trained on batches of the given sizes, every step recorded."""
    torch.manual_seed(seed)
    model = model if model is not None else ConvModel().double()
    X = torch.randn(64, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    losses = []
    with trajlab.Recorder(model, store, optimizer=opt, loss_fn=F.cross_entropy, mode=mode,
                          **kw) as rec:
        for b in batches:
            idx = torch.randint(0, 64, (b,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            losses.append(loss.item())
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
    return model, X, Y, losses


# --------------------------------------------------------------------------- 0: padding chunks
def test_a_run_whose_padding_fills_whole_sample_chunks_is_readable(tmp_path):
    """Batches 4..24 with 4-step chunks: some sample-axis chunks hold only padding and are
    absent; reading them used to call zarr's sync() inside its own event loop (SyncError)."""
    store = tmp_path / "r.zarr"
    batches = [4, 8, 6, 12, 16, 5, 20, 8, 9, 24]
    *_, losses = _record_varying_batches(store, batches, chunk_steps=4)
    run = trajlab.open_run(store)
    assert run.verify() == []
    np.testing.assert_array_equal(run.root_rows(["batch_size"])["batch_size"], batches)
    # the loss of a float64 model is stored exactly (it was rounded through float32)
    np.testing.assert_array_equal(run.root_rows(["loss"])["loss"], losses)
    ds = trajlab.analyze(store, scheduler="synchronous", progress=False)
    w = run.layer("fc").weight.values
    np.testing.assert_allclose(ds.K.sel(layer="fc").values,
                               np.linalg.svd(w, compute_uv=False)[:, 0], rtol=1e-12)
    ps = trajlab.per_sample_gradients(run, "fc", 8)
    assert ps.grads.shape[0] == 9
    np.testing.assert_allclose(ps.grads.mean(0), run.layer("fc").grad.sel(step=8).values,
                               rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- 1: growth, resume
def test_a_resume_after_a_kill_between_sample_growth_and_commit_keeps_the_new_width(tmp_path):
    """Killed after every per-sample array grew to 5 samples but before the commit marker
    recorded the new capacity: the resumed writer must commit the new width (it committed the
    old one again, and cut every later row's indices and factors to 4 samples)."""
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    store = tmp_path / "r.zarr"
    model = train(mlp64(), X, Y, steps=3, batch_size=4, store=store)
    g = zarr.open_group(store, mode="r+")
    for path in ("indices", "layers/0/ps_input", "layers/0/ps_grad_out",
                 "layers/2/ps_input", "layers/2/ps_grad_out"):
        arr = g[path]
        shape = list(arr.shape)
        shape[1] = 5
        arr.resize(tuple(shape))  # every array grew; the marker still says 4
    assert g.attrs["trajlab_samples"] == 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with trajlab.Recorder(model, store, optimizer=opt, mode="a") as rec:
        for s in range(2):
            idx = torch.arange(5) + 5 * s
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            rec.log(indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
    run = trajlab.open_run(store)
    assert run.n_steps == 5 and run.sample_capacity == 5
    ind = run.root_rows(["indices"])["indices"]
    np.testing.assert_array_equal(ind[3], np.arange(5))
    np.testing.assert_array_equal(ind[4], np.arange(5, 10))
    ps = trajlab.per_sample_gradients(run, "0", 4)
    assert ps.grads.shape == (5, 9, 6)
    np.testing.assert_allclose(ps.grads.mean(0), run.layer("0").grad.sel(step=4).values,
                               rtol=1e-10, atol=1e-14)
    ds = trajlab.analyze(store, scheduler="synchronous", progress=False)
    assert np.isfinite(ds.K.values).all()


# --------------------------------------------------------------------------- 3: dead child
def _train_killing_the_writer_child(store, on_error):
    """Train 40 steps with a writer process whose child is SIGKILLed after step 3."""
    import os
    import signal

    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    done = []
    with trajlab.Recorder(model, store, optimizer=opt, writer="process", queue_size=2,
                          chunk_steps=2, flush_seconds=3600, on_error=on_error) as rec:
        for step in range(40):
            idx = torch.arange(8) + step % 8
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            rec.log(indices=idx)
            opt.step()
            if step == 3:  # once the child has committed the first chunk (steps 0, 1)
                for _ in range(6000):
                    if _committed(store) >= 2:
                        break
                    threading.Event().wait(0.02)
                os.kill(rec._writer._proc.pid, signal.SIGKILL)
            done.append(step)
    return done


def _committed(store) -> int:
    try:
        return int(zarr.open_group(store, mode="r").attrs.get("trajlab_committed", 0))
    except Exception:  # noqa: BLE001 - not laid out yet
        return 0


def _files(store) -> dict:
    """Every file of the store and its modification time, once no write is in flight (a
    writer's temporary ``*.partial`` files come and go while it renames them into place)."""
    for _ in range(6000):
        files = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
        if not any(p.name.endswith(".partial") for p in files):
            return files
        threading.Event().wait(0.02)
    raise AssertionError("a write stayed in flight for 2 minutes")


def _bounded(fn, *args):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it never returns."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=300)
    assert not t.is_alive(), "training hung after the writer process died"
    return out


def test_training_goes_on_when_the_writer_process_dies(tmp_path):
    """The feeder waited forever for a ring slot that only the dead child could free."""
    store = tmp_path / "r.zarr"
    with pytest.warns(RuntimeWarning, match="writer process was killed by SIGKILL"):
        out = _bounded(_train_killing_the_writer_child, store, "stop")
    assert "error" not in out, out.get("error")
    assert out["value"] == list(range(40))  # every training step ran
    run = trajlab.open_run(store)  # the committed rows are kept
    assert run.n_steps >= 2 and run.verify() == []
    assert run.meta.truncated and "writer process was killed" in run.meta.truncated


def test_a_dead_writer_process_raises_with_on_error_raise(tmp_path):
    out = _bounded(_train_killing_the_writer_child, tmp_path / "r.zarr", "raise")
    assert isinstance(out.get("error"), trajlab.RecorderError), out
    assert "writer process was killed" in str(out["error"])


# --------------------------------------------------------------------------- 2: fencing
@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_writer_whose_lock_changed_hands_writes_nothing_more(tmp_path, writer):
    """A writer that looked dead (its lock taken over as stale) must not write over the new
    owner's store: before, an orphaned writer wrote chunks and its old root metadata over a
    new run."""
    from trajlab.store.lock import StoreLock, lock_path

    store = tmp_path / "r.zarr"
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step(rec, i):
        idx = torch.arange(8) + i
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        rec.log(indices=idx)
        opt.step()

    rec = trajlab.Recorder(model, store, optimizer=opt, chunk_steps=2, flush_seconds=3600,
                           writer=writer)
    with pytest.warns(RuntimeWarning, match="changed hands"):
        with rec:
            for i in range(4):
                step(rec, i)
            for _ in range(6000):  # both chunks committed by the writer
                if _committed(store) >= 4:
                    break
                threading.Event().wait(0.02)
            assert _committed(store) == 4
            lock_path(store).unlink()  # taken over as stale by another writer
            other = StoreLock(store, what="recorder")
            other.acquire()
            before = _files(store)
            for i in range(4, 10):
                step(rec, i)
    assert _files(store) == before  # not one file written or replaced after the takeover
    assert lock_path(store).exists()  # the other writer's lock is left alone
    assert other.fence() is not None and other.fence().holds()
    run = trajlab.open_run(store)
    assert run.n_steps == 4 and run.meta.truncated is None
    other.release()


def test_a_lock_in_a_directory_that_cannot_be_written_is_a_clear_error(tmp_path, monkeypatch):
    import errno
    import os

    from trajlab.store.lock import StoreLock

    real = os.open

    def read_only(path, flags, *a, **k):
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(trajlab.StoreError, match="not writable.*r.zarr.lock|r.zarr.lock.*not "
                                                   "writable") as e:
        StoreLock(tmp_path / "r.zarr").acquire()
    assert "Read-only file system" in str(e.value)


# --------------------------------------------------------------------------- 5, 6: metadata
def _small_run(tmp_path):
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    store = tmp_path / "r.zarr"
    train(mlp64(), X, Y, steps=4, batch_size=8, store=store,
          recorder_kwargs={"chunk_steps": 2})
    return store


def _edit_json(path, edit):
    import json

    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _read_everything(store):
    run = trajlab.open_run(store)
    problems = run.verify()
    if problems:
        raise trajlab.StoreCorruptError("; ".join(problems))
    run.root_rows(["indices"])
    trajlab.per_sample_gradients(run, "0", 1)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["attributes"].__setitem__("trajlab_samples", 0), "trajlab_samples"),
    (lambda d: d["attributes"].__setitem__("trajlab_samples", 3), "trajlab_samples"),
    (lambda d: d["attributes"].__setitem__("trajlab_samples", -1), "trajlab_samples"),
    (lambda d: d["attributes"].__setitem__("trajlab_samples", 10**12), "trajlab_samples"),
    (lambda d: d["attributes"]["trajlab"].__setitem__("every", 0), "'every'"),
    (lambda d: d["attributes"]["trajlab"].__setitem__("every", -5), "'every'"),
    (lambda d: d["attributes"]["trajlab"].__setitem__("chunk_steps", 0), "'chunk_steps'"),
    (lambda d: d["attributes"]["trajlab"].__setitem__("dtype", "notatype"), "'dtype'"),
    (lambda d: d["attributes"]["trajlab"]["layers"][1].__setitem__("group", "0"),
     "layers[].group"),
    (lambda d: d["attributes"]["trajlab"]["layers"][0].__setitem__("sketch", "magic"),
     "layers[0].sketch"),
])
def test_edited_run_metadata_is_refused_naming_the_field(tmp_path, edit, field):
    """Before: 0 or 3 samples per row were returned and verify passed, -1 gave a raw error,
    10**12 a MemoryError, every <= 0 "steps not consecutive", a bad dtype a bare TypeError, and
    two layers with one group silently read the same data."""
    store = _small_run(tmp_path)
    _read_everything(store)  # intact before the edit
    _edit_json(store / "zarr.json", edit)
    with pytest.raises(trajlab.StoreCorruptError, match=field.replace("[", r"\[")
                       .replace("]", r"\]")):
        _read_everything(store)


def test_an_array_without_its_checksum_codec_is_refused(tmp_path):
    """Removing the crc32c codec from an array's metadata and flipping a byte was silently
    wrong."""
    store = _small_run(tmp_path)

    def drop_crc(d):
        d["codecs"] = [c for c in d["codecs"] if c["name"] != "crc32c"]

    _edit_json(store / "layers" / "0" / "ps_input" / "zarr.json", drop_crc)
    with pytest.raises(trajlab.StoreCorruptError, match="ps_input.*crc32c"):
        trajlab.per_sample_gradients(trajlab.open_run(store), "0", 1)
    assert any("crc32c" in p for p in trajlab.open_run(store).verify())


# --------------------------------------------------------------------------- 8: leftovers
def test_an_exactly_restored_model_is_not_reported_as_not_restored():
    """The resume check compares the model with stored weight + stored update, which can differ
    from the applied weights by one rounding (4.75e-21 relative warned before)."""
    from trajlab.record.store_policy import continuity

    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        before = rng.standard_normal((64, 32)).astype(dtype)
        after = rng.standard_normal((64, 32)).astype(dtype) * dtype(3)  # a large step
        stored_after = before + (after - before)  # what the reader reconstructs
        assert not np.array_equal(stored_after, after)  # one rounding apart somewhere
        assert continuity("fc", stored_after, torch.from_numpy(after)) is None
        moved = torch.from_numpy(after) * (1 + 1e-4)
        assert "not restored" in continuity("fc", stored_after, moved)


def test_a_stopped_recording_names_the_steps_it_kept(tmp_path, monkeypatch):
    """A full disk noticed at step 21 was reported as "stopped at step 21" while the last
    committed step was 10; the warning now names the committed steps, read from the store."""
    import errno

    from trajlab.store.run_store import RunStoreWriter

    real = RunStoreWriter.append

    def append(self, records):
        if self.committed >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, records)

    monkeypatch.setattr(RunStoreWriter, "append", append)
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    with pytest.warns(RuntimeWarning, match=r"Steps 0 to 3 \(4 recorded\) are committed"):
        train(mlp64(), X, Y, steps=12, store=tmp_path / "r.zarr",
              recorder_kwargs={"chunk_steps": 2, "flush_seconds": 0})
    assert trajlab.open_run(tmp_path / "r.zarr").n_steps == 4


def test_a_complex_model_is_refused_up_front(tmp_path):
    """complex64 models got a misleading SelfCheckError at the first step."""
    model = torch.nn.Linear(4, 3).to(torch.complex64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(trajlab.RecorderError, match="complex parameters are not supported"):
        trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt)
    assert not (tmp_path / "r.zarr").exists()


def test_a_writer_process_starts_while_another_thread_reads_stdin(tmp_path):
    """multiprocessing's start-up closes sys.stdin in the child, which waited forever on the
    stdin buffer's lock when a thread of the training process was reading stdin at the fork:
    the writer never wrote, training blocked on the full queue."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import torch
        torch.set_num_threads(1)
        threading.Thread(target=sys.stdin.readline, daemon=True).start()
        import time; time.sleep(0.2)  # the reader holds the stdin buffer's lock from now on
        from helpers import mlp64, train
        X = torch.randn(64, 6, dtype=torch.float64); Y = torch.randint(0, 4, (64,))
        train(mlp64(), X, Y, steps=30, store={str(tmp_path / "r.zarr")!r},
              recorder_kwargs={{"writer": "process", "queue_size": 2, "chunk_steps": 4}})
        print("done", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # stdin stays open (communicate() would close it and end the reader's wait)
        proc.wait(timeout=240)
        out, err = proc.stdout.read(), proc.stderr.read()
    except subprocess.TimeoutExpired:
        proc.kill()
        for pid in _descendants(proc.pid):
            os.kill(pid, 9)
        proc.communicate()
        raise AssertionError("recording hung: the writer process never started") from None
    finally:
        proc.stdin.close()
    assert proc.returncode == 0 and out.strip() == "done", err[-2000:]
    assert trajlab.open_run(tmp_path / "r.zarr").n_steps == 30


def _descendants(pid: int) -> list[int]:
    from pathlib import Path as P

    out = []
    for task in P(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out + [d for c in out for d in _descendants(c)]


def test_a_parameter_added_to_the_optimizer_mid_run_is_named(tmp_path):
    """A parameter group added mid-run was silently not recorded."""
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4),
                                torch.nn.Tanh(), torch.nn.Linear(4, 4)).double()
    opt = torch.optim.SGD([*model[0].parameters(), *model[2].parameters()], lr=0.05)
    with pytest.warns(RuntimeWarning, match=r"added to the optimizer by step 3 are not "
                      r"recorded: 4\.weight"):
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                              layers=["0", "2"]) as rec:
            for s in range(6):
                if s == 3:
                    opt.add_param_group({"params": list(model[4].parameters())})
                idx = torch.arange(8) + s
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), Y[idx]).backward()
                rec.log(indices=idx)
                opt.step()
    assert trajlab.open_run(tmp_path / "r.zarr").n_steps == 6
