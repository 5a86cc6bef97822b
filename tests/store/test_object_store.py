"""Run and analysis stores on an S3-compatible server (moto, on loopback) through fsspec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import mlp64, train

import trajlab

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint,
                                                                      "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="trajlab-test")
    yield opts
    server.stop()


def test_record_and_analyse_on_object_storage(s3, tmp_path):
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    url = "s3://trajlab-test/run.zarr"
    train(mlp64(), X, Y, steps=6, store=url, recorder_kwargs={"storage_options": s3})
    train(mlp64(), X, Y, steps=6, store=tmp_path / "local.zarr")
    remote = trajlab.open_run(url, storage_options=s3)
    local = trajlab.open_run(tmp_path / "local.zarr")
    assert remote.n_steps == 6
    np.testing.assert_array_equal(remote.layer("0").weight.values, local.layer("0").weight.values)
    with pytest.raises(trajlab.StoreExistsError):
        train(mlp64(), X, Y, steps=1, store=url, recorder_kwargs={"storage_options": s3})
    ds = trajlab.analyze(remote, out="s3://trajlab-test/analysis.zarr", storage_options=s3,
                         scheduler="threads", progress=False)
    ref = trajlab.analyze(local, scheduler="threads", progress=False)
    np.testing.assert_allclose(ds.K.values, ref.K.values, rtol=1e-14)
    again = trajlab.open_analysis("s3://trajlab-test/analysis.zarr", storage_options=s3)
    np.testing.assert_allclose(again.drift_noise.values, ref.drift_noise.values, rtol=1e-12)
