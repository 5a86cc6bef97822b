"""Subspace bases of weight-shared layers: prefetched on a helper thread, never stale."""

from __future__ import annotations

import threading

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


def test_prefetched_basis_is_the_one_computed_in_place():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 72, generator=g, dtype=torch.float64)
    ahead, inline = SubspaceTracker(4), SubspaceTracker(4)
    ahead.prefetch("w", W)
    got, want = ahead.basis("w", W), inline.basis("w", W)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    ahead.close()


def test_prefetch_of_an_edited_weight_is_not_used():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 30, generator=g, dtype=torch.float64)
    tracker = SubspaceTracker(3)
    tracker.prefetch("w", W)
    W.mul_(0.5)[0, 0] += 3.0  # edited in place after the snapshot (as p.data edits do)
    U, V, residual = tracker.basis("w", W)
    s = torch.linalg.svdvals(W)[:3]
    torch.testing.assert_close(torch.linalg.svdvals(U.T @ W @ V), s, rtol=1e-12, atol=0)
    assert float(residual) < 1e-12
    tracker.close()


def test_non_finite_weight_gives_a_nan_basis_on_both_paths():
    W = torch.ones(5, 7)
    W[2, 3] = float("nan")
    tracker = SubspaceTracker(2)
    for prefetch in (False, True):
        if prefetch:
            tracker.prefetch("w", W)
        U, V, residual = tracker.basis("w", W)
        assert U.shape == (5, 2) and V.shape == (7, 2)
        assert torch.isnan(U).all() and torch.isnan(V).all() and torch.isnan(residual)
    tracker.close()


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_recorder_computes_bases_ahead_and_never_stores_a_stale_one(tmp_path, monkeypatch):
    """The basis of a recorded step is started on the helper thread right after the previous
    optimizer step; a weight edited after that (here through ``.data``, which bypasses
    autograd's version counter) gets a basis of the weight actually used."""
    threads = []
    compute = SubspaceTracker._compute

    def spy(self, name, W):
        threads.append(threading.current_thread().name)
        return compute(self, name, W)

    monkeypatch.setattr(SubspaceTracker, "_compute", spy)
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
            if step == 3:  # before recorded step 4, after its basis was started
                model.conv.weight.data.mul_(1.5)[0] *= -2.0
    run = trajlab.open_run(store)
    assert run.steps.tolist() == [0, 2, 4, 6]
    # step 0 in place (nothing to prefetch before the first step), later steps ahead
    assert threads[0] == threading.main_thread().name
    assert any(t.startswith("trajlab-basis") for t in threads[1:])
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
