"""Shared helpers for the tests: tiny models, a training loop and torch.func references."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import trajlab


#: Seconds a test waits for a state that background work reaches by itself (a writer commits
#: its rows, a child process exits). Only a bound on failure: every wait ends as soon as the
#: state is there, so this may be generous; a loaded CI machine can be 10x slower than a laptop.
DEADLINE = 120.0


def wait_until(condition, what: str, *, timeout: float = DEADLINE) -> None:
    """Poll ``condition()`` until it is true; fail, naming ``what``, after ``timeout`` s.

    For synchronising with background threads and processes: never sleep a fixed time and
    hope the other side got there.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {timeout:.0f} s: {what}"
        time.sleep(0.01)


CRASH_WORKER = str(Path(__file__).with_name("crash_worker.py"))


@contextlib.contextmanager
def held_worker(*args: str, hold_at: int):
    """Run ``crash_worker.py *args --hold-at hold_at``; yield the process once it holds there
    (a point of its progress, not a moment in time), SIGKILL it when the block ends.

    The worker's background writer works on while the worker holds, so a kill lands wherever
    the writer happens to be. A worker that never gets there fails the test within DEADLINE.
    """
    proc = subprocess.Popen([sys.executable, CRASH_WORKER, *args, "--hold-at", str(hold_at)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(DEADLINE, proc.kill)  # a stuck worker fails, never hangs
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if lines[-1] == f"held {hold_at}":
                break
        else:
            raise AssertionError(f"the worker ended without holding at {hold_at}: {lines}")
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=DEADLINE)
        watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL


#: Keys the recorder itself adds to a run's user metadata (its optimizer's description, cd0554c).
RECORDER_USER_KEYS = ("optimizer_spec", "optimizer_spec_unavailable")


def user_metadata(run) -> dict:
    """The metadata the user gave the Recorder, as stored (without :data:`RECORDER_USER_KEYS`)."""
    return {k: v for k, v in run.meta.user.items() if k not in RECORDER_USER_KEYS}


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


#: Analysis variables that are differences of larger terms (0 up to rounding for plain SGD, a
#: measured increment of K): their rounding is that of the terms they are made from.
SCALE_OF = {
    "drift_optimizer": ("drift_optimizer", "drift_flow"),
    "drift_noise_cov": ("drift_noise_cov", "drift_noise", "drift_noise_var"),
    "diffusion2_cov": ("diffusion2_cov", "diffusion2", "diffusion2_var"),
    "drift_discretization": ("drift_discretization", "drift_noise"),
    "drift": ("drift", "drift_flow", "drift_noise"),
    "pathwise_increment": ("pathwise_increment", "K"),
    "logK_drift_optimizer": ("logK_drift_optimizer", "logK_drift"),
}


def assert_analyses_close(got, expected, *, rel: float = 1e-10, names=None) -> None:
    """Every variable of ``expected`` (an analysis Dataset or a dict of arrays) in ``got``, equal
    to rounding: floats within ``rel`` of the variable's scale (:data:`SCALE_OF`, see
    :func:`assert_close_to_scale`), everything else exactly.

    For results of different code paths (chunked and whole, another scheduler, other thread
    counts), whose last bits may differ on another CPU or BLAS kernel. Results of one code path
    computed twice are compared with ``np.testing.assert_array_equal`` instead.
    """
    def values(ds, k):
        v = ds[k]
        return np.asarray(getattr(v, "values", v))

    for k in names if names is not None else list(expected.keys()):
        a, b = values(got, k), values(expected, k)
        if not np.issubdtype(b.dtype, np.floating):
            np.testing.assert_array_equal(a, b, err_msg=k)
            continue
        terms = [np.abs(values(expected, j)) for j in SCALE_OF.get(k, (k,)) if j in expected]
        scale = max(float(t[np.isfinite(t)].max(initial=0.0)) for t in terms)
        assert_close_to_scale(a, b, rel=rel, scale=scale, err_msg=k)
