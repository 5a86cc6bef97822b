"""Recorder: per-sample information against torch.func, transparency, hooks, self-check."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from helpers import (ConvModel, SeqModel, mlp64, reference_per_sample_grads, train,
                     user_metadata)
from torch import nn

import trajlab


def one_recorded_step(model, X, Y, store, **kw):
    """Record one SGD step; return the reference per-sample grads at the pre-step weights."""
    ref = reference_per_sample_grads(copy.deepcopy(model), F.cross_entropy, X, Y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with trajlab.Recorder(model, store, optimizer=opt, loss_fn=F.cross_entropy, **kw) as rec:
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        rec.log(loss=loss, inputs=X, targets=Y)
        opt.step()
    return ref


def test_linear_per_sample_gradients_exact(tmp_path):
    model = mlp64()
    X = torch.randn(10, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (10,))
    ref = one_recorded_step(model, X, Y, tmp_path / "r.zarr")
    run = trajlab.open_run(tmp_path / "r.zarr")
    for name in ("0", "2"):
        got = trajlab.per_sample_gradients(run, name, 0)
        assert got.exact
        want = ref[f"{name}.weight"].numpy()
        err = np.abs(got.grads - want).max() / np.abs(want).max()
        assert err < 1e-10, (name, err)


def test_sequence_linear_sketch_within_reported_error(tmp_path):
    torch.manual_seed(1)
    model = SeqModel().double()
    X = torch.randn(6, 11, 5, dtype=torch.float64)
    Y = torch.randint(0, 3, (6,))
    ref = one_recorded_step(model, X, Y, tmp_path / "r.zarr", rank=3)
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.layer_meta("proj").sketch == "subspace"
    assert run.layer_meta("head").sketch == "rank1"
    got = trajlab.per_sample_gradients(run, "proj", 0)
    want = ref["proj.weight"].numpy()
    true_resid = ((want - got.grads) ** 2).sum((1, 2))
    total = (want**2).sum((1, 2))
    # The reported residual is the missed energy (orthogonal projection: Pythagoras).
    np.testing.assert_allclose(true_resid, got.residual, rtol=1e-8, atol=1e-12 * total.max())
    assert (got.relative_error > 0).any()  # rank 3 < 5: genuinely approximate


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_conv_sketch_projections_exact_and_error_reported(tmp_path, padding_mode):
    torch.manual_seed(2)
    model = ConvModel(padding_mode).double()
    X = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    Y = torch.randint(0, 4, (5,))
    ref = one_recorded_step(model, X, Y, tmp_path / "r.zarr", rank=2)
    run = trajlab.open_run(tmp_path / "r.zarr")
    lm = run.layer_meta("conv")
    assert lm.sketch == "subspace" and lm.shape == (6, 27) and lm.rank == 2
    ds = run.layer("conv").isel(step=0)
    want = ref["conv.weight"].reshape(5, 6, 27).numpy()
    U, V = ds.basis_u.values, ds.basis_v.values
    # The projections that the analysis needs are exact (MATH.md §2, sufficiency).
    np.testing.assert_allclose(ds.ps_proj_out.values, want @ V, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        ds.ps_proj_in.values, want.transpose(0, 2, 1) @ U, rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(ds.ps_sqnorm.values, (want**2).sum((1, 2)), rtol=1e-10)
    np.testing.assert_allclose(ds.grad_sq_sum.values, (want**2).sum(0), rtol=1e-10)
    got = trajlab.per_sample_gradients(run, "conv", 0)
    true_resid = ((want - got.grads) ** 2).sum((1, 2))
    np.testing.assert_allclose(true_resid, got.residual, rtol=1e-7, atol=1e-12)
    # The basis is the weight's top singular subspace.
    W = ds.weight.values
    s = np.linalg.svd(W, compute_uv=False)
    np.testing.assert_allclose(np.linalg.svd(U.T @ W @ V, compute_uv=False), s[:2], rtol=1e-10)


def test_conv_full_rank_sketch_is_exact(tmp_path):
    torch.manual_seed(3)
    model = ConvModel().double()
    X = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    Y = torch.randint(0, 4, (4,))
    ref = one_recorded_step(model, X, Y, tmp_path / "r.zarr", rank=6)
    got = trajlab.per_sample_gradients(tmp_path / "r.zarr", "conv", 0)
    want = ref["conv.weight"].reshape(4, 6, 27).numpy()
    assert np.abs(got.grads - want).max() / np.abs(want).max() < 1e-10


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_training_bit_identical_with_recorder(tmp_path, optimizer):
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    plain = train(mlp64(), X, Y, steps=12, optimizer=optimizer)
    kw = {"loss_fn": F.cross_entropy, "every": 2}
    recorded = train(mlp64(), X, Y, steps=12, optimizer=optimizer, store=tmp_path / "r.zarr",
                     recorder_kwargs=kw)
    for a, b in zip(plain.parameters(), recorded.parameters()):
        assert torch.equal(a, b)
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.steps.tolist() == [0, 2, 4, 6, 8, 10]


def test_update_is_what_the_optimizer_applied(tmp_path):
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    train(mlp64(), X, Y, steps=5, optimizer="adamw", store=tmp_path / "r.zarr")
    ds = trajlab.open_run(tmp_path / "r.zarr").layer("0").compute()
    np.testing.assert_allclose(
        ds.weight.values[1:], (ds["weight"] + ds["update"]).values[:-1], rtol=0, atol=1e-15
    )
    # AdamW's update is not -lr * grad.
    assert not np.allclose(ds["update"].values, -0.05 * ds.grad.values)


def _hook_counts(model, opt):
    mods = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())
    return mods, len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)


def test_hooks_removed_on_exit_and_on_exception(tmp_path):
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hook_counts(model, opt)
    attrs_before = {id(m): set(vars(m)) for m in model.modules()}
    with trajlab.Recorder(model, tmp_path / "a.zarr", optimizer=opt):
        assert _hook_counts(model, opt) != before
    assert _hook_counts(model, opt) == before
    with pytest.raises(ZeroDivisionError):
        with trajlab.Recorder(model, tmp_path / "b.zarr", optimizer=opt):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(4, 6, dtype=torch.float64)),
                            torch.tensor([0, 1, 2, 3])).backward()
            1 / 0
    assert _hook_counts(model, opt) == before
    assert {id(m): set(vars(m)) for m in model.modules()} == attrs_before


def test_sum_reduced_loss_raises(tmp_path):
    model = mlp64()
    X = torch.randn(8, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_sum(out, y):
        return F.cross_entropy(out, y, reduction="sum")

    with pytest.raises(trajlab.SelfCheckError, match="summed over samples"):
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, loss_fn=loss_sum) as rec:
            opt.zero_grad()
            loss = loss_sum(model(X), Y)
            loss.backward()
            rec.log(loss=loss, inputs=X, targets=Y)
            opt.step()


def test_layer_applied_twice_raises(tmp_path):
    lin = nn.Linear(4, 4).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(trajlab.SelfCheckError, match="applied 2 times"):
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, layers=["0"]):
            opt.zero_grad()
            model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
            opt.step()


def test_clipped_gradients_are_recorded_as_applied(tmp_path):
    """Clipping rescales .grad after backward: the recorder finds the scale, records it
    (grad_scale) and stores the per-sample information the optimizer actually applied."""
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    applied = {}
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 6, dtype=torch.float64)),
                        torch.randint(0, 4, (8,))).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        applied = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    for name in ("0", "2"):
        c = float(run.layer(name).grad_scale[0])
        ratio = float(applied[f"{name}.weight"].norm() / raw[f"{name}.weight"].norm())
        assert c == pytest.approx(ratio, rel=1e-10) and c < 1
        ps = trajlab.per_sample_gradients(run, name, 0)
        np.testing.assert_allclose(ps.grads.mean(0), applied[f"{name}.weight"].numpy(),
                                   rtol=1e-10, atol=1e-16)


def test_layer_selection_and_unsupported_types(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(trajlab.RecorderError, match="per_sample=False"):
        trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt)  # BatchNorm in train mode
    model.eval()
    with pytest.warns(UserWarning, match=r"1 \(BatchNorm1d"):
        rec = trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt)
    assert rec.layer_names == ["0", "2"]
    assert [m["recorded"] for m in rec.summary["modules"]] == [True, False, True]
    with pytest.raises(ValueError, match="unknown layer name"):
        trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, layers=["fc9"])
    with pytest.raises(ValueError, match="cannot be recorded"):
        trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, layers=["1"])
    relu = nn.ReLU()
    with pytest.raises(trajlab.RecorderError, match="no layer"):
        trajlab.Recorder(relu, tmp_path / "r.zarr", optimizer=opt)


def test_existing_store_not_overwritten_and_append_resumes(tmp_path):
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    store = tmp_path / "r.zarr"
    model = train(mlp64(), X, Y, steps=3, store=store)
    with pytest.raises(trajlab.StoreExistsError, match="mode='a'"):
        train(mlp64(), X, Y, steps=1, store=store)
    train(model, X, Y, steps=4, store=store, recorder_kwargs={"mode": "a"})
    run = trajlab.open_run(store)
    assert run.steps.tolist() == list(range(7))
    ds = run.layer("0").compute()
    np.testing.assert_allclose(ds.weight.values[3], (ds["weight"] + ds["update"]).values[2], atol=1e-15)
    with pytest.raises(trajlab.RecorderError, match="does not match"):
        other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
        train(other, X, Y, steps=1, store=store, recorder_kwargs={"mode": "a"})
    train(mlp64(), X, Y, steps=2, store=store, recorder_kwargs={"mode": "w"})
    assert trajlab.open_run(store).n_steps == 2


def test_store_round_trip_and_plain_xarray(tmp_path):
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    store = tmp_path / "r.zarr"
    train(mlp64(), X, Y, steps=6, batch_size=8, store=store,
          recorder_kwargs={"sampler": "with_replacement", "dataset_size": 64,
                           "metadata": {"seed": 0}})
    run = trajlab.open_run(store)
    assert run.meta.sampler == "with_replacement"
    assert user_metadata(run) == {"seed": 0}
    assert run.root.batch_size.values.tolist() == [8] * 6
    g = torch.Generator().manual_seed(0)
    want_idx = [torch.randint(0, 64, (8,), generator=g).tolist() for _ in range(6)]
    assert run.root.indices.values.tolist() == want_idx
    assert np.all(np.isfinite(run.root.loss.values))
    np.testing.assert_allclose(run.root.lr.values, 0.05)
    # Without trajlab: plain xarray sees the same data with named dimensions.
    plain = xr.open_zarr(store, group="layers/0", consolidated=False)
    assert plain.weight.dims == ("step", "out", "in")
    stored = plain.update_stored.values
    assert stored[-1] and not stored.all()  # updates mostly derived from consecutive weights
    np.testing.assert_array_equal(plain.weight.values, run.layer("0").weight.values)
    derived = run.layer("0")["update"].values
    diff = plain.weight.values[1:] - plain.weight.values[:-1]
    np.testing.assert_array_equal(derived[:-1][~stored[:-1]], diff[~stored[:-1]])
    np.testing.assert_array_equal(derived[stored], plain["update"].values[stored])
    tree = xr.open_datatree(store, engine="zarr", consolidated=False)
    assert "layers" in tree.children


def test_nonfinite_gradients_recorded_and_flagged(tmp_path):
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    X = torch.randn(4, 6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, self_check=False):
            for s in range(3):
                opt.zero_grad()
                x = X.clone()
                if s == 1:
                    x[0, 0] = float("nan")
                F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
                opt.step()
    ds = trajlab.open_run(tmp_path / "r.zarr").layer("0")
    assert ds.nonfinite.values.tolist() == [False, True, True]


def test_probe_records_full_data_gradient(tmp_path):
    model = mlp64()
    X = torch.randn(32, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (32,))
    probe = trajlab.FullGradientProbe([(X[:16], Y[:16]), (X[16:], Y[16:])], F.cross_entropy,
                                      every=2)
    ref_model = copy.deepcopy(model)
    ref_model.zero_grad()
    F.cross_entropy(ref_model(X), Y).backward()
    plain = train(copy.deepcopy(model), X, Y, steps=3)
    train(model, X, Y, steps=3, store=tmp_path / "r.zarr", recorder_kwargs={"probe": probe})
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)  # the probe does not disturb training
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.root.probe.values.tolist() == [True, False, True]
    pg = run.layer("0").probe_grad.values
    np.testing.assert_allclose(pg[0], ref_model[0].weight.grad.numpy(), rtol=1e-12)
    assert np.isnan(pg[1]).all()


@pytest.mark.cuda
def test_cuda_recording_matches_cpu(tmp_path):
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    train(mlp64(), X, Y, steps=4, store=tmp_path / "cpu.zarr")
    train(mlp64().cuda(), X.cuda(), Y.cuda(), steps=4, store=tmp_path / "gpu.zarr")
    a = trajlab.open_run(tmp_path / "cpu.zarr").layer("0").compute()
    b = trajlab.open_run(tmp_path / "gpu.zarr").layer("0").compute()
    for v in ("weight", "grad", "ps_grad_out", "ps_input"):
        np.testing.assert_allclose(a[v].values, b[v].values, rtol=1e-9, atol=1e-12)


def test_inplace_activation_after_recorded_layer(tmp_path):
    """Tensor hooks on the layer's output see the right gradient even when an in-place
    activation modifies that output afterwards."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(inplace=True), nn.Linear(9, 4)).double()
    X = torch.randn(10, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (10,))
    ref = one_recorded_step(model, X, Y, tmp_path / "r.zarr")
    got = trajlab.per_sample_gradients(tmp_path / "r.zarr", "0", 0)
    want = ref["0.weight"].numpy()
    assert np.abs(got.grads - want).max() <= 1e-10 * np.abs(want).max()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_updates_are_the_applied_updates_bit_for_bit(tmp_path, optimizer):
    """Derived updates (every=1) and stored ones (every=2, user edits between steps) both equal
    what the optimizer did, W(after step) - W(before), exactly."""
    torch.manual_seed(9)
    X = torch.randn(64, 6)
    Y = torch.randint(0, 4, (64,))
    for every in (1, 2):
        model = mlp64(9).float()
        opt = (torch.optim.SGD(model.parameters(), lr=0.5) if optimizer == "sgd"
               else torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1))
        truth = []
        store = tmp_path / f"r{every}.zarr"
        with trajlab.Recorder(model, store, optimizer=opt, chunk_steps=8, every=every) as rec:
            for s in range(30):
                before = model[0].weight.detach().clone()
                idx = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(s))
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), Y[idx]).backward()
                rec.log(indices=idx)
                opt.step()
                truth.append((before.numpy(), (model[0].weight.detach() - before).numpy()))
                if s == 13:
                    with torch.no_grad():  # user code edits the weights between steps
                        model[0].weight.mul_(0.5)
        ds = trajlab.open_run(store).layer("0")
        rows = list(range(0, 30, every))
        np.testing.assert_array_equal(ds.weight.values, np.stack([truth[r][0] for r in rows]))
        np.testing.assert_array_equal(ds["update"].values, np.stack([truth[r][1] for r in rows]))
        stored = ds.update_stored.values
        if every == 1:  # row 13 (edited weights) and each flush's last row (chunks of 8)
            assert stored[13] and stored[-1] and stored.sum() == 1 + len(range(7, 30, 8)) + 1
        else:
            assert stored.all()
        run = trajlab.open_run(store)
        n = run.n_steps  # the row reader (used by the analysis) decodes any row range alike
        np.testing.assert_array_equal(run.layer_rows("0", ["update"], (3, 11))["update"],
                                      ds["update"].values[3:11])
        np.testing.assert_array_equal(run.layer_rows("0", ["update"], (9, n))["update"],
                                      ds["update"].values[9:])


def test_derived_batch_gradient_of_rank1_layers_equals_dot_grad(tmp_path):
    """Rank-one layers do not store .grad; the store derives it from the factors."""
    torch.manual_seed(10)
    model = mlp64(10)
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt) as rec:
        for s in range(5):
            idx = torch.arange(8) + 8 * s
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            grads.append(model[2].weight.grad.clone().numpy())
            rec.log(indices=idx)
            opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert not run.layer_meta("2").stored_grad
    import zarr

    assert "grad" not in zarr.open_group(tmp_path / "r.zarr", mode="r")["layers/2"]
    np.testing.assert_allclose(run.layer("2").grad.values, np.stack(grads), rtol=1e-12,
                               atol=1e-15)


def test_weights_edited_through_data_between_steps_keep_updates_exact(tmp_path):
    """Edits that bypass autograd's version counter (p.data.clamp_) are still caught: the
    writer compares the weights bit for bit before deriving an update."""
    torch.manual_seed(11)
    model = mlp64(11)
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    truth = []
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt) as rec:
        for s in range(6):
            before = model[0].weight.detach().clone()
            idx = torch.arange(8) + 8 * s
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            rec.log(indices=idx)
            opt.step()
            truth.append((model[0].weight.detach() - before).numpy())
            model[0].weight.data.clamp_(-0.1, 0.1)  # WGAN-style clipping after the step
    ds = trajlab.open_run(tmp_path / "r.zarr").layer("0")
    np.testing.assert_array_equal(ds["update"].values, np.stack(truth))
    assert ds.update_stored.values.all()
