"""Checksums bound to their position (issue 24, item 5): the run-store corruption matrix.

Every corruption of a format-3 store either reads exact data or raises a StoreCorruptError
naming the array and the chunk; never wrong values. Before format 3, swapping two chunk files
of one array (or copying in a chunk of another run) passed verify and read wrong values, and
removing the crc32c codec from an array's zarr.json let a flipped byte read as a wrong number.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import mlp64, train

import trajlab
from trajlab.cli import main as cli_main
from trajlab.store import run_store as rs
from trajlab.store.manifest import NONE

DATA = Path(__file__).resolve().parents[1] / "data"


def _record(store: Path, *, steps: int = 6, seed: int = 0, mode: str = "w-",
            batch: int = 8) -> None:
    X = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(seed))
    train(mlp64(seed), X, Y, steps=steps, batch_size=batch, store=store, seed=seed,
          recorder_kwargs={"chunk_steps": 2, "mode": mode})


def _chunk(store: Path, array: str, key: str) -> Path:
    return store / array / "c" / Path(*key.split("/"))


def _everything(store: Path) -> dict[str, np.ndarray]:
    """Every stored array's committed values, read through trajlab (checked)."""
    run = trajlab.open_run(store)
    out = {}
    for path in run.layout.array_paths():
        out[path] = np.asarray(run.rows.array(path)[...])
    return out


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_suffix(".tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _drop_crc(d: dict) -> None:
    d["codecs"] = [c for c in d["codecs"] if c["name"] != "crc32c"]


# Each case: (corrupt(store, other_store), regex the error must match). Chunks of 2 steps.
CASES = {
    "swap-weight-chunks": (
        lambda s, o: _swap(_chunk(s, "layers/0/weight", "0/0/0"),
                           _chunk(s, "layers/0/weight", "2/0/0")),
        r"layers/0/weight.*chunk (0/0/0 \(rows 0..1\)|2/0/0 \(rows 4..5\)).*not written"),
    "swap-root-chunks": (
        lambda s, o: _swap(_chunk(s, "loss", "0"), _chunk(s, "loss", "1")),
        r"'loss'.*chunk (0|1) \(rows .*not written at this position"),
    "swap-per-sample-chunks": (
        lambda s, o: _swap(_chunk(s, "layers/2/ps_input", "0/0/0"),
                           _chunk(s, "layers/2/ps_input", "1/0/0")),
        r"layers/2/ps_input.*chunk (0|1)/0/0 .*not written at this position"),
    "chunk-from-another-run": (
        lambda s, o: shutil.copyfile(_chunk(o, "layers/0/weight", "1/0/0"),
                                     _chunk(s, "layers/0/weight", "1/0/0")),
        r"layers/0/weight.*chunk 1/0/0 \(rows 2..3\).*not written at this position"),
    "swap-manifest-chunks": (
        lambda s, o: _swap(_chunk(s, "trajlab_chunks", "0/0/0/0"),
                           _chunk(s, "trajlab_chunks", "1/0/0/0")),
        r"trajlab_chunks.*chunk (0|1)/0/0/0 holds the entries of step chunk (1|0)"),
    "flipped-byte": (
        lambda s, o: _flip(_chunk(s, "layers/0/weight", "1/0/0")),
        r"layers/0/weight.*chunk 1/0/0 \(rows 2..3\)"),
    "flipped-manifest-byte": (
        lambda s, o: _flip(_chunk(s, "trajlab_chunks", "1/0/0/0")),
        r"trajlab_chunks.*chunk 1/0/0/0"),
    "deleted-chunk": (
        lambda s, o: _chunk(s, "layers/0/update_stored", "2").unlink(),
        r"layers/0/update_stored.*missing chunk 2"),
    "truncated-chunk": (
        lambda s, o: _chunk(s, "layers/2/ps_input", "0/0/0").write_bytes(
            _chunk(s, "layers/2/ps_input", "0/0/0").read_bytes()[:20]),
        r"layers/2/ps_input.*chunk 0/0/0"),
    "crc-codec-removed-and-byte-flipped": (
        lambda s, o: (_edit_json(s / "layers/0/weight/zarr.json", _drop_crc),
                      _flip(_chunk(s, "layers/0/weight", "1/0/0"))),
        r"layers/0/weight.*crc32c"),
    "format-version-edited-down": (
        lambda s, o: _edit_json(s / "zarr.json", lambda d: d["attributes"]["trajlab"]
                                .__setitem__("format_version", 2)),
        r"format version 2.*trajlab_chunks"),
    "manifest-deleted": (
        lambda s, o: shutil.rmtree(s / "trajlab_chunks"),
        r"trajlab_chunks.*missing"),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("pristine")
    _record(base / "r.zarr")
    _record(base / "other.zarr", seed=5)
    return base


@pytest.mark.parametrize("case", list(CASES))
def test_every_corruption_reads_exact_data_or_names_array_and_chunk(pristine, tmp_path, case):
    store, other = tmp_path / "r.zarr", pristine / "other.zarr"
    shutil.copytree(pristine / "r.zarr", store)
    expected = _everything(store)
    corrupt, match = CASES[case]
    corrupt(store, other)
    with pytest.raises(trajlab.StoreCorruptError, match=match):
        got = _everything(store)
        for path, value in expected.items():  # no error: then every value must be exact
            np.testing.assert_array_equal(got[path], value, err_msg=path)
    problems: list[str] = []
    try:
        problems = trajlab.open_run(store).verify()
    except trajlab.StoreCorruptError as e:  # damage found while opening
        problems = [str(e)]
    assert problems and any(re.search(match, p) for p in problems), problems


def test_swapped_chunks_are_named_by_info_verify(pristine, tmp_path, capsys):
    store = tmp_path / "r.zarr"
    shutil.copytree(pristine / "r.zarr", store)
    _swap(_chunk(store, "layers/0/weight", "0/0/0"), _chunk(store, "layers/0/weight", "2/0/0"))
    assert cli_main(["info", str(store), "--verify", "--quiet"]) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert "layers/0/weight" in text and "chunk 0/0/0" in text
    with pytest.raises(trajlab.StoreCorruptError, match="layers/0/weight"):
        trajlab.analyze(store, scheduler="synchronous", progress=False)


def test_a_swap_of_identical_chunks_changes_nothing_and_passes(pristine, tmp_path):
    """The checksum is the chunk's own: equal bytes at two positions are interchangeable."""
    store = tmp_path / "r.zarr"
    shutil.copytree(pristine / "r.zarr", store)
    a, b = _chunk(store, "probe", "0"), _chunk(store, "probe", "1")
    assert a.read_bytes() == b.read_bytes()  # no probe ran: both chunks hold False, False
    _swap(a, b)
    assert trajlab.open_run(store).verify() == []


# --------------------------------------------------------------------------- writer side
def test_chunks_extended_by_later_flushes_and_a_resume_verify(tmp_path):
    """Rows appended to a chunk that already holds committed rows (close after 3 steps with
    2-step chunks, then a resume) rewrite it; its manifest entry follows."""
    store = tmp_path / "r.zarr"
    _record(store, steps=3)
    _record(store, steps=4, mode="a", batch=11)  # the sample axis grows too
    run = trajlab.open_run(store)
    assert run.n_steps == 7 and run.verify() == []
    assert run.layout.variant == "v3" and run.meta.format_version == 3


@pytest.mark.parametrize("written", [0, 1, 5])
def test_a_writer_killed_while_extending_a_committed_chunk_loses_nothing(tmp_path, monkeypatch,
                                                                         written):
    """The manifest row is written before the chunks and accepts the old and the new file of
    a chunk that holds committed rows: a writer stopped after the manifest and ``written``
    chunk files leaves every committed row readable and exact, and a resume goes on."""
    store = tmp_path / "r.zarr"
    _record(store, steps=3)
    before = _everything(store)
    orig = rs.RunStoreWriter._write_chunk_file
    seen = {"n": 0}

    def dying(self, *a):
        if seen["n"] >= written:
            raise OSError("killed here")
        seen["n"] += 1
        return orig(self, *a)

    monkeypatch.setattr(rs.RunStoreWriter, "_write_chunk_file", dying)
    with pytest.warns(RuntimeWarning):
        _record(store, steps=2, mode="a")
    monkeypatch.setattr(rs.RunStoreWriter, "_write_chunk_file", orig)
    run = trajlab.open_run(store)
    assert run.n_steps == 3 and run.verify() == []
    after = _everything(store)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    _record(store, steps=2, mode="a")
    assert trajlab.open_run(store).verify() == []


def test_the_manifest_accepts_the_old_and_the_new_file_of_an_extended_chunk(tmp_path):
    store = tmp_path / "r.zarr"
    _record(store, steps=3)
    import zarr

    man = zarr.open_array(store / "trajlab_chunks", mode="r")
    paths = trajlab.open_run(store).layout.array_paths()
    w = paths.index("layers/0/weight")
    old = int(man[1, w, 0, 1])
    assert man[1, w, 0, 0] == NONE  # written once: one accepted checksum
    _record(store, steps=1, mode="a")
    man = zarr.open_array(store / "trajlab_chunks", mode="r")
    assert int(man[1, w, 0, 0]) == old and int(man[1, w, 0, 1]) not in (old, NONE)


# --------------------------------------------------------------------------- older formats
def test_a_format_2_store_is_read_and_verify_says_what_it_cannot_check(tmp_path):
    store = tmp_path / "v2.zarr"
    shutil.copytree(DATA / "golden_v2.zarr", store)
    run = trajlab.open_run(store)
    assert run.layout.variant == "v2" and run.verify() == []
    assert "chunk positions are not checked" in run.layout.unchecked
    report = trajlab.cli.info.info_report(store, verify=True)
    assert "chunk positions are not checked" in report.text
    assert trajlab.open_run(tmp_path / "v2.zarr").layout.position_bound is False


def test_format_3_stores_hold_every_variable_of_format_2(pristine):
    from trajlab.store.layout import RunLayout

    run = trajlab.open_run(pristine / "r.zarr")
    v2 = RunLayout(run.meta, "v2")
    assert run.layout.root_vars.keys() == v2.root_vars.keys()
    for lm in run.meta.layers:
        assert run.layout.layer_vars(lm).keys() == v2.layer_vars(lm).keys()
        assert "grad_scale" in run.layout.layer_vars(lm)


def test_a_format_2_store_is_resumed_as_format_2(tmp_path, monkeypatch):
    import trajlab.record.store_policy as policy

    store = tmp_path / "r.zarr"
    monkeypatch.setattr(policy, "FORMAT_VERSION", 2)
    _record(store, steps=3)
    monkeypatch.undo()
    _record(store, steps=3, mode="a")
    run = trajlab.open_run(store)
    assert run.layout.variant == "v2" and run.n_steps == 6 and run.verify() == []
    assert not (store / "trajlab_chunks").exists()


def test_an_analysis_array_without_its_checksum_codec_is_refused(pristine, tmp_path):
    """The crc32c codec removed from an analysis array's zarr.json and a byte flipped read as
    wrong numbers; now the array is refused on read and named by verify."""
    out = tmp_path / "an.zarr"
    trajlab.analyze(pristine / "r.zarr", out=out, scheduler="synchronous", progress=False)
    _edit_json(out / "drift" / "zarr.json", _drop_crc)
    chunk = next(p for p in (out / "drift" / "c").rglob("*") if p.is_file())
    _flip(chunk)
    with pytest.raises(trajlab.StoreCorruptError, match="'drift'.*crc32c"):
        _ = trajlab.open_analysis(out).drift.values
    report = trajlab.cli.info.info_report(out, verify=True)
    assert any("drift" in p and "crc32c" in p for p in report.damaged), report.damaged
