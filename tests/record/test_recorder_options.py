"""RecorderOptions: frozen, self-validating, grouped; Recorder(**options) stays compatible."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp64

import trajlab
from trajlab.record import disk_space
from trajlab.record.options import GROUPS, RecorderOptions


def _opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


def test_defaults_are_the_recorders_documented_defaults():
    o = RecorderOptions()
    assert (o.every, o.rank, o.per_sample, o.mode, o.sampler, o.on_error, o.compression,
            o.writer, o.queue_size, o.flush_seconds, o.self_check, o.store_grad) == (
        1, 2, True, "w-", "unknown", "stop", "fast", "thread", 8, 5.0, True, False)
    assert o.steps is None and o.layers is None and o.metadata is None


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RecorderOptions().every = 3


def test_groups_cover_every_field_once_in_field_order():
    names = [n for group in GROUPS.values() for n in group]
    assert names == [f.name for f in dataclasses.fields(RecorderOptions)]
    assert RecorderOptions(every=4).group("selection")["every"] == 4


def test_keywords_and_an_options_object_give_the_same_recorder(tmp_path):
    m = mlp64()
    a = trajlab.Recorder(m, tmp_path / "a.zarr", optimizer=_opt(m), every=3, per_sample=False,
                         steps=30)
    b = trajlab.Recorder(m, tmp_path / "b.zarr", optimizer=_opt(m),
                         options=RecorderOptions(every=3, per_sample=False, steps=30))
    assert a.options == b.options
    assert a.every == 3 and a.options.steps == 30


def test_keywords_beside_an_options_object_replace_its_fields(tmp_path):
    m = mlp64()
    base = RecorderOptions(every=3, compression="small")
    rec = trajlab.Recorder(m, tmp_path / "a.zarr", optimizer=_opt(m), options=base, every=5)
    assert (rec.options.every, rec.options.compression) == (5, "small")
    assert base.every == 3  # the caller's object is unchanged


@pytest.mark.parametrize("kw, exc, words", [
    ({"evry": 2}, TypeError, ["unknown option 'evry'", "did you mean 'every'",
                              "selection: every"]),
    ({"steps": 0}, ValueError, ["steps must be >= 1, got 0"]),
    ({"steps": 2.5}, TypeError, ["steps must be an integer"]),
    ({"queue_size": 0}, ValueError, ["queue_size must be >= 1"]),
    ({"compression": "zip"}, ValueError, ["compression must be 'fast' or 'small'"]),
    ({"writer": "gpu"}, ValueError, ["writer must be 'thread' or 'process'"]),
    ({"start_step": -1}, ValueError, ["start_step must be >= 0"]),
    ({"dataset_size": 0}, ValueError, ["dataset_size must be >= 1"]),
    ({"loss_fn": 3}, TypeError, ["loss_fn must be callable"]),
    ({"metadata": [1, 2]}, TypeError, ["metadata must be a dict"]),
])
def test_bad_options_name_the_option_and_the_fix(tmp_path, kw, exc, words):
    m = mlp64()
    for make in (lambda: RecorderOptions.build(**kw),
                 lambda: trajlab.Recorder(m, tmp_path / "x.zarr", optimizer=_opt(m), **kw)):
        with pytest.raises(exc) as e:
            make()
        for w in words:
            assert w in str(e.value)
    assert not (tmp_path / "x.zarr").exists()


def test_options_must_be_an_options_object(tmp_path):
    m = mlp64()
    with pytest.raises(TypeError, match="options must be a trajlab.RecorderOptions"):
        trajlab.Recorder(m, tmp_path / "x.zarr", optimizer=_opt(m), options={"every": 2})


def test_an_options_object_records_like_keywords(tmp_path):
    """The same run through keywords and through RecorderOptions stores the same rows."""
    X, Y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    stores = []
    for name, how in (("kw", {"every": 2, "compression": "small"}),
                      ("obj", {"options": RecorderOptions(every=2, compression="small")})):
        torch.manual_seed(0)
        m = mlp64()
        opt = _opt(m)
        with trajlab.Recorder(m, tmp_path / f"{name}.zarr", optimizer=opt, **how) as rec:
            for s in range(4):
                idx = torch.arange(4 * s, 4 * s + 4)
                opt.zero_grad()
                loss = F.cross_entropy(m(X[idx]), Y[idx])
                loss.backward()
                rec.log(loss=loss, indices=idx)
                opt.step()
        stores.append(trajlab.open_run(tmp_path / f"{name}.zarr"))
    a, b = stores
    assert a.steps.tolist() == b.steps.tolist() == [0, 2]
    for layer in a.layers:
        assert torch.equal(torch.as_tensor(a.layer_rows(layer, ["weight"])["weight"]),
                           torch.as_tensor(b.layer_rows(layer, ["weight"])["weight"]))


def test_every_option_is_in_the_docs_table():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "recorder.md").read_text()
    for f in dataclasses.fields(RecorderOptions):
        assert f"| `{f.name}` |" in doc, f"docs/recorder.md's options table lacks {f.name}"


# --------------------------------------------------------------------------- disk space
def _rows_by_hand(step, steps, every):
    return sum(1 for k in range(step + 1, steps) if k % every == 0)


@pytest.mark.parametrize("step, steps, every", [(0, 100, 1), (0, 100, 7), (13, 1000, 3),
                                                (99, 100, 1), (50, 40, 2), (8, 30_000, 10)])
def test_remaining_rows_against_counting(step, steps, every):
    assert disk_space.remaining_rows(step, steps, every) == _rows_by_hand(step, steps, every)


@pytest.mark.parametrize("bpr, pending, step, steps, every, free", [
    (1000.0, 0, 0, 1000, 1, 10**7), (1000.0, 0, 0, 1000, 1, 300_000),
    (3.8e6, 2, 10, 30_000, 1, 20 * 10**9), (500.0, 3, 0, 100, 2, 2_000),
    (500.0, 3, 0, 100, 2, 1_000), (1e6, 0, 0, 10, 1, 10),
])
def test_shortfall_against_brute_force(bpr, pending, step, steps, every, free):
    s = disk_space.shortfall(bytes_per_row=bpr, pending_rows=pending, step=step, steps=steps,
                             every=every, free=free)
    rows = pending + _rows_by_hand(step, steps, every)
    if rows * bpr <= free:
        assert s is None
        return
    assert s is not None and s.rows == rows and s.needed == rows * bpr and s.free == free
    left = free - pending * bpr
    fits = [e for e in range(every + 1, steps - step)
            if _rows_by_hand(step, steps, e) * bpr <= left]
    assert s.every_that_fits == (min(fits) if fits and left > 0 else None)


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


def _record(store, *, steps_run=4, **kw):
    X, Y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    m = mlp64()
    opt = _opt(m)
    with trajlab.Recorder(m, store, optimizer=opt, flush_seconds=0, **kw) as rec:
        for s in range(steps_run):
            idx = torch.arange(4 * s, 4 * s + 4)
            opt.zero_grad()
            loss = F.cross_entropy(m(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx)
            opt.step()


def _disk_warnings(record):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        record()
    return [str(w.message) for w in got if "will not fit its disk" in str(w.message)]


def test_warns_once_when_the_run_will_not_fit(tmp_path, monkeypatch):
    seen = []

    def usage(path):
        seen.append(Path(path))
        return _Usage(10**9, 10**9 - 50_000, 50_000)

    monkeypatch.setattr(disk_space.shutil, "disk_usage", usage)
    got = _disk_warnings(lambda: _record(tmp_path / "r.zarr", steps=10_000))
    assert len(got) == 1, got
    msg = got[0]
    assert "steps=10000 at every=1" in msg and "50.0 kB free" in msg
    every = int(re.search(r"every=(\d+) would fit", msg).group(1))
    per_row = disk_space.stored_bytes(tmp_path / "r.zarr") / 4  # the run's own rows, after it
    expected = 9_999 * per_row / 50_000  # steps after the first at the run's bytes per row
    assert 0.5 * expected <= every <= 2 * expected + 2, (every, expected)
    assert seen and all(tmp_path in p.parents or p == tmp_path for p in seen)


def test_no_warning_when_the_run_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_space.shutil, "disk_usage",
                        lambda path: _Usage(10**13, 0, 10**13))
    assert _disk_warnings(lambda: _record(tmp_path / "r.zarr", steps=10_000)) == []


def test_no_disk_check_without_steps_or_for_url_targets(tmp_path, monkeypatch):
    def usage(path):
        raise AssertionError("disk_usage called")

    monkeypatch.setattr(disk_space.shutil, "disk_usage", usage)
    assert _disk_warnings(lambda: _record(tmp_path / "r.zarr")) == []
    for url in ("s3://bucket/run.zarr", "memory://run.zarr", "gcs://b/r.zarr"):
        check = disk_space.DiskSpaceCheck(url, steps=100, every=1)
        assert check.done and check.check(step=0, rows_put=1) is None
    assert not disk_space.DiskSpaceCheck(tmp_path / "x.zarr", steps=100, every=1).done
    assert disk_space.DiskSpaceCheck(tmp_path / "x.zarr", steps=None, every=1).done


def test_lightning_callback_knows_the_runs_steps():
    """What the Lightning callback passes as ``steps``: max_steps, else the Trainer's estimate
    when finite, else nothing (the disk check is then off)."""
    from trajlab.integrations.lightning import _max_steps

    class Estimating:
        max_steps = -1

        def __init__(self, est):
            self.est = est

        @property
        def estimated_stepping_batches(self):
            if isinstance(self.est, Exception):
                raise self.est
            return self.est

    assert _max_steps(SimpleNamespace(max_steps=500, estimated_stepping_batches=7)) == 500
    assert _max_steps(Estimating(120)) == 120
    assert _max_steps(Estimating(float("inf"))) is None
    assert _max_steps(Estimating(RuntimeError("no length"))) is None


def test_options_read_as_recorder_attributes(tmp_path):
    """Code written before RecorderOptions reads options as attributes (``rec.loss_fn``)."""
    m = mlp64()
    rec = trajlab.Recorder(m, tmp_path / "a.zarr", optimizer=_opt(m), per_sample=False,
                           loss_fn=F.cross_entropy, every=3)
    assert rec.loss_fn is F.cross_entropy and rec.per_sample is False and rec.every == 3
    with pytest.raises(AttributeError, match="no attribute 'evry'"):
        rec.evry  # noqa: B018


def test_layer_state_is_typed(tmp_path):
    """Per-layer state is a slotted dataclass: every field declared, nothing set from outside."""
    from trajlab.record.layer_state import LayerState

    m = mlp64()
    rec = trajlab.Recorder(m, tmp_path / "a.zarr", optimizer=_opt(m))
    layer = rec._layers[0]
    assert isinstance(layer, LayerState) and layer.assembled is None
    with pytest.raises(AttributeError):
        layer.undeclared = 1
