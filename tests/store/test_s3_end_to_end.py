"""Runs given as URLs, end to end on an S3-compatible server (moto, loopback only): the API and
every command take the storage options (issue 24, item 7).

The environment holds no AWS credentials here, so a store opened without the given storage
options fails (NoCredentialsError) instead of passing by accident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import mlp64, train

import trajlab
from trajlab.cli import main

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

BUCKET = "trajlab-e2e"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3():
    """fsspec options of a moto S3 server on 127.0.0.1 with one bucket."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield {"key": "testing", "secret": "testing",
           "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    server.stop()


@pytest.fixture(autouse=True)
def no_ambient_credentials(monkeypatch, tmp_path):
    """Nothing but the given storage options can reach the bucket."""
    for k in list(os.environ):
        if k.startswith(("AWS_", "FSSPEC_S3")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory):
    """The same 6-step run recorded to S3 and to a local folder, and the local analysis."""
    X = torch.randn(48, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    Y = torch.randint(0, 4, (48,), generator=torch.Generator().manual_seed(4))
    url = f"s3://{BUCKET}/run.zarr"
    train(mlp64(), X, Y, steps=6, store=url, recorder_kwargs={"storage_options": s3})
    local = tmp_path_factory.mktemp("s3e2e") / "run.zarr"
    train(mlp64(), X, Y, steps=6, store=local)
    ref = trajlab.analyze(local, scheduler="synchronous", progress=False)
    return url, local, ref


def test_analyze_a_run_given_as_a_url_uses_the_storage_options(s3, runs):
    url, _, ref = runs
    out = f"s3://{BUCKET}/api.analysis.zarr"
    ds = trajlab.analyze(url, out=out, storage_options=s3, scheduler="synchronous",
                         progress=False)
    np.testing.assert_allclose(ds.K.values, ref.K.values, rtol=1e-12)
    np.testing.assert_allclose(ds.drift_noise.values, ref.drift_noise.values, rtol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reopened and verified on S3: nothing to redo
        again = trajlab.analyze(url, out=out, storage_options=s3, scheduler="synchronous",
                                progress=False)
    np.testing.assert_allclose(again.K.values, ref.K.values, rtol=1e-12)


def test_url_and_local_runs_in_one_call(s3, runs):
    """The options go to the URL run only: a local path takes none."""
    url, local, ref = runs
    both = trajlab.analyze([url, local], storage_options=s3, scheduler="synchronous",
                           progress=False)
    for ds in both:
        np.testing.assert_allclose(ds.K.values, ref.K.values, rtol=1e-12)


def test_the_commands_take_storage_options(s3, runs, tmp_path, capsys):
    url, _, ref = runs
    opts = tmp_path / "s3.json"
    opts.write_text(json.dumps(s3))
    so = ["--storage-options", f"@{opts}"]
    out = f"s3://{BUCKET}/cli.analysis.zarr"
    assert main(["analyze", url, "--out", out, "--scheduler", "synchronous", "--quiet",
                 *so]) == 0
    assert "analysed 6 steps x 2 layers" in capsys.readouterr().out
    ds = trajlab.open_analysis(out, storage_options=s3)
    np.testing.assert_allclose(ds.K.values, ref.K.values, rtol=1e-12)

    assert main(["info", url, "--verify", "--quiet", *so]) == 0
    assert "integrity   ok" in capsys.readouterr().out
    assert main(["info", out, "--verify", "--quiet", *so]) == 0
    text = capsys.readouterr().out
    assert "analysis store" in text and "integrity   ok" in text

    figures = tmp_path / "figures"
    assert main(["plot", out, "--kind", "band", "--out-dir", str(figures), *so]) == 0
    assert (figures / "cli.analysis_band.png").stat().st_size > 0
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return
    assert main(["export", out, "--tensorboard", str(tmp_path / "tb"), *so]) == 0
    assert list((tmp_path / "tb").glob("*.trajlab*"))


def test_without_storage_options_the_error_says_so(runs, capsys):
    url, _, _ = runs
    assert main(["info", url]) == 2
    err = capsys.readouterr().err
    assert "credentials" in err.lower() or "storage options" in err.lower()


def test_bad_storage_options_are_refused_by_name(runs, tmp_path, capsys):
    url, _, _ = runs
    with pytest.raises(SystemExit):
        main(["info", url, "--storage-options", "{not json"])
    assert "--storage-options" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", url, "--storage-options", f"@{tmp_path / 'missing.json'}"])
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.slow
def test_the_cli_in_its_own_process(s3, runs, tmp_path):
    """`trajlab analyze` as a user runs it: a separate process, options from a file (the fast
    counterpart: test_the_commands_take_storage_options, in this process)."""
    url, _, ref = runs
    opts = tmp_path / "s3.json"
    opts.write_text(json.dumps(s3))
    out = f"s3://{BUCKET}/process.analysis.zarr"
    code = ("import sys, torch; torch.set_num_threads(1); from trajlab.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, "-c", code, "analyze", url, "--out", out,
                           "--scheduler", "synchronous", "--quiet", "--storage-options",
                           f"@{opts}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    ds = trajlab.open_analysis(out, storage_options=s3)
    np.testing.assert_allclose(ds.K.values, ref.K.values, rtol=1e-12)
