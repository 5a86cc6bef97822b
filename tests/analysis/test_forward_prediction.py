"""A prediction never contains what it predicts (docs/math.md §8): no ``*_pred*`` variable
changes when the realised update or the batch-gradient flow of a step is perturbed, every
prediction names its theory, and a run without a probe gets no prediction."""

from __future__ import annotations

import numpy as np
import pytest

from trajlab.analysis import analyze, tasks
from trajlab.analysis.assemble import integrals
from trajlab.recipes import TrainConfig, record_digits
from trajlab.sde.optimizer import THEORY_ADAM, THEORY_MOMENTUM, THEORY_PATHWISE, THEORY_SGD


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fwd")
    out = {}
    for opt, probe in (("momentum", 3), ("adamw", 1), ("sgd", 0)):
        cfg = TrainConfig(model="mlp", hidden=16, steps=12, batch_size=8, dtype="float64",
                          optimizer=opt, lr=0.05 if opt != "adamw" else 0.003,
                          weight_decay=0.01, probe_every=probe)
        out[opt] = record_digits(d / f"{opt}.zarr", cfg, progress=False)
    return out


def _pred_names(ds):
    return [k for k in ds.data_vars if "_pred" in k]


@pytest.mark.parametrize("opt", ["momentum", "adamw"])
def test_predictions_ignore_the_realised_update(runs, opt, monkeypatch):
    base = analyze(runs[opt], progress=False, scheduler="synchronous").compute()
    assert np.isfinite(base.logK_pred_mean[-1]) and float(base.logK_pred_var[-1]) > 0
    real = tasks.read_chunk

    def perturbed(plan, li, rows):
        c = real(plan, li, rows)
        c.vals["update"] = c.vals["update"] + 0.3 * np.random.default_rng(li).normal(
            size=c.vals["update"].shape)
        return c

    monkeypatch.setattr(tasks, "read_chunk", perturbed)
    moved = analyze(runs[opt], progress=False, scheduler="synchronous").compute()
    for k in _pred_names(base):
        np.testing.assert_array_equal(moved[k].values, base[k].values, err_msg=k)
    # the pathwise reconstruction reads the update: the perturbation is seen there
    assert not np.allclose(moved.K_pathwise.values, base.K_pathwise.values)


def test_predictions_ignore_the_batch_gradient_flow(runs):
    """The flow from the step's batch gradient (drift_flow where no probe ran, the old
    default prediction's input) can be anything: the integrals do not read it."""
    ds = analyze(runs["momentum"], progress=False, scheduler="synchronous").compute()
    v = {k: ds[k].values for k in ds.data_vars}
    v["time"] = ds.time.values
    base = integrals(v, every=1)
    unprobed = ~ds.flow_full_gradient.values
    assert unprobed.any()
    v["drift_flow"] = np.where(unprobed, 1e3, v["drift_flow"])
    v["drift"] = np.where(unprobed, 1e3, v["drift"])
    v["logK_drift"] = np.where(~ds.flow_probed.values, 1e3, v["logK_drift"])
    moved = integrals(v, every=1)
    for k in base:
        if "_pred" in k:
            np.testing.assert_array_equal(moved[k], base[k], err_msg=k)


def test_theory_labels(runs):
    ds = analyze(runs["momentum"], progress=False, scheduler="synchronous")
    assert ds.attrs["optimizer_theory"] == THEORY_MOMENTUM
    assert ds.logK_pred_mean.attrs["theory"] == THEORY_MOMENTUM
    assert ds.K_net_pred_upper.attrs["theory"] == THEORY_MOMENTUM
    assert ds.logK_pred_mean_sgd.attrs["theory"] == THEORY_SGD
    assert ds.K_pathwise.attrs["theory"] == THEORY_PATHWISE
    assert ds.drift_optimizer.attrs["theory"] == THEORY_PATHWISE
    ds = analyze(runs["adamw"], progress=False, scheduler="synchronous")
    assert ds.logK_pred_var.attrs["theory"] == THEORY_ADAM


def test_no_probe_no_prediction(runs):
    ds = analyze(runs["sgd"], progress=False, scheduler="synchronous")
    assert np.isnan(ds.logK_pred_mean.values[1:]).all()
    assert "probe" in ds.attrs["prediction"]
    assert np.isfinite(ds.K_pathwise.values).all()


def test_the_recorder_stores_the_optimizer_spec(tmp_path):
    import torch
    import torch.nn.functional as F

    import trajlab
    from trajlab.sde.optimizer import OptimizerSpec

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.8, nesterov=True,
                          weight_decay=1e-3)
    X, Y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt) as rec:
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            rec.log(indices=torch.arange(8))
            opt.step()
    user = trajlab.open_run(tmp_path / "r.zarr").meta.user
    assert OptimizerSpec.from_dict(user["optimizer_spec"]) == OptimizerSpec(
        "momentum", momentum=0.8, nesterov=True, weight_decay=1e-3)
    ds = analyze(tmp_path / "r.zarr", progress=False, scheduler="synchronous")
    assert ds.attrs["optimizer_source"] == "the run's metadata"
    assert ds.attrs["optimizer_theory"] == THEORY_MOMENTUM
