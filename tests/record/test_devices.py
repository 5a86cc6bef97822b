"""Recording on a CUDA device (skipped where there is none; `benchmarks/device_check.sh` runs
them on a lent GPU machine). Each compares against the same run recorded on the CPU, through
quantities that do not depend on the SVD's signs or the device's summation order beyond
rounding. Every test also runs with ``device="cpu"`` in the default suite, so the test itself
is exercised where no GPU is."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import train
from torch import nn

import trajlab
from trajlab.models import cifar_convnet, digits_convnet

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _conv_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(
        0, 10, (n,), generator=g)


@pytest.mark.parametrize("device", DEVICES)
def test_conv_recording_on_device_matches_cpu(tmp_path, device):
    """Conv layers (subspace sketches) and linear layers recorded on the device give the CPU
    run's weights, gradients and per-sample gradients."""
    X, Y = _conv_data()
    model = digits_convnet(seed=0).double()
    train(copy.deepcopy(model), X, Y, steps=4, batch_size=16, store=tmp_path / "cpu.zarr")
    train(copy.deepcopy(model).to(device), X.to(device), Y.to(device), steps=4, batch_size=16,
          store=tmp_path / "gpu.zarr")
    a, b = trajlab.open_run(tmp_path / "cpu.zarr"), trajlab.open_run(tmp_path / "gpu.zarr")
    assert a.layers == b.layers
    for name in a.layers:
        la, lb = a.layer(name).compute(), b.layer(name).compute()
        for v in ("weight", "grad"):
            np.testing.assert_allclose(la[v].values, lb[v].values, rtol=1e-9, atol=1e-12)
        for step in a.steps.tolist():
            ga = trajlab.per_sample_gradients(a, name, step)
            gb = trajlab.per_sample_gradients(b, name, step)
            scale = np.abs(ga.grads).max()
            assert np.abs(ga.grads - gb.grads).max() <= 1e-8 * scale, (name, step)


@pytest.mark.parametrize("device", DEVICES)
def test_process_writer_on_device_writes_the_thread_store(tmp_path, device):
    X, Y = _conv_data()
    model = digits_convnet(seed=0).to(device)
    Xc, Yc = X.float().to(device), Y.to(device)
    train(copy.deepcopy(model), Xc, Yc, steps=5, batch_size=16, store=tmp_path / "t.zarr")
    train(copy.deepcopy(model), Xc, Yc, steps=5, batch_size=16, store=tmp_path / "p.zarr",
          recorder_kwargs={"writer": "process"})
    a, b = trajlab.open_run(tmp_path / "t.zarr"), trajlab.open_run(tmp_path / "p.zarr")
    for name in a.layers:
        la, lb = a.layer(name).compute(), b.layer(name).compute()
        for v in ("weight", "update"):
            np.testing.assert_array_equal(la[v].values, lb[v].values)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_records_and_checks(tmp_path, device):
    """The paper-style ConvNet under bfloat16 autocast: the first step's self-check passes and
    the stored per-sample information gives the applied gradient to bfloat16 precision."""
    torch.manual_seed(0)
    model = cifar_convnet(10, seed=0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    X = torch.randn(64, 3, 32, 32, device=device)
    Y = torch.randint(0, 10, (64,), device=device)
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                          loss_fn=F.cross_entropy) as rec:
        for i in range(3):
            x, y = X[i * 16:(i + 1) * 16], Y[i * 16:(i + 1) * 16]
            opt.zero_grad()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            rec.log(loss=loss, inputs=x, targets=y)
            opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.n_steps == 3
    lin = run.layers[-1]
    lay = run.layer(lin).compute()
    assert not lay["nonfinite"].values.any()
    g = trajlab.per_sample_gradients(run, lin, 2).grads.mean(0)
    grad = lay["grad"].values[-1]
    assert np.abs(g - grad).max() <= 2e-2 * np.abs(grad).max()


@pytest.mark.parametrize("device", DEVICES)
def test_weight_edit_through_data_never_stores_a_stale_basis(tmp_path, device):
    """An in-place edit of a conv weight between steps (bypassing autograd): the stored basis
    must still be the stored weight's."""
    X, Y = _conv_data()
    model = digits_convnet(seed=0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    Xc, Yc = X.float().to(device), Y.to(device)
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt) as rec:
        for i in range(4):
            opt.zero_grad()
            loss = F.cross_entropy(model(Xc[i * 16:(i + 1) * 16]), Yc[i * 16:(i + 1) * 16])
            loss.backward()
            rec.log(loss=loss)
            opt.step()
            conv.weight.data.mul_(1.5)
    run = trajlab.open_run(tmp_path / "r.zarr")
    name = run.layers[0]
    lay = run.layer(name).compute()
    for t in range(run.n_steps):
        W = lay["weight"].values[t].astype(np.float64)
        u = lay["basis_u"].values[t][:, 0].astype(np.float64)
        v = lay["basis_v"].values[t][:, 0].astype(np.float64)
        s1 = np.linalg.svd(W, compute_uv=False)[0]
        assert abs(abs(u @ W @ v) - s1) <= 1e-5 * s1, t
