"""Lightning's default automatic optimisation (forward and backward inside
``optimizer.step(closure)``) with ``trajlab.integrations.lightning.RecorderCallback`` (issue 22,
item 3): accumulate_grad_batches, gradient_clip_val, bf16-mixed, both import names. Checked
against the weights and ``.grad`` the optimizer applied (read by a step hook of the test's own),
sigma_1 by numpy, and training without the callback."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trajlab
from trajlab.data.digits import load_digits

L = pytest.importorskip("lightning", reason="Lightning is not installed "
                        "(pip install trajlab[lightning])")


def make_module(pl):
    class DigitsMLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)  # a submodule, not self(x)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return DigitsMLP()


def fit(pl, tmp_path, store=None, *, precision="32-true", spy=None, **options):
    from trajlab.integrations.lightning import RecorderCallback

    pl.seed_everything(0, verbose=False)
    X, Y = load_digits(flatten=True, split="train")
    loader = DataLoader(TensorDataset(X[:128], Y[:128]), batch_size=16, shuffle=True)
    module = make_module(pl)
    callbacks = [RecorderCallback(store, **options)] if store is not None else []
    if spy is not None:
        callbacks.append(spy)
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=0.5,
                         precision=precision, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1,
                         default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return module


def spy_callback(pl, seen):
    """Reads, by a torch step hook of its own, the weight before each step and the .grad the
    optimizer applied (after Lightning's clipping)."""
    class Spy(pl.Callback):
        def on_train_start(self, trainer, module):
            opt = trainer.optimizers[0]
            w = module.net[0].weight

            def pre(o, args, kwargs):
                seen.append({"W": w.detach().clone()})

            def post(o, args, kwargs):
                seen[-1]["grad"] = w.grad.detach().clone()

            self.handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]

        def on_train_end(self, trainer, module):
            for h in self.handles:
                h.remove()

    return Spy()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_automatic_optimisation(tmp_path, precision):
    seen = []
    plain = fit(L, tmp_path, precision=precision)
    module = fit(L, tmp_path, tmp_path / "run.zarr", precision=precision,
                 spy=spy_callback(L, seen), loss_fn=F.cross_entropy)
    for a, b in zip(plain.state_dict().values(), module.state_dict().values()):
        assert torch.equal(a, b)  # bit-identical training
    run = trajlab.open_run(tmp_path / "run.zarr")
    assert run.steps.tolist() == [0, 1, 2, 3] and len(seen) == 4
    assert run.root.batch_size.values.tolist() == [32] * 4  # 2 micro-batches of 16
    assert run.meta.dataset_size == 128
    assert np.isfinite(run.root.loss.values).all()
    ds = run.layer("net.0")
    assert (ds.grad_scale.values < 1).all()  # gradient_clip_val clipped every step
    rtol = 1e-5 if precision == "32-true" else 5e-2
    for s, ref in enumerate(seen):
        W = ds.weight.values[s]
        np.testing.assert_array_equal(W, ref["W"].numpy())
        np.testing.assert_allclose(np.linalg.svd(W.astype(np.float64), compute_uv=False)[0],
                                   float(torch.linalg.matrix_norm(ref["W"].double(), 2)),
                                   rtol=1e-6)
        mean = trajlab.per_sample_gradients(run, "net.0", s).grads.astype(np.float64).mean(0)
        want = ref["grad"].double().numpy()
        assert np.abs(mean - want).max() <= rtol * np.abs(want).max()


def test_pytorch_lightning_import(tmp_path):
    pl = pytest.importorskip("pytorch_lightning", reason="pytorch_lightning is not installed")
    seen = []
    fit(pl, tmp_path, tmp_path / "run.zarr", spy=spy_callback(pl, seen))
    run = trajlab.open_run(tmp_path / "run.zarr")
    assert run.steps.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(run.layer("net.0").weight.values,
                                  torch.stack([r["W"] for r in seen]).numpy())


def test_manual_optimisation(tmp_path):
    """automatic_optimization = False: manual_backward and opt.step() in training_step are
    recorded like a plain loop (one step per opt.step(), the weights its hook saw)."""
    from trajlab.integrations.lightning import RecorderCallback

    class Manual(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            opt.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = []
    L.seed_everything(0, verbose=False)
    X, Y = load_digits(flatten=True, split="train")
    trainer = L.Trainer(max_epochs=1, callbacks=[RecorderCallback(tmp_path / "run.zarr"),
                                                 spy_callback(L, seen)],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1,
                        default_root_dir=str(tmp_path))
    module = Manual()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(TensorDataset(X[:64], Y[:64]), batch_size=16))
    run = trajlab.open_run(tmp_path / "run.zarr")
    assert run.steps.tolist() == [0, 1, 2, 3]
    assert run.root.batch_size.values.tolist() == [16] * 4
    np.testing.assert_array_equal(run.layer("net.0").weight.values,
                                  torch.stack([r["W"] for r in seen]).numpy())
    for s, ref in enumerate(seen):
        mean = trajlab.per_sample_gradients(run, "net.0", s).grads.astype(np.float64).mean(0)
        want = ref["grad"].double().numpy()
        assert np.abs(mean - want).max() <= 1e-5 * np.abs(want).max()
