"""Shared helpers for the tests: tiny models, a training loop and torch.func references."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import trajlab


def reference_per_sample_grads(model: nn.Module, loss_fn, X, Y) -> dict[str, torch.Tensor]:
    """Per-sample gradients of every parameter with torch.func (independent of trajlab)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, x, y):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, X, Y)


def train(model, X, Y, *, steps, batch_size=8, lr=0.05, seed=0, recorder_kwargs=None,
          store=None, optimizer="sgd", loss_fn=F.cross_entropy):
    """Train with sampled batches, optionally under a Recorder; returns the final model."""
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    ctx = (trajlab.Recorder(model, store, optimizer=opt, **(recorder_kwargs or {}))
           if store is not None else None)
    if ctx is not None:
        ctx.__enter__()
    try:
        for _ in range(steps):
            idx = torch.randint(0, len(X), (batch_size,), generator=g)
            opt.zero_grad()
            loss = loss_fn(model(X[idx]), Y[idx])
            loss.backward()
            if ctx is not None:
                ctx.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return model


def mlp64(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).double()


class SeqModel(nn.Module):
    """Linear over (batch, seq, features), then pooled."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)).mean(1))


class ConvModel(nn.Module):
    def __init__(self, padding_mode="zeros"):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2, bias=True,
                              padding_mode=padding_mode)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def assert_close_to_scale(actual, expected, *, rel: float = 1e-10, scale: float | None = None,
                          err_msg: str = "") -> None:
    """``actual`` equals ``expected`` up to ``rel`` times the operands' scale.

    Floating-point results differ in their last bits between CPUs and BLAS kernels, and a value
    that is a difference of larger terms (a drift that is 0 up to rounding) carries rounding of
    the size of those terms, not of itself. So every element may differ by
    ``rel * max(|expected element|, scale)``, where ``scale`` defaults to the largest finite
    ``|expected|`` of the whole variable; pass the scale of the terms a variable is made of
    where that is larger. NaN and infinities must sit at the same places.
    """
    a = np.asarray(actual, dtype=float)
    b = np.asarray(expected, dtype=float)
    assert a.shape == b.shape, f"{err_msg}: shape {a.shape} != {b.shape}"
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{err_msg}: NaN")
    np.testing.assert_array_equal(np.isposinf(a), np.isposinf(b), err_msg=f"{err_msg}: +inf")
    np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b), err_msg=f"{err_msg}: -inf")
    fin = np.isfinite(b)
    if scale is None:
        scale = float(np.abs(b[fin]).max(initial=0.0))
    tol = rel * np.maximum(np.abs(b), scale)
    err = np.where(fin, np.abs(a - np.where(fin, b, 0.0)), 0.0)
    bad = err > tol
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(err - tol)), b.shape))
    assert not bad.any(), (
        f"{err_msg}: {int(bad.sum())} of {b.size} elements differ by more than {rel:g} x "
        f"max(|expected|, scale={scale:.3g}); worst at {worst}: actual {a[bad][:3].tolist()}, "
        f"expected {b[bad][:3].tolist()}")
