"""Nothing lost, nothing stale, nothing silently corrupt: the store defects found from outside,
each reproduced (these tests failed before the fix)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from helpers import ConvModel, mlp64, train, wait_until

import trajlab
from trajlab.cli import main as cli_main
from trajlab.store.lock import StoreLock


def _record(store, steps=6, seed=0, batch=8, **kw):
    X = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(seed))
    return train(mlp64(seed), X, Y, steps=steps, batch_size=batch, store=store, seed=seed,
                 recorder_kwargs={"chunk_steps": 2, **kw})


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# --------------------------------------------------------------------------- 0: never delete
def test_analyze_into_an_ordinary_directory_deletes_nothing(tmp_path, capsys):
    exp = tmp_path / "exp"
    _record(exp / "a.zarr")
    _record(exp / "b.zarr", seed=1)
    (exp / "notes").mkdir()
    (exp / "notes" / "README.txt").write_text("keep me")
    before = _tree(exp)
    for extra in ([], ["--overwrite"]):
        assert cli_main(["analyze", str(exp / "a.zarr"), "--out", str(exp), "--quiet",
                         *extra]) == 2
        err = capsys.readouterr().err
        assert "never overwrites" in err and err.count("\n") == 1
        assert _tree(exp) == before
    for overwrite in (False, True):
        with pytest.raises(trajlab.StoreExistsError, match="not a trajlab analysis store"):
            trajlab.analyze(exp / "a.zarr", out=exp / "b.zarr", overwrite=overwrite,
                            progress=False)  # a run store is not an analysis store
    assert _tree(exp) == before
    assert trajlab.open_run(exp / "a.zarr").n_steps == 6


def test_recorder_mode_w_replaces_only_run_stores(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "x.txt").write_text("keep")
    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["mine"] = 1
    for target in (folder, tmp_path / "other.zarr"):
        with pytest.raises(trajlab.StoreExistsError, match="never overwrites"):
            _record(target, mode="w")
    assert (folder / "x.txt").read_text() == "keep"
    assert zarr.open_group(tmp_path / "other.zarr", mode="r").attrs["mine"] == 1
    _record(tmp_path / "r.zarr")
    _record(tmp_path / "r.zarr", steps=3, mode="w")  # a run store is replaced
    assert trajlab.open_run(tmp_path / "r.zarr").n_steps == 3


# --------------------------------------------------------------------------- 1: stale analysis
def test_an_analysis_of_a_re_recorded_run_is_never_returned_as_new(tmp_path):
    run, an = tmp_path / "run.zarr", tmp_path / "an.zarr"
    _record(run, seed=0)
    first = float(trajlab.analyze(run, out=an, progress=False).K.isel(step=-1, layer=0))
    _record(run, seed=3, mode="w")  # a different run at the same path
    with pytest.raises(trajlab.StoreError, match="different recording.*re-recorded"):
        trajlab.analyze(run, out=an, progress=False)
    fresh = trajlab.analyze(run, out=an, overwrite=True, progress=False)
    now = float(fresh.K.isel(step=-1, layer=0))
    assert now != first
    assert now == pytest.approx(float(trajlab.analyze(run, progress=False).K.isel(step=-1,
                                                                                  layer=0)))
    assert trajlab.open_analysis(an).attrs["run_id"] == trajlab.open_run(run).meta.run_id


# --------------------------------------------------------------------------- 2: corruption
def _chunk(store: Path, array: str, key: str = "0/0/0") -> Path:
    return store / array / "c" / Path(*key.split("/"))


def test_a_flipped_byte_is_caught_and_named(tmp_path, capsys):
    store = tmp_path / "r.zarr"
    _record(store)
    path = _chunk(store, "layers/0/weight", "1/0/0")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    run = trajlab.open_run(store)
    with pytest.raises(trajlab.StoreCorruptError, match=r"layers/0/weight.*chunk 1/0/0 "
                                                        r"\(rows 2..3\)"):
        run.layer("0").weight.values
    with pytest.raises(trajlab.StoreCorruptError, match="layers/0/weight"):
        trajlab.analyze(store, scheduler="synchronous", progress=False)
    assert cli_main(["info", str(store), "--verify", "--quiet"]) == 2
    out = capsys.readouterr().out
    assert "layers/0/weight" in out and "integrity   ok" not in out
    assert cli_main(["info", str(tmp_path / "missing.zarr")]) == 2


@pytest.mark.parametrize("array,key", [("batch_size", "1"), ("layers/0/weight", "2/0/0")])
def test_a_missing_chunk_inside_the_committed_rows_is_an_error(tmp_path, array, key):
    store = tmp_path / "r.zarr"
    _record(store)
    _chunk(store, array, key).unlink()
    with pytest.raises(trajlab.StoreCorruptError, match=rf"{array}.*missing chunk"):
        run = trajlab.open_run(store)
        run.layer("0").compute()
        run.root.compute()
    assert "missing" in trajlab.cli.info.info_report(store, verify=True).damaged[0]


def test_a_truncated_chunk_names_array_and_chunk(tmp_path):
    store = tmp_path / "r.zarr"
    _record(store)
    path = _chunk(store, "layers/2/ps_input", "0/0/0")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(trajlab.StoreCorruptError, match=r"layers/2/ps_input.*chunk 0/0/0"):
        trajlab.open_run(store).layer("2").ps_input.values


@pytest.mark.parametrize("marker", [99, None, "3", -1, True])
def test_a_bad_commit_marker_is_a_clear_error(tmp_path, marker, capsys):
    store = tmp_path / "r.zarr"
    _record(store)
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["trajlab_committed"] = marker
    (store / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(trajlab.StoreCorruptError, match="commit marker"):
        run = trajlab.open_run(store)
        run.layer("0").weight.values
    assert cli_main(["info", str(store)]) == 2
    assert "commit marker" in capsys.readouterr().err


def test_a_weight_dtype_edited_in_the_metadata_is_named(tmp_path, capsys):
    store = tmp_path / "r.zarr"
    _record(store)
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["trajlab"]["dtype"] = "float32"
    (store / "zarr.json").write_text(json.dumps(doc))
    assert cli_main(["analyze", str(store), "--out", str(tmp_path / "a.zarr"), "--quiet",
                     "--scheduler", "synchronous"]) == 2
    err = capsys.readouterr().err
    assert "float64" in err and "float32" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- 3: growth
def test_a_store_killed_while_the_sample_axis_grows_opens_and_resumes(tmp_path):
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    store = tmp_path / "r.zarr"
    model = train(mlp64(), X, Y, steps=3, batch_size=4, store=store)
    g = zarr.open_group(store, mode="r+")
    g["indices"].resize((3, 5))  # killed after the first of the arrays grew
    g["layers/0/ps_input"].resize((3, 5, 6))
    run = trajlab.open_run(store)
    assert run.layer("0").ps_input.shape == (3, 4, 6) and run.root.indices.shape == (3, 4)
    assert "integrity   ok" in trajlab.cli.format_info(store)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with trajlab.Recorder(model, store, optimizer=opt, mode="a") as rec:
        for s in range(2):
            idx = torch.arange(5) + 5 * s
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            rec.log(indices=idx)
            opt.step()
    run = trajlab.open_run(store)
    assert run.n_steps == 5 and run.sample_capacity == 5
    ind = run.root_rows(["indices"])["indices"]
    np.testing.assert_array_equal(ind[3], np.arange(5))
    assert (ind[:3, 4] == -1).all()
    ps = trajlab.per_sample_gradients(run, "0", 4)
    assert ps.grads.shape == (5, 9, 6)


# --------------------------------------------------------------------------- 4: layout kill
def test_a_store_killed_while_being_laid_out_reads_as_empty_everywhere(tmp_path, capsys):
    store = tmp_path / "r.zarr"
    _record(store)
    full = zarr.open_group(store, mode="r").attrs.asdict()
    for keep in ("root only", "root arrays"):
        import shutil

        shutil.rmtree(store)
        g = zarr.open_group(store, mode="w-",
                            attributes={"trajlab": full["trajlab"], "trajlab_committed": 0})
        if keep == "root arrays":
            g.create_array("step", shape=(0,), chunks=(2,), dtype="int64",
                           dimension_names=("step",))
            g.create_array("batch_size", shape=(0,), chunks=(2,), dtype="int32",
                           dimension_names=("step",))
        run = trajlab.open_run(store)
        assert run.n_steps == 0 and run.layer("0").sizes["step"] == 0
        assert cli_main(["info", str(store)]) == 0
        assert "none committed" in capsys.readouterr().out
        _record(store, mode="a")  # resumed: laid out anew
        assert trajlab.open_run(store).n_steps == 6


def test_a_store_with_no_committed_row_yet_reads_as_empty(tmp_path, capsys):
    store = tmp_path / "r.zarr"
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    X = torch.randn(8, 6, dtype=torch.float64)
    with trajlab.Recorder(model, store, optimizer=opt, flush_seconds=3600) as rec:
        opt.zero_grad()
        F.cross_entropy(model(X), torch.zeros(8, dtype=torch.long)).backward()
        rec.log()
        opt.step()
        wait_until((store / "layers" / "2" / "weight" / "zarr.json").exists,
                   "the writer lays the store out")  # nothing is committed yet
        run = trajlab.open_run(store)
        assert run.n_steps == 0 and run.layer("2").weight.shape[0] == 0
        assert cli_main(["info", str(store)]) == 0
        assert "none committed" in capsys.readouterr().out


# --------------------------------------------------------------------------- locks
def test_the_lock_follows_the_resolved_location(tmp_path):
    real = tmp_path / "real.zarr"
    link = tmp_path / "link.zarr"
    link.symlink_to(real, target_is_directory=True)
    with StoreLock(real, what="recorder"):
        for other in (link, f"file://{real}", zarr.storage.LocalStore(real),
                      tmp_path / "x" / ".." / "real.zarr"):
            with pytest.raises(trajlab.StoreLockedError, match="another recorder"):
                StoreLock(other).acquire()


def test_two_analyses_into_the_same_store_do_not_collide(tmp_path):
    run = tmp_path / "run.zarr"
    _record(run)
    out = tmp_path / "an.zarr"
    with StoreLock(out, what="analysis"):
        with pytest.raises(trajlab.StoreLockedError, match="another analysis"):
            trajlab.analyze(run, out=out, progress=False)
    ds = trajlab.analyze(run, out=out, progress=False)
    assert ds.sizes["step"] == 6


def test_analysis_store_sized_to_its_data(tmp_path):
    """Chunks span all layers and as many steps as a graph node computes (following the run
    store's chunks), so the store is a few files per variable, not one per (layer, chunk)."""
    run = tmp_path / "run.zarr"
    _record(run, steps=200, chunk_steps=64)
    out = tmp_path / "an.zarr"
    ds = trajlab.analyze(run, out=out, progress=False)
    files = [p for p in out.rglob("*") if p.is_file()]
    chunks = len(ds.K.chunks[0])
    assert chunks <= 4 and ds.K.chunks[1] == (ds.sizes["layer"],)
    assert len(files) <= (len(ds.data_vars) + len(ds.coords) + 2) * (chunks + 1) + 10
    logical = sum(v.nbytes for v in ds.variables.values())
    on_disk = sum(os.path.getsize(p) for p in files)
    assert on_disk < 2 * logical + 200_000, (on_disk, logical)


# --------------------------------------------------------------------------- conv + NaN
def test_nan_weights_in_a_conv_model_do_not_crash_training(tmp_path):
    torch.manual_seed(2)
    model = ConvModel().double()
    X = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    Y = torch.randint(0, 4, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(RuntimeWarning, match="NaN"):
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, rank=2) as rec:
            for s in range(4):
                x = X[4 * s:4 * s + 4].clone()
                if s == 1:
                    x[0] = float("nan")
                opt.zero_grad()
                F.cross_entropy(model(x), Y[4 * s:4 * s + 4]).backward()
                rec.log()
                opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.n_steps == 4
    assert run.layer_rows("conv", ["nonfinite"])["nonfinite"][1:].all()


# --------------------------------------------------------------------------- full disk
class _FullDisk(zarr.storage.WrapperStore):
    """Every write fails with ENOSPC once ``fail`` is set, metadata documents included."""

    fail = False

    async def set(self, key, value):
        if _FullDisk.fail:
            raise OSError(28, "No space left on device")
        return await self._store.set(key, value)


def _committed(store: Path) -> int:
    try:
        return trajlab.open_run(store).n_steps
    except FileNotFoundError:  # not laid out yet
        return 0


def test_a_full_disk_still_gets_the_truncation_marker(tmp_path):
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    _FullDisk.fail = False
    store = _FullDisk(zarr.storage.LocalStore(tmp_path / "full.zarr"))
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(RuntimeWarning, match="No space left"):
        with trajlab.Recorder(model, store, optimizer=opt, chunk_steps=2,
                              flush_seconds=0) as rec:
            for s in range(8):
                if s == 4:  # the writer commits a row, then the disk is full
                    wait_until(lambda: _committed(tmp_path / "full.zarr") >= 1,
                               "a committed row before the disk fills")
                    _FullDisk.fail = True
                idx = torch.arange(8 * s, 8 * s + 8)
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), Y[idx]).backward()
                rec.log(indices=idx)
                opt.step()
                if s == 5:  # the writer meets the full disk while training goes on
                    wait_until(lambda: rec._writer is None or rec._writer.error is not None,
                               "the writer meets the full disk")
    _FullDisk.fail = False
    run = trajlab.open_run(tmp_path / "full.zarr")
    assert 1 <= run.n_steps <= 5
    assert "No space left" in (run.meta.truncated or "")  # written in place, no new blocks
    doc = json.loads((tmp_path / "full.zarr" / "zarr.json").read_text())
    assert not doc["attributes"]["trajlab"].get("truncated")  # the metadata write failed


# --------------------------------------------------------------------------- analysis format
def test_in_memory_and_stored_analyses_have_the_same_variables_and_attrs(tmp_path):
    run = tmp_path / "run.zarr"
    _record(run)
    a = trajlab.analyze(run, scheduler="synchronous", progress=False)
    b = trajlab.analyze(run, out=tmp_path / "an.zarr", scheduler="synchronous", progress=False)
    assert set(a.data_vars) == set(b.data_vars)
    assert set(a.coords) == set(b.coords)
    assert a.attrs == b.attrs
    for k in a.data_vars:
        np.testing.assert_array_equal(a[k].values, b[k].values, err_msg=k)
        assert a[k].attrs["description"] == b[k].attrs["description"]


def test_an_analysis_written_by_an_older_layout_is_refused_clearly(tmp_path):
    run = tmp_path / "run.zarr"
    _record(run)
    out = tmp_path / "an.zarr"
    trajlab.analyze(run, out=out, progress=False)
    doc = json.loads((out / "zarr.json").read_text())
    doc["attributes"]["trajlab"]["format_version"] = 1  # as written by trajlab 0.1
    (out / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(trajlab.StoreError, match="older trajlab.*overwrite=True"):
        trajlab.analyze(run, out=out, progress=False)
    with pytest.raises(trajlab.StoreError, match="older trajlab"):
        trajlab.open_analysis(out)
    assert trajlab.analyze(run, out=out, overwrite=True, progress=False).sizes["step"] == 6
