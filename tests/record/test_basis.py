"""Subspace bases of weight-shared layers (never stale, NaN for non-finite weights) and the
chunk checksum library."""

from __future__ import annotations

import google_crc32c
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import trajlab
from trajlab.record.basis import SubspaceTracker
from trajlab.store.codecs import crc32c_of


def _top_k_singular_values(U, W, V):
    return np.linalg.svd(U.T @ W @ V, compute_uv=False)


def test_non_finite_weight_gives_a_nan_basis():
    W = torch.ones(5, 7)
    W[2, 3] = float("nan")
    U, V, residual = SubspaceTracker(2).basis("w", W)
    assert U.shape == (5, 2) and V.shape == (7, 2)
    assert torch.isnan(U).all() and torch.isnan(V).all() and torch.isnan(residual)


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_recorder_never_stores_a_stale_basis(tmp_path):
    """A weight edited between steps (here through ``.data``, which bypasses autograd's version
    counter) gets the basis of the weight actually used at the recorded step."""
    model = _Conv().double()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 2, 5, 5, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (32,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = tmp_path / "r.zarr"
    with trajlab.Recorder(model, store, optimizer=opt, every=2, rank=2) as rec:
        for step in range(8):
            idx = torch.arange(8) + 3 * step
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx)
            opt.step()
            if step == 3:  # between the optimizer step and recorded step 4
                model.conv.weight.data.mul_(1.5)[0] *= -2.0
    run = trajlab.open_run(store)
    assert run.steps.tolist() == [0, 2, 4, 6]
    ds = run.layer("conv")
    for i in range(4):
        W = ds.weight.values[i]
        U, V = ds.basis_u.values[i], ds.basis_v.values[i]
        np.testing.assert_allclose(_top_k_singular_values(U, W, V),
                                   np.linalg.svd(W, compute_uv=False)[:2], rtol=1e-10)
        assert float(ds.basis_residual.values[i]) < 1e-10


def test_chunk_checksums_match_zarrs_crc32c():
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 4096, 100_003):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert crc32c_of(data) == google_crc32c.value(data.tobytes())
