"""The two ways the Conv2d rule forms per-sample gradients (im2col + bmm, one grouped
weight-gradient convolution) against torch.func, over the geometries Conv2d allows, and the
choice between them."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import train
from torch import nn
from torch.func import functional_call, grad, vmap

import trajlab
import trajlab.record.rules.conv2d as conv2d_rule
from trajlab.record.rules.base import Dense, Patches
from trajlab.record.rules.conv2d import Conv2dRule, grouped_is_faster

GEOMETRIES = [  # (C, m, kernel, stride, padding, dilation, padding_mode)
    (8, 4, 3, 1, 1, 1, "zeros"),
    (8, 4, (2, 3), 2, 0, 2, "zeros"),
    (9, 5, 3, 1, "same", 1, "zeros"),
    (8, 6, 4, 1, "same", 1, "zeros"),  # asymmetric padding (even kernel)
    (8, 3, 3, 1, 1, 1, "circular"),
    (8, 3, 3, 2, 2, 1, "reflect"),
    (8, 3, 3, (1, 2), (1, 0), (2, 1), "replicate"),
]


def _reference(conv: nn.Conv2d, x: torch.Tensor, B: int) -> torch.Tensor:
    """torch.func per-sample gradients of sum(out^2) / B, times B (the loss-mean undone)."""
    def loss1(w, xi):
        out = functional_call(conv, {"weight": w, "bias": conv.bias}, (xi[None],))
        return out.square().sum() / B

    g = vmap(grad(loss1), in_dims=(None, 0))(conv.weight.detach(), x)
    return g.reshape(B, conv.out_channels, -1) * B


def _dense(ps) -> torch.Tensor:
    return ps.grads if isinstance(ps, Dense) else torch.bmm(ps.delta, ps.act.transpose(1, 2))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "im2col"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_per_sample_gradients_match_torch_func(monkeypatch, geometry, grouped):
    C, m, k, s, p, d, mode = geometry
    monkeypatch.setattr(conv2d_rule, "grouped_is_faster", lambda *a: grouped)
    torch.manual_seed(0)
    conv = nn.Conv2d(C, m, k, stride=s, padding=p, dilation=d, padding_mode=mode).double()
    B = 5
    x = torch.randn(B, C, 11, 10, dtype=torch.float64)
    out = conv(x)
    g_out = torch.autograd.grad(out.square().sum() / B, out)[0]
    ps = Conv2dRule().per_sample(conv, None, (x,), {}, g_out)
    assert isinstance(ps, Dense if grouped else Patches)
    ref = _reference(conv, x, B)
    assert (_dense(ps) - ref).abs().max() <= 1e-13 * ref.abs().max()


def test_grouped_path_promotes_mixed_autocast_dtypes(monkeypatch):
    """Under autocast the layer input is float32 and its output gradient bfloat16."""
    monkeypatch.setattr(conv2d_rule, "grouped_is_faster", lambda *a: True)
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 4, 3, padding=1)
    x = torch.randn(3, 8, 6, 6)
    g_out = torch.randn(3, 4, 6, 6).to(torch.bfloat16)
    ps = Conv2dRule().per_sample(conv, None, (x,), {}, g_out)
    assert ps.grads.dtype == torch.float32
    want = torch.bmm(g_out.float().reshape(3, 4, -1) * 3,
                     F.unfold(x, 3, padding=1).transpose(1, 2))
    assert (ps.grads - want).abs().max() <= 1e-5 * want.abs().max()


def test_choice_depends_on_the_shape_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert grouped_is_faster(cpu, 3, 32, 1024)  # many positions
    assert grouped_is_faster(cpu, 32, 64, 256)  # the paper ConvNet's second layer
    assert not grouped_is_faster(cpu, 64, 64, 64)  # its third: wide, few positions
    assert grouped_is_faster(cpu, 16, 16, 64)
    assert not grouped_is_faster(cpu, 1, 8, 64)  # the digits ConvNet's first layer
    assert not grouped_is_faster(cpu, 128, 128, 16)
    assert not grouped_is_faster(cuda, 32, 64, 256)  # not measured on CUDA: im2col


def test_recordings_by_either_method_agree(tmp_path, monkeypatch):
    """A short recording of a ConvNet stores the same per-sample information (to float32
    rounding) whichever method formed the per-sample gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 7 * 7, 5))
    X = torch.randn(32, 3, 16, 16)
    Y = torch.randint(0, 5, (32,))
    stores = {}
    for grouped in (True, False):
        monkeypatch.setattr(conv2d_rule, "grouped_is_faster", lambda *a, g=grouped: g)
        stores[grouped] = tmp_path / f"{grouped}.zarr"
        train(copy.deepcopy(model), X, Y, steps=3, lr=0.1, store=stores[grouped])
    a, b = trajlab.open_run(stores[True]), trajlab.open_run(stores[False])
    for name in ("0", "2"):
        la, lb = a.layer(name).compute(), b.layer(name).compute()
        np.testing.assert_array_equal(la["weight"].values, lb["weight"].values)
        for v in ("ps_proj_out", "ps_proj_in", "ps_sqnorm", "grad_sq_sum"):
            x, y = la[v].values, lb[v].values
            assert np.abs(x - y).max() <= 1e-5 * np.abs(y).max(), (name, v)
