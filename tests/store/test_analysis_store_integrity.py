"""Analysis stores held to the run store's standard (issue 24, items 4 and 5).

A deleted chunk, a flipped byte or (analysis format 3) a chunk file swapped with another or
copied in from another array is an error that names the array and the chunk (never NaN,
never zarr's bare checksum message, never wrong values), nothing damaged is exported,
``trajlab info --verify`` checks analysis stores (and says what a format-2 store cannot be
checked for), and re-running ``analyze`` with the same ``out`` recomputes exactly the missing,
damaged or swapped chunks.
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
    _, out, _ = copy
    (out / "K" / "c" / "1" / "0").unlink()
    ds = trajlab.open_analysis(out)
    with pytest.raises(StoreCorruptError, match=r"'K'.*chunk 1/0"):
        _ = ds.K.values
    # the other arrays and the other chunks of K still read
    assert np.isfinite(ds.K.isel(step=slice(0, CHUNK)).values).all()
    assert np.isfinite(ds.drift.values).all()


def test_a_flipped_byte_is_an_error_naming_the_array_and_chunk(copy):
    _, out, _ = copy
    _flip(out / "drift" / "c" / "2" / "0")
    ds = trajlab.open_analysis(out)
    with pytest.raises(StoreCorruptError, match=r"'drift'.*chunk 2/0") as e:
        _ = ds.drift.values
    assert "trajlab analyze" in str(e.value)  # the fix: recompute it


def test_a_damaged_coordinate_fails_at_opening_with_its_name(copy):
    _, out, _ = copy
    _flip(out / "time" / "c" / "0")
    with pytest.raises(StoreCorruptError, match=r"'time'.*chunk 0"):
        trajlab.open_analysis(out)


def test_tensorboard_does_not_export_a_damaged_analysis(copy, tmp_path):
    pytest.importorskip("tensorboard")
    from trajlab.export import to_tensorboard

    _, out, _ = copy
    (out / "K_pred_mean" / "c" / "0" / "0").unlink()
    logdir = tmp_path / "tb"
    with pytest.raises(StoreCorruptError, match=r"'K_pred_mean'.*chunk 0/0"):
        to_tensorboard(out, logdir)
    assert not logdir.exists() or not any(logdir.rglob("*.trajlab"))
    assert main(["export", str(out), "--tensorboard", str(logdir)]) == 2


# ----------------------------------------------------------------------------- verify
def test_info_verify_checks_an_analysis_store(copy, capsys):
    _, out, _ = copy
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
    _, out, _ = copy
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


# ----------------------------------------------------------------------------- positions
def _swap(a: Path, b: Path) -> None:
    """Exchange the contents of two chunk files (each stays intact: its CRC32C passes)."""
    da, db = a.read_bytes(), b.read_bytes()
    assert da != db
    a.write_bytes(db)
    b.write_bytes(da)


def test_swapped_chunk_files_are_an_error_naming_the_array_and_chunk(copy):
    _, out, ref = copy
    _swap(out / "K" / "c" / "0" / "0", out / "K" / "c" / "2" / "0")
    ds = trajlab.open_analysis(out)
    with pytest.raises(StoreCorruptError, match=r"'K'.*chunk 0/0.*swapped") as e:
        _ = ds.K.isel(step=slice(0, CHUNK)).values
    assert "trajlab analyze" in str(e.value)  # the fix: recompute it
    with pytest.raises(StoreCorruptError, match=r"'K'.*chunk 2/0"):
        _ = ds.K.isel(step=slice(2 * CHUNK, 3 * CHUNK)).values
    np.testing.assert_array_equal(ds.K.isel(step=slice(CHUNK, 2 * CHUNK)).values,
                                  ref.K.isel(step=slice(CHUNK, 2 * CHUNK)).values)
    np.testing.assert_array_equal(ds.drift.values, ref.drift.values)


def test_swapped_network_and_coordinate_chunks_are_errors(copy):
    _, out, _ = copy
    _swap(out / "logK_drift" / "c" / "0", out / "logK_drift" / "c" / "1")
    ds = trajlab.open_analysis(out)
    with pytest.raises(StoreCorruptError, match=r"'logK_drift'.*chunk [01]"):
        _ = ds.logK_drift.values
    _swap(out / "time" / "c" / "0", out / "time" / "c" / "2")
    with pytest.raises(StoreCorruptError, match=r"'time'.*chunk [02]"):
        trajlab.open_analysis(out)


def test_a_chunk_copied_from_another_array_is_an_error(copy):
    _, out, _ = copy
    src = out / "drift_noise" / "c" / "1" / "0"
    dst = out / "drift" / "c" / "1" / "0"
    assert src.read_bytes() != dst.read_bytes()  # (equal bytes would be interchangeable)
    dst.write_bytes(src.read_bytes())  # same shape and dtype: the CRC passes
    with pytest.raises(StoreCorruptError, match=r"'drift'.*chunk 1/0"):
        _ = trajlab.open_analysis(out).drift.values


def test_info_verify_names_every_swapped_chunk(copy, capsys):
    _, out, _ = copy
    _swap(out / "K" / "c" / "0" / "0", out / "K" / "c" / "2" / "0")
    assert main(["info", str(out), "--verify", "--quiet"]) == 2
    cap = capsys.readouterr()
    assert "'K'" in cap.out and "chunk 0/0" in cap.out and "chunk 2/0" in cap.out
    assert "not checked" not in cap.out  # the current format checks positions


def test_swapped_manifest_rows_are_an_error(copy, capsys):
    _, out, _ = copy
    _swap(out / "trajlab_chunks" / "c" / "0" / "0" / "0" / "0",
          out / "trajlab_chunks" / "c" / "1" / "0" / "0" / "0")
    with pytest.raises(StoreCorruptError, match=r"'step' cannot be checked.*trajlab_chunks.*"
                       r"swapped"):  # the coordinate, read at opening
        trajlab.open_analysis(out)
    assert main(["info", str(out), "--verify", "--quiet"]) == 2
    text = capsys.readouterr().out
    assert "2 missing or damaged" in text  # each bad row named once, not per array
    assert "step chunk 0 cannot be checked" in text and "step chunk 1 cannot" in text


def _repaired(run, out, ref, match):
    with pytest.warns(UserWarning, match=match):
        ds = _analyze_again(run, out)
    got = ds.compute()
    for k in ("K", "logK_drift", "K_pred_mean", "drift", "time", "step"):
        np.testing.assert_allclose(got[k].values, ref[k].values, rtol=1e-12, equal_nan=True,
                                   err_msg=k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: a second rerun finds nothing to redo
        _analyze_again(run, out).compute()
    assert main(["info", str(out), "--verify", "--quiet"]) == 0


def test_rerun_recomputes_swapped_chunks(copy):
    run, out, ref = copy
    _swap(out / "K" / "c" / "0" / "0", out / "K" / "c" / "2" / "0")
    _swap(out / "logK_drift" / "c" / "0", out / "logK_drift" / "c" / "1")
    _repaired(run, out, ref, r"recomputing.*'K'.*chunk 0/0.*'K'.*chunk 2/0")


def test_rerun_repairs_bad_manifest_rows(copy):
    run, out, ref = copy
    _swap(out / "trajlab_chunks" / "c" / "1" / "0" / "0" / "0",
          out / "trajlab_chunks" / "c" / "2" / "0" / "0" / "0")
    _flip(out / "trajlab_chunks" / "c" / "0" / "0" / "0" / "0")  # every row now bad
    _repaired(run, out, ref, r"recomputing.*trajlab_chunks")


def test_a_deleted_manifest_is_refused_with_the_fix(copy):
    run, out, _ = copy
    shutil.rmtree(out / "trajlab_chunks")
    with pytest.raises(StoreCorruptError, match=r"trajlab_chunks"):
        trajlab.open_analysis(out)
    with pytest.raises(StoreCorruptError, match=r"trajlab_chunks.*overwrite"):
        _analyze_again(run, out)


def test_a_kill_between_a_chunks_data_and_its_manifest_row_leaves_it_uncommitted(
        pristine, tmp_path, monkeypatch):
    from trajlab.analysis.pipeline import INTEGRATED
    from trajlab.store.analysis_store import AnalysisStore

    run, _, ref = pristine
    out = tmp_path / "killed.zarr"
    real = AnalysisStore._bind

    def killed(self, arrays, chunks):
        if any(list(c) == [1] for c in chunks.values()):  # step chunk 1's data is written
            raise KeyboardInterrupt("killed before the manifest row")
        real(self, arrays, chunks)

    monkeypatch.setattr(AnalysisStore, "_bind", killed)
    with pytest.raises(KeyboardInterrupt):
        _analyze_again(run, out)
    monkeypatch.undo()
    store = AnalysisStore.open(out)
    assert not store.meta.complete and not store.done()[1]  # not committed
    assert store.verify(integrals=INTEGRATED) == []  # nothing committed is unbound
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary resume: nothing damaged
        got = _analyze_again(run, out).compute()
    for k in ("K", "logK_drift", "K_pred_mean"):
        np.testing.assert_allclose(got[k].values, ref[k].values, rtol=1e-12, equal_nan=True,
                                   err_msg=k)
    assert AnalysisStore.open(out).verify(integrals=INTEGRATED) == []


# ----------------------------------------------------------------------------- format 2
DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def golden_v2(tmp_path):
    dst = tmp_path / "golden_analysis.zarr"
    shutil.copytree(DATA / "golden_v2_analysis.zarr", dst)
    return dst


def test_a_format_2_analysis_still_reads(golden_v2):
    from trajlab.store.analysis_store import AnalysisStore

    assert AnalysisStore.open(golden_v2).meta.format_version == 2
    ds = trajlab.open_analysis(golden_v2)
    assert np.isfinite(ds.K.values).all()


def test_a_swap_in_a_format_2_analysis_is_reported_as_not_checkable(golden_v2, capsys):
    from trajlab.analysis.pipeline import INTEGRATED
    from trajlab.store.analysis_store import AnalysisStore

    store = AnalysisStore.open(golden_v2)
    assert store.meta.format_version == 2
    assert "chunk positions" in store.unchecked
    assert store.verify(integrals=INTEGRATED) == []  # all a format-2 store can check
    files = sorted((golden_v2 / "K" / "c").iterdir())
    assert len(files) >= 2
    _swap(files[0] / "0", files[1] / "0")
    assert main(["info", str(golden_v2), "--verify", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "not checked" in text and "chunk positions" in text


def test_a_format_2_analysis_holding_a_manifest_is_refused(copy):
    import json

    _, out, _ = copy
    doc = json.loads((out / "zarr.json").read_text())
    doc["attributes"]["trajlab"]["format_version"] = 2  # edited down
    (out / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(StoreCorruptError, match=r"format.*2.*trajlab_chunks"):
        trajlab.open_analysis(out)
