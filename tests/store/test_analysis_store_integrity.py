"""Analysis stores held to the run store's standard (issue 24, item 4).

A deleted chunk or a flipped byte is an error that names the array and the chunk (never NaN,
never zarr's bare checksum message), nothing damaged is exported, ``trajlab info --verify``
checks analysis stores, and re-running ``analyze`` with the same ``out`` recomputes exactly
the missing or damaged chunks.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import mlp64, train

import trajlab
from trajlab.cli import main
from trajlab.errors import StoreCorruptError

CHUNK = 4  # analysis rows per chunk; 12 steps -> step chunks 0, 1, 2


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A run of 12 steps and its finished analysis (3 step chunks), never modified."""
    root = tmp_path_factory.mktemp("integrity")
    X = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2))
    run = root / "run.zarr"
    train(mlp64(), X, Y, steps=12, store=run, recorder_kwargs={"chunk_steps": 4})
    out = root / "analysis.zarr"
    ds = trajlab.analyze(run, out=out, chunk_rows=CHUNK, scheduler="synchronous",
                         progress=False)
    return run, out, ds.compute()


@pytest.fixture
def copy(pristine, tmp_path):
    """A private copy of the finished analysis (the run is shared, read only)."""
    run, out, ref = pristine
    dst = tmp_path / "analysis.zarr"
    shutil.copytree(out, dst)
    return run, dst, ref


def _flip(path: Path, offset: int = 20) -> None:
    data = bytearray(path.read_bytes())
    data[min(offset, len(data) - 5)] ^= 0x10
    path.write_bytes(bytes(data))


def _analyze_again(run, out):
    return trajlab.analyze(run, out=out, chunk_rows=CHUNK, scheduler="synchronous",
                           progress=False)


# ----------------------------------------------------------------------------- reading
def test_a_deleted_chunk_is_an_error_naming_the_array_and_chunk(copy):
    run, out, _ = copy
    (out / "K" / "c" / "1" / "0").unlink()
    ds = trajlab.open_analysis(out)
    with pytest.raises(StoreCorruptError, match=r"'K'.*chunk 1/0"):
        ds.K.values
    # the other arrays and the other chunks of K still read
    assert np.isfinite(ds.K.isel(step=slice(0, CHUNK)).values).all()
    assert np.isfinite(ds.drift.values).all()


def test_a_flipped_byte_is_an_error_naming_the_array_and_chunk(copy):
    run, out, _ = copy
    _flip(out / "drift" / "c" / "2" / "0")
    ds = trajlab.open_analysis(out)
    with pytest.raises(StoreCorruptError, match=r"'drift'.*chunk 2/0") as e:
        ds.drift.values
    assert "trajlab analyze" in str(e.value)  # the fix: recompute it


def test_a_damaged_coordinate_fails_at_opening_with_its_name(copy):
    run, out, _ = copy
    _flip(out / "time" / "c" / "0")
    with pytest.raises(StoreCorruptError, match=r"'time'.*chunk 0"):
        trajlab.open_analysis(out)


def test_tensorboard_does_not_export_a_damaged_analysis(copy, tmp_path):
    pytest.importorskip("tensorboard")
    from trajlab.export import to_tensorboard

    run, out, _ = copy
    (out / "K_pred_mean" / "c" / "0" / "0").unlink()
    logdir = tmp_path / "tb"
    with pytest.raises(StoreCorruptError, match=r"'K_pred_mean'.*chunk 0/0"):
        to_tensorboard(out, logdir)
    assert not logdir.exists() or not any(logdir.rglob("*.trajlab"))
    assert main(["export", str(out), "--tensorboard", str(logdir)]) == 2


# ----------------------------------------------------------------------------- verify
def test_info_verify_checks_an_analysis_store(copy, capsys):
    run, out, _ = copy
    assert main(["info", str(out), "--verify", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "analysis store" in text and "integrity   ok" in text
    (out / "K" / "c" / "2" / "0").unlink()
    _flip(out / "drift_noise" / "c" / "0" / "0")
    assert main(["info", str(out), "--verify", "--quiet"]) == 2
    cap = capsys.readouterr()
    assert "'K'" in cap.out and "chunk 2/0" in cap.out
    assert "'drift_noise'" in cap.out and "chunk 0/0" in cap.out
    assert "damaged" in cap.err


def test_info_without_verify_describes_an_analysis_store(copy, capsys):
    run, out, _ = copy
    assert main(["info", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "12 steps" in text and "3 of 3 chunks" in text and "complete" in text


# ----------------------------------------------------------------------------- resume
def test_rerun_recomputes_missing_and_damaged_chunks(copy):
    run, out, ref = copy
    (out / "K" / "c" / "1" / "0").unlink()                 # a layer variable, deleted
    _flip(out / "logK_drift" / "c" / "2")                   # a network variable, flipped
    (out / "K_pred_mean" / "c" / "0" / "0").unlink()       # a series-wide integral, deleted
    _flip(out / "_done" / "c" / "0", offset=0)             # a done-marker, flipped
    with pytest.warns(UserWarning, match=r"recomputing.*'K'.*chunk 1/0"):
        ds = _analyze_again(run, out)
    got = ds.compute()
    for k in ("K", "logK_drift", "K_pred_mean", "drift", "time"):
        np.testing.assert_allclose(got[k].values, ref[k].values, rtol=1e-12, equal_nan=True,
                                   err_msg=k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: a second rerun finds nothing to redo
        _analyze_again(run, out).compute()


def test_rerun_of_an_intact_store_rewrites_nothing(copy):
    run, out, ref = copy
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = _analyze_again(run, out)
    np.testing.assert_allclose(ds.K.values, ref.K.values, rtol=1e-12)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files


def test_rerun_repairs_the_step_coordinate(copy):
    run, out, ref = copy
    _flip(out / "step" / "c" / "1")
    with pytest.warns(UserWarning, match=r"'step'"):
        ds = _analyze_again(run, out)
    np.testing.assert_array_equal(ds.step.values, ref.step.values)


@pytest.mark.parametrize("array", ["drift", "_done"])
def test_a_missing_array_is_refused_with_the_fix(copy, array):
    run, out, _ = copy
    shutil.rmtree(out / array)
    with pytest.raises(StoreCorruptError, match=rf"'{array}'.*overwrite"):
        _analyze_again(run, out)
    ds = trajlab.analyze(run, out=out, chunk_rows=CHUNK, scheduler="synchronous",
                         progress=False, overwrite=True)
    assert np.isfinite(ds.drift.values).all()
