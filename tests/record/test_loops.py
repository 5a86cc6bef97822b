"""The training loops people actually run: each works, against an independent reference, or is
refused with a message naming cause and remedy (dropout, autocast, GradScaler, accumulation,
skipped steps, clipping, param groups, momentum/Adam, BatchNorm, DataLoader, resume)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import mlp64, reference_per_sample_grads, user_metadata
from torch import nn
from torch.func import functional_call, grad, vmap

import trajlab

F64 = torch.float64


def _data(n=64, d=6, k=4, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=dtype),
            torch.randint(0, k, (n,), generator=g))


def _stored_per_sample(store, layer, step=0):
    return trajlab.per_sample_gradients(trajlab.open_run(store), layer, step).grads


# --------------------------------------------------------------------------- dropout
def test_dropout_self_check_replays_masks_and_per_sample_is_exact(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4)).double()
    X, Y = _data()
    masks = []
    model[2].register_forward_hook(
        lambda m, a, out: masks.append(torch.where(a[0] != 0, out / a[0], torch.zeros_like(out))))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    params0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, loss_fn=F.cross_entropy,
                          self_check=True) as rec:  # the one-sample check replays the masks
        x, y = X[:8], Y[:8]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        rec.log(loss=loss, inputs=x, targets=y)
        opt.step()
    mask = masks[0]  # the training forward's mask (the replay's comes after it)

    def loss_one(p, xi, yi, mi):
        h = torch.relu(xi @ p["0.weight"].T + p["0.bias"]) * mi
        return F.cross_entropy((h @ p["3.weight"].T + p["3.bias"])[None], yi[None])

    ref = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(params0, x, y, mask)
    for name in ("0", "3"):
        np.testing.assert_allclose(_stored_per_sample(tmp_path / "r.zarr", name),
                                   ref[f"{name}.weight"].detach().numpy(), rtol=1e-10,
                                   atol=1e-14)


class _Encoder(nn.Module):
    """PyTorch's TransformerEncoderLayer with its defaults (sequence-first, dropout 0.1)."""

    def __init__(self, dropout=0.1):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16,
                                              dropout=dropout)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (sequence, batch, features)
        return self.head(self.enc(x).mean(0))


def test_transformer_encoder_layer_with_defaults_records_with_loss_fn(tmp_path):
    torch.manual_seed(1)
    model = _Encoder().double()
    X = torch.randn(5, 32, 8, dtype=F64)
    Y = torch.randint(0, 3, (32,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rec = trajlab.Recorder(model, tmp_path / "t.zarr", optimizer=opt, loss_fn=F.cross_entropy)
    with rec:  # the one-sample check replays dropout; samples are on axis 1 inside the layer
        for s in range(3):
            x, y = X[:, 8 * s:8 * s + 8], Y[8 * s:8 * s + 8]
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            rec.log(loss=loss, inputs=x, targets=y)
            opt.step()
    run = trajlab.open_run(tmp_path / "t.zarr")
    assert run.n_steps == 3 and (run.root_rows(["batch_size"])["batch_size"] == 8).all()
    assert {"enc.linear1", "enc.linear2", "head"} <= set(run.layers)
    assert any("attention" in why for why in run.meta.model["not_a_bound"])


def test_sequence_first_layers_record_samples_not_positions(tmp_path):
    torch.manual_seed(21)
    model = _Encoder(dropout=0.0).double()
    X = torch.randn(5, 6, 8, dtype=F64)  # 5 positions, 6 samples
    Y = torch.randint(0, 3, (6,))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[:, None],)), yi[None])

    ref = vmap(grad(loss_one), in_dims=(None, 1, 0))(params, X, Y)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, rank=8,
                          loss_fn=F.cross_entropy) as rec:
        opt.zero_grad()
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        rec.log(loss=loss, inputs=X, targets=Y)
        opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    for name in ("enc.linear1", "enc.linear2", "head"):
        ps = trajlab.per_sample_gradients(run, name, 0)
        assert ps.grads.shape[0] == 6
        want = ref[f"{name}.weight"].numpy()
        np.testing.assert_allclose(ps.grads, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


# --------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_autocast_per_sample_within_the_precision(tmp_path, dtype, tol):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    X, Y = _data(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = reference_per_sample_grads(model.double(), F.cross_entropy, X[:8].double(), Y[:8])
    model.float()
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                          loss_fn=F.cross_entropy) as rec:
        for s in range(3):
            x, y = X[8 * s:8 * s + 8], Y[8 * s:8 * s + 8]
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            rec.log(loss=loss, inputs=x, targets=y)
            opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.n_steps == 3 and run.meta.dtype == "float32"
    for name in ("0", "2"):
        got = trajlab.per_sample_gradients(run, name, 0).grads
        want = ref[f"{name}.weight"].numpy()
        assert np.abs(got - want).max() / np.abs(want).max() < tol
    from trajlab.cli import format_info

    assert "integrity   ok" in format_info(tmp_path / "r.zarr")


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_autocast_transformer_layers_within_the_precision(tmp_path, dtype, tol):
    """Inside attention and over sequences the layers see float32 inputs and low-precision
    output gradients: every matrix is captured (none flagged), within the autocast precision."""
    torch.manual_seed(22)
    model = _Encoder(dropout=0.0)
    X = torch.randn(5, 6, 8)  # 5 positions, 6 samples
    Y = torch.randint(0, 3, (6,))
    ref_model = copy.deepcopy(model)
    params = {k: v.detach().clone() for k, v in ref_model.named_parameters()}

    def loss_one(p, xi, yi):  # the same autocast arithmetic, one sample at a time
        with torch.autocast("cpu", dtype=dtype):
            out = functional_call(ref_model, p, (xi[:, None],))
        return F.cross_entropy(out.float(), yi[None])

    ref = vmap(grad(loss_one), in_dims=(None, 1, 0))(params, X, Y)
    q, k, v = ref["enc.self_attn.in_proj_weight"].chunk(3, dim=1)
    want = {"enc.self_attn:q": q, "enc.self_attn:k": k, "enc.self_attn:v": v,
            "enc.self_attn:out": ref["enc.self_attn.out_proj.weight"],
            **{n: ref[f"{n}.weight"] for n in ("enc.linear1", "enc.linear2", "head")}}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no capture may fail
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, rank=8,
                              loss_fn=F.cross_entropy) as rec:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(model(X), Y)
            loss.backward()
            rec.log(loss=loss, inputs=X, targets=Y)
            opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    for name, w in want.items():
        assert not run.layer_rows(name, ["nonfinite"])["nonfinite"].any(), name
        got = trajlab.per_sample_gradients(run, name, 0).grads
        w = w.numpy()
        assert np.abs(got - w).max() / np.abs(w).max() < tol, name  # measured 8e-3 / 8e-4


def test_a_failed_capture_is_flagged_in_the_store(tmp_path, monkeypatch):
    """A capture that raises (here: forced) leaves its row NaN and flagged ``nonfinite``."""
    from trajlab.sketches.rank1 import Rank1

    def broken(self, act, delta, **kw):
        raise RuntimeError("forced capture failure")

    model = mlp64(5)
    X, Y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt) as rec:
        for s in range(3):
            if s == 1:
                monkeypatch.setattr(Rank1, "capture", broken)
            if s == 2:
                monkeypatch.undo()
            idx = torch.arange(8 * s, 8 * s + 8)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                rec.log(indices=idx)
                opt.step()
            if s == 1:
                assert any("forced capture failure" in str(w.message) for w in seen)
    run = trajlab.open_run(tmp_path / "r.zarr")
    for name in run.layers:
        np.testing.assert_array_equal(run.layer_rows(name, ["nonfinite"])["nonfinite"],
                                      [False, True, False])


def test_grad_scaler_divides_out_the_scale_and_skipped_steps_are_not_recorded(tmp_path):
    torch.manual_seed(3)
    model = mlp64(3).float()
    X, Y = _data(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    refs = []
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                          loss_fn=F.cross_entropy) as rec:
        for s in range(4):
            x, y = X[8 * s:8 * s + 8], Y[8 * s:8 * s + 8]
            if s != 2:
                refs.append(reference_per_sample_grads(model, F.cross_entropy, x, y))
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if s == 2:
                loss = loss * float("inf")  # overflow: the scaler skips this step
            scaler.scale(loss).backward()
            rec.log(loss=loss, inputs=x, targets=y, indices=torch.arange(8 * s, 8 * s + 8))
            scaler.step(opt)
            scaler.update()
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.n_steps == 3 and run.steps.tolist() == [0, 1, 2]  # optimizer steps taken
    assert run.root_rows(["indices"])["indices"][2, 0] == 24  # the skipped batch is not there
    scale = run.layer_rows("0", ["grad_scale"])["grad_scale"]
    np.testing.assert_allclose(scale[:2], 2.0**-10, rtol=1e-5)  # fitted in float32
    np.testing.assert_allclose(scale[2], 2.0**-9, rtol=1e-5)  # scale halved after the overflow
    for row, ref in enumerate(refs):
        for name in ("0", "2"):
            got = trajlab.per_sample_gradients(run, name, row).grads
            np.testing.assert_allclose(got, ref[f"{name}.weight"].numpy(), rtol=1e-4,
                                       atol=1e-6)


# --------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_records_one_batch_of_all_micro_batches(tmp_path):
    torch.manual_seed(4)
    model = mlp64(4)
    X, Y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    K = 3
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                          loss_fn=F.cross_entropy) as rec:
        for step in range(2):
            opt.zero_grad()
            idx_all = []
            for k in range(K):
                idx = torch.arange(12 * step + 4 * k, 12 * step + 4 * k + 4)
                idx_all.append(idx)
                if step == 0 and k == 0:
                    ref = reference_per_sample_grads(model, F.cross_entropy,
                                                     X[torch.arange(12)], Y[torch.arange(12)])
                loss = F.cross_entropy(model(X[idx]), Y[idx]) / K
                loss.backward()
                rec.log(loss=loss * K, indices=idx, inputs=X[idx], targets=Y[idx])
            applied = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            if step == 0:
                first_applied = applied
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.n_steps == 2
    np.testing.assert_array_equal(run.root_rows(["batch_size"])["batch_size"], [12, 12])
    np.testing.assert_array_equal(run.root_rows(["indices"])["indices"][0], np.arange(12))
    for name in ("0", "2"):
        ps = trajlab.per_sample_gradients(run, name, 0)
        np.testing.assert_allclose(ps.grads, ref[f"{name}.weight"].numpy(), rtol=1e-10,
                                   atol=1e-14)
        np.testing.assert_allclose(ps.grads.mean(0), first_applied[f"{name}.weight"].numpy(),
                                   rtol=1e-10, atol=1e-15)


def test_accumulation_without_dividing_the_loss_is_named(tmp_path):
    model = mlp64(5)
    X, Y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(trajlab.SelfCheckError, match="number of micro-batches"):
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                              loss_fn=F.cross_entropy) as rec:
            opt.zero_grad()
            for k in range(2):
                x, y = X[4 * k:4 * k + 4], Y[4 * k:4 * k + 4]
                F.cross_entropy(model(x), y).backward()  # not divided by 2
                rec.log(inputs=x, targets=y)
            opt.step()


def test_skipping_the_step_on_a_non_finite_loss_starts_a_new_step(tmp_path):
    """forward, backward, no opt.step(), zero_grad(), a new batch, step: recorded as the new
    batch alone (the stale backward is dropped)."""
    torch.manual_seed(6)
    model = mlp64(6)
    X, Y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                          loss_fn=F.cross_entropy) as rec:
        for s in range(4):
            idx = torch.arange(8 * s, 8 * s + 8)
            if s == 2:
                ref = reference_per_sample_grads(model, F.cross_entropy, X[idx], Y[idx])
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            if s == 1:
                continue  # "if not torch.isfinite(loss): continue" took this branch
            opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.n_steps == 3
    np.testing.assert_array_equal(run.root_rows(["indices"])["indices"][1], np.arange(16, 24))
    np.testing.assert_allclose(trajlab.per_sample_gradients(run, "0", 1).grads,
                               ref["0.weight"].numpy(), rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- clipping
def test_clipping_that_starts_later_is_recorded_as_applied(tmp_path):
    torch.manual_seed(7)
    model = mlp64(7)
    X, Y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    applied = []
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                          loss_fn=F.cross_entropy) as rec:
        for s in range(8):
            idx = torch.arange(8 * s, 8 * s + 8)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            if s >= 4:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            applied.append(model[0].weight.grad.clone())
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    scale = run.layer_rows("0", ["grad_scale"])["grad_scale"]
    assert (scale[:4] == 1.0).all()  # no rescale: exactly 1, the captures stored as they are
    assert (scale[4:] < 1).all()
    for row in range(8):
        ps = trajlab.per_sample_gradients(run, "0", row)
        np.testing.assert_allclose(ps.grads.mean(0), applied[row].numpy(), rtol=1e-10,
                                   atol=1e-15)


def test_float32_loop_without_rescaling_records_scale_exactly_one(tmp_path):
    """The probe fit's rounding (1-4 float32 ulps) is not recorded as a scale; real clipping is."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))
    X, Y = _data(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                          loss_fn=F.cross_entropy) as rec:
        for s in range(6):
            idx = torch.arange(8 * s, 8 * s + 8)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            if s >= 3:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    for layer in run.layers:
        scale = run.layer_rows(layer, ["grad_scale"])["grad_scale"]
        assert (scale[:3] == 1.0).all(), scale
        assert (scale[3:] < 0.5).all(), scale


def test_elementwise_grad_edit_is_refused_clearly_and_keeps_committed_steps(tmp_path):
    X, Y = _data()

    def run(store, edit_at, **kw):
        model = mlp64(8)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with trajlab.Recorder(model, store, optimizer=opt, flush_seconds=0, **kw) as rec:
            for s in range(5):
                idx = torch.arange(8 * s, 8 * s + 8)
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), Y[idx]).backward()
                if s >= edit_at:
                    torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
                rec.log(indices=idx)
                opt.step()

    with pytest.raises(trajlab.SelfCheckError, match="clip_grad_value_"):
        run(tmp_path / "a.zarr", 0)  # first step: fail fast
    with pytest.warns(RuntimeWarning, match="do not explain its .grad.*training continues"):
        run(tmp_path / "b.zarr", 3)
    kept = trajlab.open_run(tmp_path / "b.zarr")
    assert kept.n_steps == 3 and "clip_grad_value_" in kept.meta.truncated


# --------------------------------------------------------------------------- predictions
def _train(model, opt, X, Y, store, *, steps, batch=16, clip=None, sched=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    # the forward prediction's expected gradient: the full-data probe (docs/math.md 8)
    probe = trajlab.FullGradientProbe([(X, Y)], F.cross_entropy, every=1)
    with trajlab.Recorder(model, store, optimizer=opt, loss_fn=F.cross_entropy, probe=probe,
                          sampler="with_replacement", metadata={"optimizer": type(opt).__name__}
                          ) as rec:
        for _ in range(steps):
            idx = torch.randint(0, len(X), (batch,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
            if sched is not None:
                sched.step()
    return trajlab.analyze(store, scheduler="synchronous", progress=False)


def _within(pred: float, meas: float, bar: float = 1.5) -> bool:
    """The validation study's bar: predicted and measured change within a factor ``bar``."""
    return np.sign(pred) == np.sign(meas) and 1 / bar <= pred / meas <= bar


def _assert_predictions(ds, bar=1.5):
    first, last = ds.isel(step=0), ds.isel(step=-1)
    for layer in ds.layer.values:
        meas = float(last.K.sel(layer=layer) - first.K.sel(layer=layer))
        pred = float(last.K_pred_mean.sel(layer=layer) - first.K.sel(layer=layer))
        assert _within(pred, meas, bar), (layer, pred, meas)
    meas = float(last.logK - first.logK)
    pred = float(last.logK_pred_mean - first.logK)
    assert _within(pred, meas, bar), ("network", pred, meas)


def _growing_problem(seed):
    torch.manual_seed(seed)
    X = torch.randn(256, 6, dtype=F64)
    Y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()
    return X, Y


def test_two_param_groups_with_a_scheduler_predict_within_the_bar(tmp_path):
    X, Y = _growing_problem(10)
    model = mlp64(10)
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.02},
                           {"params": model[2].parameters(), "lr": 0.1}], lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)
    ds = _train(model, opt, X, Y, tmp_path / "r.zarr", steps=60, sched=sched)
    np.testing.assert_allclose(ds.lr.sel(layer="0").values[:30], 0.02)
    np.testing.assert_allclose(ds.lr.sel(layer="2").values[30:], 0.05)
    np.testing.assert_allclose(ds.dt.sel(layer="2"), ds.lr.sel(layer="2"))
    _assert_predictions(ds)


def test_clipping_from_step_one_is_said_to_be_unmodelled(tmp_path):
    X, Y = _growing_problem(11)
    model = mlp64(11)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = _train(model, opt, X, Y, tmp_path / "r.zarr", steps=60, clip=0.2)
    assert (ds.grad_scale < 1).any()
    assert "does not model clipping" in ds.attrs["prediction"]  # said, until it is modelled
    # the forward prediction leaves out clipping's batch-dependent factor (docs/math.md 8b) and
    # overstates the drift ~3x here; once clipping is modelled, assert the bar instead
    with pytest.raises(AssertionError):
        _assert_predictions(ds)


@pytest.mark.parametrize("which", ["momentum", "adam"])
def test_momentum_and_adam_default_prediction_within_the_bar(tmp_path, which):
    X, Y = _growing_problem(12)
    model = mlp64(12)
    opt = (torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9) if which == "momentum"
           else torch.optim.Adam(model.parameters(), lr=3e-3))
    ds = _train(model, opt, X, Y, tmp_path / "r.zarr", steps=60)
    _assert_predictions(ds)
    assert "optimizer that was used" in ds.attrs["prediction"]
    if which == "adam":  # the paper's SGD-only SDE is far off for Adam: it is kept apart
        meas = float(ds.logK[-1] - ds.logK[0])
        sgd = float(ds.logK_pred_mean_sgd[-1] - ds.logK[0])
        assert not _within(sgd, meas, 1.5)


# --------------------------------------------------------------------------- BatchNorm
def test_batchnorm_is_refused_up_front_and_weights_only_mode_analyses(tmp_path):
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.Linear(16, 4)).double()
    X, Y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(trajlab.RecorderError, match="mix the samples.*per_sample=False"):
        trajlab.Recorder(model, tmp_path / "a.zarr", optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rec = trajlab.Recorder(model, tmp_path / "w.zarr", optimizer=opt, per_sample=False)
    applied = []
    with rec:
        for s in range(6):
            idx = torch.arange(8 * s, 8 * s + 8)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            applied.append(model[0].weight.grad.clone())
            rec.log(indices=idx)
            opt.step()
    run = trajlab.open_run(tmp_path / "w.zarr")
    assert {run.layer_meta(n).sketch for n in run.layers} == {"none"}
    np.testing.assert_array_equal(run.layer_rows("0", ["grad"])["grad"], torch.stack(
        applied).numpy())
    ds = trajlab.analyze(run, scheduler="synchronous", progress=False)
    for k in ("K", "drift_flow", "pathwise_increment"):
        assert np.isfinite(ds[k].values).all(), k
    assert np.isnan(ds.drift_noise.values).all() and np.isnan(ds.logK_diffusion2.values).all()
    assert "per_sample=False" in ds.attrs["noise"]
    assert np.isfinite(ds.K_pathwise.values).all()
    # no prediction without the noise terms: NaN after the start, as the attrs say (a NaN rate
    # counted as 0 drew a flat prediction, silently)
    for k in ("K_pred_mean", "logK_pred_mean", "logK_pred_var", "K_net_pred_upper"):
        assert np.isnan(ds[k].values[1:]).all(), k


# --------------------------------------------------------------------------- DataLoader
def test_dataloader_with_indices_and_a_probe_over_the_same_loader(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(14)
    X, Y = _data()
    model = mlp64(14)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(trajlab.WithIndices(TensorDataset(X, Y)), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    probe = trajlab.FullGradientProbe(loader, F.cross_entropy, every=2)
    seen = []
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, probe=probe,
                          sampler="reshuffle", dataset_size=len(X)) as rec:
        for x, y, idx in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            rec.log(loss=loss, indices=idx)
            seen.append(idx.clone())
            opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(run.root_rows(["indices"])["indices"],
                                  torch.stack(seen).numpy())
    np.testing.assert_array_equal(run.root_rows(["probe"])["probe"], [True, False, True, False])
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        trajlab.FullGradientProbe([X], F.cross_entropy).gradient(model, [model[0].weight])


# --------------------------------------------------------------------------- resume
def test_resume_with_weights_not_restored_warns(tmp_path):
    X, Y = _data()
    model = mlp64(15)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def steps(n, rec):
        for s in range(n):
            idx = torch.arange(8 * s, 8 * s + 8)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            rec.log(indices=idx)
            opt.step()

    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt) as rec:
        steps(3, rec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # continuing exactly: no warning
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, mode="a") as rec:
            steps(2, rec)
    with torch.no_grad():
        model[0].weight.add_(0.1)  # "restored" from the wrong checkpoint
    with pytest.warns(RuntimeWarning, match=r"step 4\).*start_step=") as seen:
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, mode="a") as rec:
            steps(1, rec)
    assert seen[0].filename == __file__  # attributed to the user's line, not to torch's hook
    with pytest.raises(trajlab.RecorderError, match="every=1.*every=2"):
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, mode="a", every=2):
            pass


def test_a_gap_in_the_steps_is_not_integrated_across(tmp_path):
    """Resumed from a later checkpoint with start_step: the analysis refuses the gap and names
    the parts, each of which analyses."""
    X, Y = _data()
    model = mlp64(18)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for start, mode in ((None, "w-"), (10, "a")):
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, mode=mode,
                              start_step=start) as rec:
            for s in range(3):
                idx = torch.arange(8 * s, 8 * s + 8)
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), Y[idx]).backward()
                rec.log(indices=idx)
                opt.step()
    np.testing.assert_array_equal(trajlab.open_run(tmp_path / "r.zarr").steps,
                                  [0, 1, 2, 10, 11, 12])
    with pytest.raises(ValueError, match=r"step 2 is followed by step 10.*steps=\(0, 3\) and "
                                         r"steps=\(10, 13\)"):
        trajlab.analyze(tmp_path / "r.zarr", scheduler="synchronous", progress=False)
    for part in ((0, 3), (10, 13)):
        ds = trajlab.analyze(tmp_path / "r.zarr", steps=part, scheduler="synchronous",
                             progress=False)
        np.testing.assert_array_equal(ds.step.values, np.arange(*part))


# --------------------------------------------------------------------------- misc
def test_close_names_the_real_cause(tmp_path):
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="ZeroDivisionError"):
        with pytest.raises(ZeroDivisionError):
            with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt):
                1 / 0


def test_k_net_attrs_name_the_covered_layers_and_when_it_is_not_a_bound(tmp_path):
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 4)).double()
    X, Y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds = _train(model, opt, X, Y, tmp_path / "r.zarr", steps=3)
    text = ds.attrs["k_net"]
    assert "NOT a Lipschitz bound" in text and "normalisation" in text
    assert all(f"{n}" in text for n in ("0", "3"))


def test_transformer_coverage_counts_each_weight_once(tmp_path):
    """Attention's out_proj counts with its module, normalisation scales are not weight
    matrices: the summary and K_net's attrs say 100%, never more."""
    torch.manual_seed(17)
    model = _Encoder(dropout=0.0).double()
    X = torch.randn(5, 16, 8, dtype=F64)
    Y = torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt) as rec:
        for s in range(2):
            opt.zero_grad()
            F.cross_entropy(model(X[:, 8 * s:8 * s + 8]), Y[8 * s:8 * s + 8]).backward()
            opt.step()
    for e in rec.summary["modules"]:
        assert e.get("recorded_parameters", 0) <= e["parameters"], e
    attn = next(e for e in rec.summary["modules"] if e["name"] == "enc.self_attn")
    mha = model.enc.self_attn
    assert attn["parameters"] == sum(p.numel() for p in mha.parameters())
    ds = trajlab.analyze(tmp_path / "r.zarr", scheduler="synchronous", progress=False)
    total = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert f"{total} of the model's {total} weight-matrix parameters (100%)" in ds.attrs["k_net"]
    assert "and 2 normalisation scales" in ds.attrs["k_net"]


def test_mixed_precision_layers_and_frozen_layers_pass_the_self_check(tmp_path):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8).double()
            self.b = nn.Linear(8, 4)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)).float())

    torch.manual_seed(17)
    model = Mixed()
    model.a.weight.requires_grad_(False)
    model.a.bias.requires_grad_(False)
    X, Y = _data()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with pytest.warns(UserWarning, match=r"a \(Linear: frozen"):
        rec = trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                               loss_fn=F.cross_entropy)
    with rec:
        for s in range(2):
            x, y = X[8 * s:8 * s + 8], Y[8 * s:8 * s + 8]
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            rec.log(loss=loss, inputs=x, targets=y)
            opt.step()
    assert trajlab.open_run(tmp_path / "r.zarr").layers == ("b",)


def test_model_dtype_changed_mid_run_stops_recording_and_keeps_earlier_steps(tmp_path):
    model = mlp64(18)
    X, Y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(RuntimeWarning, match="now float32.*stores float64"):
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt) as rec:
            for s in range(6):
                if s == 3:
                    model.float()
                idx = torch.arange(8 * s, 8 * s + 8)
                opt.zero_grad()
                F.cross_entropy(model(X[idx].to(model[0].weight.dtype)), Y[idx]).backward()
                rec.log(indices=idx)
                opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.n_steps == 3 and "float32" in run.meta.truncated


# --------------------------------------------------------------------------- torch.compile
def _compiled_run(store, backend):
    X, Y = _data()
    model = mlp64(19)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    m = torch.compile(model, backend=backend) if backend else model
    with trajlab.Recorder(m, store, optimizer=opt, loss_fn=F.cross_entropy) as rec:
        for s in range(3):
            idx = torch.arange(8 * s, 8 * s + 8)
            opt.zero_grad()
            loss = F.cross_entropy(m(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
    return trajlab.open_run(store)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor",
                                                               marks=pytest.mark.slow)])
def test_a_compiled_module_is_recorded_like_the_uncompiled_one(tmp_path, backend):
    torch._dynamo.reset()
    plain = _compiled_run(tmp_path / "plain.zarr", None)
    comp = _compiled_run(tmp_path / "comp.zarr", backend)
    assert comp.n_steps == 3
    for name in plain.layers:
        a, b = plain.layer(name).compute(), comp.layer(name).compute()
        for v in ("weight", "ps_input", "ps_grad_out", "update"):
            np.testing.assert_allclose(b[v].values, a[v].values, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- bit-identical
def _loop(kind, model, opt, X, Y, rec=None, steps=4):
    """One of the practices above, step for step; returns nothing (mutates model/opt)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if kind == "scaler" else None
    for s in range(steps):
        idx = torch.arange(8 * s, 8 * s + 8)
        opt.zero_grad()
        if kind == "accumulation":
            for k in range(2):
                j = idx[4 * k:4 * k + 4]
                loss = F.cross_entropy(model(X[j]), Y[j]) / 2
                loss.backward()
                if rec is not None:
                    rec.log(loss=loss, indices=j, inputs=X[j], targets=Y[j])
            opt.step()
            continue
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "autocast"):
            loss = F.cross_entropy(model(X[idx]), Y[idx])
        (scaler.scale(loss) if scaler else loss).backward()
        if kind == "clipping":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        if rec is not None:
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


@pytest.mark.parametrize("kind", ["dropout", "autocast", "scaler", "accumulation", "clipping",
                                  "groups", "adam"])
def test_training_is_bit_identical_with_the_recorder(tmp_path, kind):
    def make():
        torch.manual_seed(20)
        layers = [nn.Linear(6, 16), nn.ReLU()]
        if kind == "dropout":
            layers.append(nn.Dropout(0.3))
        model = nn.Sequential(*layers, nn.Linear(16, 4))
        if kind == "groups":
            opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.02},
                                   {"params": model[-1].parameters(), "lr": 0.1}])
        elif kind == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt

    X, Y = _data(dtype=torch.float32)
    plain, opt = make()
    torch.manual_seed(99)
    _loop(kind, plain, opt, X, Y)
    model, opt = make()
    torch.manual_seed(99)
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                          loss_fn=F.cross_entropy) as rec:
        _loop(kind, model, opt, X, Y, rec)
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b), kind
    assert trajlab.open_run(tmp_path / "r.zarr").n_steps == 4


def test_small_misuses_are_named(tmp_path, capsys):
    """log() outside the with block, indices beyond dataset_size, a layer name given as a string,
    numpy scalars in metadata, and --out X.zarr for several runs."""
    X, Y = _data()
    model = mlp64(19)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = trajlab.Recorder(model, tmp_path / "n.zarr", optimizer=opt)
    with pytest.raises(trajlab.RecorderError, match="outside the recorder's `with` block"):
        rec.log(indices=torch.arange(8))
    with pytest.raises(ValueError, match=r"indices 0..15 but dataset_size=10"):
        with trajlab.Recorder(model, tmp_path / "d.zarr", optimizer=opt, dataset_size=10) as rec:
            F.cross_entropy(model(X[:16]), Y[:16]).backward()
            rec.log(indices=torch.arange(16))
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, layers="2",
                          metadata={"lr": np.float32(0.5), "seed": np.int64(3),
                                    "scale": torch.tensor(2.0)}) as rec:
        for s in range(2):
            opt.zero_grad()
            F.cross_entropy(model(X[8 * s:8 * s + 8]), Y[8 * s:8 * s + 8]).backward()
            rec.log(indices=torch.arange(8 * s, 8 * s + 8))
            opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert list(run.layers) == ["2"]
    assert user_metadata(run) == {"lr": 0.5, "seed": 3, "scale": 2.0}
    ds = trajlab.analyze(run, layers="2", scheduler="synchronous", progress=False)
    assert list(ds.layer.values) == ["2"]
    from trajlab.cli import main as cli_main

    assert cli_main(["analyze", str(tmp_path / "r.zarr"), str(tmp_path / "b.zarr"), "--out",
                     str(tmp_path / "two.zarr"), "--quiet"]) == 2
    assert "looks like one store's name" in capsys.readouterr().err
    assert not (tmp_path / "two.zarr").exists()
