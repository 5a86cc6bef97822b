"""optimizer.step(closure): forward and backward inside step (Lightning's automatic
optimisation, LBFGS). Checked against torch.func per-sample gradients times the clip
coefficient the closure applied, and training without the recorder."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import trajlab
from helpers import reference_per_sample_grads


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _loop(model, opt, store=None, steps=3, optimizer_kind="sgd"):
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,),
                                                                               generator=g)
    rec = (trajlab.Recorder(model, store, optimizer=opt, loss_fn=F.cross_entropy)
           if store else None)
    before, coefs = [], []
    if rec is not None:
        rec.__enter__()
    try:
        for s in range(steps):
            x, y = X[8 * s:8 * s + 8], Y[8 * s:8 * s + 8]
            before.append((copy.deepcopy(model), x, y))

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                coefs.append(min(1.0, 0.1 / (float(total) + 1e-6)))
                if rec is not None:
                    rec.log(loss=loss, inputs=x, targets=y)
                return loss

            opt.step(closure)
    finally:
        if rec is not None:
            rec.__exit__(None, None, None)
    return before, coefs


def test_closure_step_is_recorded_as_applied(tmp_path):
    ref = _model()
    _loop(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9))
    model = _model()
    before, coefs = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                          tmp_path / "r.zarr")
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.steps.tolist() == [0, 1, 2]
    for s, (m, x, y) in enumerate(before):
        want = reference_per_sample_grads(m, F.cross_entropy, x, y)
        for name in ("0", "2"):
            got = trajlab.per_sample_gradients(run, name, s).grads
            np.testing.assert_allclose(got, coefs[s] * want[f"{name}.weight"].numpy(),
                                       rtol=1e-9, atol=1e-13)
            np.testing.assert_array_equal(run.layer(name).weight.values[s],
                                          m.get_submodule(name).weight.detach().numpy())


def test_lbfgs_records_the_first_evaluation(tmp_path):
    model = _model()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    before, _ = _loop(model, opt, tmp_path / "r.zarr", steps=2)
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.steps.tolist() == [0, 1]
    ds = run.layer("0")
    # the update is the whole step's (several closure evaluations), the weight the one before
    after = [before[1][0][0].weight.detach().numpy(), model[0].weight.detach().numpy()]
    for s in range(2):
        np.testing.assert_array_equal(ds.weight.values[s], before[s][0][0].weight.detach())
        np.testing.assert_allclose(ds.weight.values[s] + ds["update"].values[s], after[s],
                                   rtol=0, atol=1e-15)
