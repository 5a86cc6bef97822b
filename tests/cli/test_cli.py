"""Every CLI failure is one line naming the problem (and the fix), rc 2, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import zarr
from helpers import DEADLINE, mlp64, train

import trajlab
from trajlab.cli import main as cli_main


def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture()
def run_store(tmp_path):
    X = torch.randn(32, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (32,))
    train(mlp64(), X, Y, steps=4, store=tmp_path / "r.zarr")
    return tmp_path / "r.zarr"


@pytest.mark.parametrize("argv,needles", [
    (["analyze", "RUN", "--out", "OUT", "--workers", "-2"], ["--workers", ">= 1"]),
    (["analyze", "RUN", "--out", "OUT", "--chunk-rows", "0"], ["--chunk-rows"]),
    (["analyze", "RUN", "--out", "OUT", "--steps", "5"], ["START:STOP"]),
    (["analyze", "RUN", "--out", "OUT", "--steps", "9:3"], ["STOP must be larger"]),
    (["analyze", "RUN", "--out", "OUT", "--gap-tol", "2"], ["[0, 1)"]),
    (["demo", "--steps", "0"], ["--steps", ">= 1"]),
    (["demo", "--steps", "abc"], ["--steps", "'abc'"]),
    (["demo", "--batch-size", "1"], ["two samples"]),
    (["demo", "--lr", "nan"], ["--lr"]),
    (["nope"], ["invalid choice"]),
])
def test_bad_numbers_are_refused_where_parsed(argv, needles, run_store, tmp_path, capsys):
    argv = [a.replace("RUN", str(run_store)).replace("OUT", str(tmp_path / "o.zarr"))
            for a in argv]
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    _one_line_error(capsys, e.value.code, *needles)
    assert not (tmp_path / "o.zarr").exists()


def test_store_problems_are_one_line(run_store, tmp_path, capsys):
    _one_line_error(capsys, cli_main(["info", str(tmp_path / "none.zarr")]), "no run store")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    _one_line_error(capsys, cli_main(["info", str(tmp_path / "plain.zarr")]),
                    "not a trajlab run store")
    _one_line_error(capsys, cli_main(["plot", str(run_store)]), "not a trajlab analysis")
    _one_line_error(capsys, cli_main(["analyze", str(run_store), "--out", str(run_store),
                                      "--quiet"]), "never overwrites")
    (tmp_path / "file.txt").write_text("x")
    rc = cli_main(["analyze", str(run_store), "--out", str(tmp_path / "file.txt"), "--quiet"])
    _one_line_error(capsys, rc, "file.txt")
    doc = json.loads((run_store / "zarr.json").read_text())
    doc["attributes"]["trajlab_committed"] = None
    (run_store / "zarr.json").write_text(json.dumps(doc))
    _one_line_error(capsys, cli_main(["analyze", str(run_store), "--out",
                                      str(tmp_path / "a.zarr"), "--quiet"]), "commit marker")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory(run_store, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _one_line_error(capsys, cli_main(["analyze", str(run_store), "--out",
                                          str(ro / "a.zarr"), "--quiet"]), "permission")
    finally:
        ro.chmod(0o700)


def test_unreachable_object_store_is_one_line(tmp_path):
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    p = subprocess.run([sys.executable, "-m", "trajlab.cli", "info", "s3://bucket/run.zarr"],
                       capture_output=True, text=True, env=env, timeout=DEADLINE)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert "s3://bucket/run.zarr" in p.stderr or "URL" in p.stderr


def test_debug_shows_the_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "trajlab.cli", "--debug", "info",
                        str(tmp_path / "none.zarr")], capture_output=True, text=True,
                       timeout=DEADLINE)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_info_lists_what_is_and_is_not_recorded(tmp_path, capsys):
    from torch import nn

    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)).double().eval()
    X = torch.randn(32, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (32,))
    with pytest.warns(UserWarning):
        train(model, X, Y, steps=2, store=tmp_path / "r.zarr")
    assert cli_main(["info", str(tmp_path / "r.zarr")]) == 0
    out = capsys.readouterr().out
    assert "coverage" in out and "weight-matrix parameters recorded" in out
    assert "not recorded: 1 (BatchNorm1d, 16 parameters): BatchNorm in eval mode" in out
    assert "K_net is not a Lipschitz bound here" not in out  # a chain: BatchNorm's factor is in
    assert "of 1 layers is recorded; the analysis includes it in K_net" in out


def test_module_entry_point_runs(tmp_path):
    p = subprocess.run([sys.executable, "-m", "trajlab.cli", "--help"], capture_output=True,
                       text=True, timeout=DEADLINE)
    assert p.returncode == 0 and "analyze" in p.stdout
    assert trajlab.__version__
