"""BatchNorm models: the eval-mode factor max_c |gamma_c|/sqrt(running_var_c + eps) of each
BatchNorm layer in K_net where the network is a chain (issue 22 item 6).

Every expected value is computed here from the module's state_dict, saved by the training loop
just before ``opt.step()`` (the moment the recorder reads the weights), with numpy in float64:
never from trajlab's own numbers.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trajlab
from trajlab.sde.network import batchnorm_factors

STEPS = 4


def _cnn(*, affine_second: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3, affine=affine_second), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 8 * 8, 5))


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))


def _train(model: nn.Module, path, x: torch.Tensor, **options):
    """Record STEPS SGD steps; return the recorder and the state_dict before each update."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 5, (x.shape[0],), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    states = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with trajlab.Recorder(model, path, optimizer=opt, flush_seconds=0, **options) as rec:
            for _ in range(STEPS):
                i = torch.randint(0, x.shape[0], (16,), generator=g)
                opt.zero_grad()
                loss = F.cross_entropy(model(x[i]), y[i])
                loss.backward()
                rec.log(loss=loss, indices=i)
                states.append({k: v.detach().double().clone().numpy()
                               for k, v in model.state_dict().items()})
                opt.step()
    return rec, states


def _sigma1(w: np.ndarray) -> float:
    return float(np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)[0])


def _bn_factor(state: dict, name: str, eps: float, channels: int) -> float:
    gamma = state.get(f"{name}.weight", np.ones(channels))
    return float(np.max(np.abs(gamma) / np.sqrt(state[f"{name}.running_var"] + eps)))


def _expected(states, weights: list[str], bns: list[tuple[str, float, int]]):
    sig = np.array([[_sigma1(s[f"{w}.weight"]) for w in weights] for s in states])
    bn = np.array([np.prod([_bn_factor(s, *b) for b in bns]) for s in states])
    return sig.prod(1), bn


def _analyze(path):
    return trajlab.analyze(path, progress=False)


def test_chain_cnn_k_net_includes_batchnorm_factors(tmp_path):
    torch.manual_seed(0)
    model = _cnn()
    x = torch.randn(48, 1, 8, 8)
    rec, states = _train(model, tmp_path / "r.zarr", x, per_sample=False)
    ds = _analyze(tmp_path / "r.zarr")
    weights, bn = _expected(states, ["0", "3", "7"], [("1", 1e-5, 4), ("4", 1e-5, 3)])
    assert not np.allclose(bn, 1.0, rtol=1e-3)  # the factors matter in this test
    np.testing.assert_allclose(ds.K_net_batchnorm.values, bn, rtol=1e-9)
    np.testing.assert_allclose(ds.K_net.values, weights * bn, rtol=1e-6)
    # logK stays the SDE's state: the weight matrices only
    np.testing.assert_allclose(np.exp(ds.logK.values), weights, rtol=1e-6)
    assert "K_net includes the eval-mode Lipschitz factor" in ds.attrs["k_net"]
    assert "no SDE terms" in ds.attrs["k_net"]
    assert "NOT a Lipschitz bound" not in ds.attrs["k_net"]
    assert "no SDE terms" in ds.K_net_batchnorm.attrs["description"]
    # weights-only mode: the BatchNorm is named for what it is, not "no rule"
    (entry,) = [m for m in rec.summary["modules"] if m["type"] == "BatchNorm2d"]
    assert entry["why"].startswith("BatchNorm in train mode") and "no rule" not in entry["why"]
    assert [b["name"] for b in rec.summary["batchnorm"]] == ["1", "4"]
    assert rec.summary["not_a_bound"] == []
    assert "K_net includes their eval-mode factor" in repr(rec.summary)


def test_mlp_batchnorm1d_stored_values_are_the_state_at_the_step(tmp_path):
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(64, 12)
    _, states = _train(model, tmp_path / "m.zarr", x, per_sample=False)
    root = trajlab.open_run(tmp_path / "m.zarr").root
    np.testing.assert_array_equal(root.bn_weight.values,
                                  np.stack([s["1.weight"] for s in states]))
    np.testing.assert_array_equal(root.bn_running_var.values,
                                  np.stack([s["1.running_var"] for s in states]))
    ds = _analyze(tmp_path / "m.zarr")
    weights, bn = _expected(states, ["0", "3"], [("1", 1e-5, 16)])
    np.testing.assert_allclose(ds.K_net.values, weights * bn, rtol=1e-6)


def test_eval_mode_batchnorm_with_per_sample_recording(tmp_path):
    """In eval mode BatchNorm does not mix samples: the full recording runs, its noise terms
    are those of the weight matrices, and K_net still includes the factor."""
    torch.manual_seed(0)
    model = _mlp()
    with torch.no_grad():
        model[1].running_var.uniform_(0.2, 3.0)
        model[1].weight.uniform_(0.5, 2.0)
    model[1].eval()
    x = torch.randn(64, 12)
    _, states = _train(model, tmp_path / "e.zarr", x, loss_fn=F.cross_entropy)
    ds = _analyze(tmp_path / "e.zarr")
    weights, bn = _expected(states, ["0", "3"], [("1", 1e-5, 16)])
    np.testing.assert_allclose(ds.K_net.values, weights * bn, rtol=1e-6)
    assert np.isfinite(ds.logK_drift.values).all()
    assert np.isfinite(ds.logK_diffusion2.values).all()


def test_not_a_chain_leaves_the_factor_out(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8),
                          nn.LayerNorm(8), nn.Linear(8, 5))
    x = torch.randn(64, 12)
    rec, states = _train(model, tmp_path / "n.zarr", x, per_sample=False)
    ds = _analyze(tmp_path / "n.zarr")
    _, bn = _expected(states, [], [("1", 1e-5, 16)])
    np.testing.assert_allclose(ds.K_net_batchnorm.values, bn, rtol=1e-9)
    np.testing.assert_allclose(ds.K_net.values, np.exp(ds.logK.values), rtol=1e-12)
    assert "K_net leaves out the eval-mode Lipschitz factor" in ds.attrs["k_net"]
    assert any("normalisation" in r for r in rec.summary["not_a_bound"])
    assert "K_net leaves out their eval-mode factor (not a chain)" in repr(rec.summary)


def test_batchnorm_without_running_stats_is_not_a_bound(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16, track_running_stats=False),
                          nn.ReLU(), nn.Linear(16, 5))
    x = torch.randn(64, 12)
    rec, _ = _train(model, tmp_path / "t.zarr", x, per_sample=False)
    assert any("track_running_stats=False" in r and "1" in r
               for r in rec.summary["not_a_bound"])
    ds = _analyze(tmp_path / "t.zarr")
    assert np.isnan(ds.K_net_batchnorm.values).all()  # no running statistics: no factor
    np.testing.assert_allclose(ds.K_net.values, np.exp(ds.logK.values), rtol=1e-12)


def test_refusal_counts_every_batchnorm_and_names_the_first(tmp_path):
    layers: list[nn.Module] = [nn.Linear(12, 8)]
    for _ in range(11):
        layers += [nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8)]
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)]
    with pytest.raises(trajlab.RecorderError) as err:
        trajlab.Recorder(model, tmp_path / "x.zarr", optimizer=opt)
    msg = str(err.value)
    assert "(11)" in msg and "and 3 more" in msg
    assert all(f"{n} (BatchNorm1d)" in msg for n in bns[:8])
    assert f"{bns[8]} (BatchNorm1d)" not in msg
    assert "per_sample=False" in msg
    assert not (tmp_path / "x.zarr").exists()


def test_factor_kernel_is_the_operator_norm_of_the_eval_map():
    """Against the definition: sigma_1 of the Jacobian of each BatchNorm1d in eval mode."""
    g = torch.Generator().manual_seed(3)
    mods = [nn.BatchNorm1d(5, eps=1e-3), nn.BatchNorm1d(3, affine=False, eps=0.5),
            nn.BatchNorm1d(4)]
    with torch.no_grad():
        for m in mods:
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            if m.weight is not None:
                m.weight.copy_(torch.randn(m.num_features, generator=g))
            m.eval().double()
    ref = []
    for m in mods:
        jac = torch.func.jacrev(lambda v, m=m: m(v[None])[0])(
            torch.randn(m.num_features, dtype=torch.float64, generator=g))
        ref.append(torch.linalg.matrix_norm(jac, ord=2))
    w = torch.cat([m.weight.detach() if m.weight is not None
                   else torch.ones(m.num_features, dtype=torch.float64) for m in mods])
    v = torch.cat([m.running_var for m in mods])
    got = batchnorm_factors(torch.stack([w, 2 * w]), torch.stack([v, v]),
                            [m.eps for m in mods], [m.num_features for m in mods])
    torch.testing.assert_close(got[0], torch.stack(ref), rtol=1e-12, atol=0)
    torch.testing.assert_close(got[1], 2 * torch.stack(ref), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="sum\\(channels\\)"):
        batchnorm_factors(w, v, [1e-5] * 3, [5, 3, 3])
