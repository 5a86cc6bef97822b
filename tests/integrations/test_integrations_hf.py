"""Hugging Face models in a plain training loop (issue 22, item 1), and accelerate's prepared
model and optimizer (item 4). Every check is against an independent computation: torch.func
per-sample gradients, the weights as trained, sigma_1 by numpy's SVD, training without the
recorder."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import trajlab

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install trajlab[hf])")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

B, T, V = 4, 6, 50


def gpt2(seed=0, dropout=0.0, dtype=torch.float64):
    """GPT-2 from its default config class, 2 layers x 32 wide."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=16,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout,
                     attn_pdrop=dropout)
    return GPT2LMHeadModel(cfg).to(dtype)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, T), generator=g) for _ in range(n)]


def lm_loss(out, y):
    """The causal LM loss from the logits (what GPT2LMHeadModel computes internally)."""
    logits = out.logits if hasattr(out, "logits") else out["logits"]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())


def train(model, xs, *, store=None, per_sample_positions=False, clip=0.5, loss_fn=None,
          snapshots=None, clip_coefs=None, internal=True, **options):
    """AdamW + linear warm-up + clip_grad_norm_ on the model's own loss (``internal``: a mean
    over tokens, computed in float32 by transformers) or ``lm_loss`` in the model's dtype."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    rec = (trajlab.Recorder(model, store, optimizer=opt, loss_fn=loss_fn, **options)
           if store is not None else None)
    if rec is not None:
        rec.__enter__()
    try:
        for x in xs:
            kw = {"position_ids": torch.arange(T).expand(B, T)} if per_sample_positions else {}
            if snapshots is not None:
                snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
            opt.zero_grad()
            if internal:
                out = model(input_ids=x, labels=x, **kw)
            else:
                out = model(input_ids=x, **kw)
                out.loss = lm_loss(out, x)
            out.loss.backward()
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if clip_coefs is not None:
                clip_coefs.append(min(1.0, clip / (float(total) + 1e-6)))
            if rec is not None:
                rec.log(loss=out.loss, inputs={"input_ids": x, **kw}, targets=x)
            opt.step()
            sched.step()
    finally:
        if rec is not None:
            rec.__exit__(None, None, None)
    return model, rec


def per_sample_reference(model, params, x, names):
    """torch.func per-sample gradients of each sample's own loss (mean over its tokens)."""
    def loss_one(p, xi):
        out = functional_call(model, {**params, **p}, (), {"input_ids": xi[None]})
        return lm_loss(out, xi[None])

    p = {n: params[n] for n in names}
    return vmap(grad(loss_one), in_dims=(None, 0))(p, x)


def test_gpt2_plain_loop_unchanged(tmp_path):
    """GPT-2 as built by transformers (float64), AdamW + warm-up + clipping: tied wte/lm_head
    and the broadcast wpe are left out with warnings that name them, every Conv1D is recorded
    by its rule, the stored weights are the trained ones (sigma_1 by numpy), the stored
    per-sample projections equal torch.func's, and training is bit-identical without the
    recorder."""
    xs = batches(3)
    ref, _ = train(gpt2(), xs, internal=False)
    snaps, coefs = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, rec = train(gpt2(), xs, store=tmp_path / "run.zarr", loss_fn=lm_loss,
                           snapshots=snaps, clip_coefs=coefs, internal=False)
    text = [str(w.message) for w in caught]
    assert any("transformer.wte.weight = lm_head.weight" in t for t in text), text
    assert any("'transformer.wpe' not recorded" in t and "(1, T)" in t for t in text), text
    assert not any("generic fallback" in t or "SelfCheck" in t for t in text), text
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # bit-identical training
    why = {e["name"]: e.get("why", "") for e in rec.summary["modules"] if not e["recorded"]}
    assert "tied" in why["lm_head"] and "tied" in why["transformer.wte"]
    assert "broadcast" in why["transformer.wpe"]

    run = trajlab.open_run(tmp_path / "run.zarr")
    conv = [n for n in run.layers if n.endswith(("c_attn", "c_proj", "c_fc"))]
    assert len(conv) == 8 and all(run.layer_meta(n).module == "Conv1D" for n in conv)
    assert set(run.layers) == set(conv) | {f"transformer.h.{i}.ln_{j}" for i in (0, 1)
                                           for j in (1, 2)} | {"transformer.ln_f"}
    for name in conv:
        ds = run.layer(name)
        for s in range(3):
            W = snaps[s][f"{name}.weight"].T.numpy()  # Conv1D stores (in, out)
            np.testing.assert_array_equal(ds.weight.values[s], W)
            np.testing.assert_allclose(np.linalg.svd(ds.weight.values[s], compute_uv=False)[0],
                                       float(torch.linalg.matrix_norm(torch.from_numpy(W), 2)),
                                       rtol=1e-12)
    # step 1's per-sample information against torch.func at the weights before step 1, times
    # the clip coefficient the loop applied
    params = {n: p.detach() for n, p in gpt2().named_parameters()}
    params = {n: snaps[1][n] for n in params}
    names = [f"{n}.weight" for n in conv]
    want = per_sample_reference(copy.deepcopy(model), params, xs[1], names)
    for name in conv:
        G = (coefs[1] * want[f"{name}.weight"].transpose(1, 2)).numpy()  # (B, out, in)
        ds = run.layer(name).isel(step=1)
        U, Vb = ds.basis_u.values, ds.basis_v.values
        scale = np.abs(G).max()
        np.testing.assert_allclose(ds.ps_proj_out.values[:B], G @ Vb, atol=1e-9 * scale)
        np.testing.assert_allclose(ds.ps_proj_in.values[:B], G.transpose(0, 2, 1) @ U,
                                   atol=1e-9 * scale)


def test_internal_loss_float32(tmp_path):
    """The model's own loss (``model(input_ids=x, labels=x).loss``, a mean over tokens in
    float32) with gradient accumulation over 2 micro-batches: the self-check with
    ``causal_lm_loss`` passes and the stored projections of step 0 equal torch.func's
    (float32 precision)."""
    from trajlab.integrations.hf import causal_lm_loss

    model = gpt2(dtype=torch.float32)
    before = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    xs = batches(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                              loss_fn=causal_lm_loss) as rec:
            for x in xs:
                out = model(input_ids=x, labels=x)
                (out.loss / 2).backward()
                rec.log(loss=out.loss, inputs={"input_ids": x}, targets=x)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
            opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert int(run.root.batch_size[0]) == 2 * B
    params = {n: p.detach() for n, p in before.named_parameters()}
    name = "transformer.h.1.mlp.c_fc"

    def loss_one(p, xi):
        out = functional_call(before, {**params, **p}, (), {"input_ids": xi[None],
                                                            "labels": xi[None]})
        return out.loss

    G = vmap(grad(loss_one), in_dims=(None, 0))({f"{name}.weight": params[f"{name}.weight"]},
                                                torch.cat(xs))[f"{name}.weight"]
    G = G.transpose(1, 2).double().numpy()
    ds = run.layer(name).isel(step=0)
    scale = np.abs(G @ ds.basis_v.values).max()
    np.testing.assert_allclose(ds.ps_proj_out.values[:2 * B], G @ ds.basis_v.values,
                               atol=1e-4 * scale)


def test_position_ids_per_sample_record_wpe(tmp_path):
    """With position_ids of shape (B, T) the positional embedding is recorded; the first
    step's self-check (sample 0 recomputed with loss_fn, dropout replayed) passes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, rec = train(gpt2(dropout=0.1, dtype=torch.float32), batches(2),
                       store=tmp_path / "run.zarr", per_sample_positions=True, loss_fn=lm_loss)
    assert "transformer.wpe" in rec.layer_names
    assert not any("wpe" in str(w.message) for w in caught)


def test_loss_fn_receives_the_models_output_type(tmp_path):
    """The self-check cuts the output to sample 0 keeping its type: a ModelOutput (attribute
    access), a tuple (return_dict=False), a dict from a custom model; a loss_fn that reads
    the batch's own mean loss gets a SelfCheckError naming it."""
    seen = []

    def via_attr(out, y):
        seen.append(type(out).__name__)
        assert out.logits.shape[0] == 1 and out.loss is None
        return lm_loss(out, y)

    train(gpt2(), batches(1), store=tmp_path / "a.zarr", loss_fn=via_attr, internal=False)
    assert seen == ["CausalLMOutputWithCrossAttentions"]

    class Tupled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = gpt2()

        def forward(self, input_ids, labels=None, **kw):
            return self.inner(input_ids=input_ids, labels=labels, return_dict=False, **kw)

    model = Tupled()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = batches(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with trajlab.Recorder(model, tmp_path / "b.zarr", optimizer=opt,
                              loss_fn=lambda out, y: lm_loss({"logits": out[0]}, y)) as rec:
            loss = lm_loss({"logits": model(x)[0]}, x)
            loss.backward()
            rec.log(loss=loss, inputs={"input_ids": x}, targets=x)
            opt.step()

    class Dicted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).double()

        def forward(self, x):
            return {"logits": self.lin(x), "aux": torch.zeros(())}

    model = Dicted()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    X, Y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    with trajlab.Recorder(model, tmp_path / "c.zarr", optimizer=opt,
                          loss_fn=lambda o, y: F.cross_entropy(o["logits"], y)) as rec:
        loss = F.cross_entropy(model(X)["logits"], Y)
        loss.backward()
        rec.log(loss=loss, inputs=X, targets=Y)
        opt.step()

    with pytest.raises(trajlab.SelfCheckError, match="ModelOutput's loss, set to None"):
        train(gpt2(), batches(1), store=tmp_path / "d.zarr", loss_fn=lambda out, y: out.loss,
              internal=False)


def test_tied_weight_selected_explicitly_is_an_error(tmp_path):
    model = gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="tied.*transformer.wte.weight and lm_head.weight"):
        trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, layers=["lm_head"])


def test_conv1d_rule_exact_on_features(tmp_path):
    """Conv1D on (batch, features): exact rank-one factors, equal to torch.func's per-sample
    gradients of weight.T; registered without trajlab importing transformers."""
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 3), nn.Tanh(), Conv1D(2, 5)).double()
    X, Y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    before = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                          loss_fn=F.cross_entropy) as rec:
        loss = F.cross_entropy(model(X), Y)
        loss.backward()
        rec.log(loss=loss, inputs=X, targets=Y)
        opt.step()
    run = trajlab.open_run(tmp_path / "r.zarr")
    params = {k: v.detach() for k, v in before.named_parameters()}

    def loss_one(p, x, y):
        return F.cross_entropy(functional_call(before, p, (x[None],)), y[None])

    want = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, X, Y)
    for name in ("0", "2"):
        assert run.layer_meta(name).sketch == "rank1"
        got = trajlab.per_sample_gradients(run, name, 0)
        assert got.exact
        np.testing.assert_allclose(got.grads, want[f"{name}.weight"].transpose(1, 2).numpy(),
                                   rtol=1e-10, atol=1e-14)


def test_trajlab_never_imports_transformers():
    code = ("import torch; torch.set_num_threads(1); import sys, trajlab, trajlab.record.rules;"
            "from trajlab.integrations import hf, lightning;"
            "from torch import nn; trajlab.record.rules.rule_for(nn.Linear(2, 2));"
            "bad = [m for m in ('transformers', 'accelerate', 'lightning', 'pytorch_lightning')"
            " if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- Trainer
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=24, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, V, (n, T), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _trainer(tmp_path, callbacks, steps=4):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=B,
        gradient_accumulation_steps=2, learning_rate=1e-2, warmup_steps=2, max_grad_norm=0.5,
        max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, dataloader_num_workers=0, disable_tqdm=True)
    torch.manual_seed(0)
    return Trainer(model=gpt2(dtype=torch.float32), args=args, train_dataset=_Tokens(),
                   callbacks=callbacks)


def test_trainer_callback(tmp_path):
    """transformers.Trainer (AdamW, warm-up, max_grad_norm clipping, 2 micro-batches per
    step) with RecorderCallback: one recorded step per optimizer step holding both
    micro-batches, the weights as the optimizer saw them (sigma_1 by numpy), the per-sample
    information whose mean is .grad as applied (after clipping), the lr the step used, the
    Trainer's own logged loss, the dataset size; training bit-identical without it."""
    from transformers import TrainerCallback

    from trajlab.integrations.hf import RecorderCallback

    seen = []

    class Spy(TrainerCallback):  # what the optimizer is about to apply, read independently
        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None,
                                  **kw):
            m = model.transformer.h[1].mlp.c_fc
            seen.append({"W": m.weight.detach().T.clone(), "grad": m.weight.grad.T.clone(),
                         "lr": optimizer.param_groups[0]["lr"]})

    plain = _trainer(tmp_path, [])
    plain.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = _trainer(tmp_path, [RecorderCallback(tmp_path / "run.zarr"), Spy()])
        rec.train()
    for a, b in zip(plain.model.state_dict().values(), rec.model.state_dict().values()):
        assert torch.equal(a, b)
    run = trajlab.open_run(tmp_path / "run.zarr")
    assert run.steps.tolist() == [0, 1, 2, 3]
    assert run.root.batch_size.values.tolist() == [2 * B] * 4
    assert run.meta.dataset_size == 24
    logged = [h["loss"] for h in rec.state.log_history if "loss" in h]
    np.testing.assert_allclose(run.root.loss.values, logged, atol=1e-4)
    ds = run.layer("transformer.h.1.mlp.c_fc")
    for s, ref in enumerate(seen):
        W = ds.weight.values[s]
        np.testing.assert_array_equal(W, ref["W"].numpy())
        np.testing.assert_allclose(np.linalg.svd(W.astype(np.float64), compute_uv=False)[0],
                                   float(torch.linalg.matrix_norm(ref["W"].double(), 2)),
                                   rtol=1e-6)
        assert float(ds.lr.values[s]) == ref["lr"]
        Vb = ds.basis_v.values[s]
        mean = ds.ps_proj_out.values[s, :2 * B].astype(np.float64).mean(0)
        want = ref["grad"].double().numpy() @ Vb
        np.testing.assert_allclose(mean, want, atol=1e-5 * np.abs(want).max())
    assert (ds.grad_scale.values < 1).all()  # max_grad_norm clipped every step


# ----------------------------------------------------------------------------- accelerate
def test_accelerate_prepared_model_and_optimizer(tmp_path):
    """A model and optimizer from accelerator.prepare in the plain Recorder, with
    accelerator.accumulate and clip_grad_norm_: one step per real optimizer step, the
    stored weights are the trained ones, training bit-identical without the recorder."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed")

    def run(store):
        acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt = acc.prepare(model, opt)
        g = torch.Generator().manual_seed(0)
        X, Y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
        snaps = []
        rec = (trajlab.Recorder(model, store, optimizer=opt, loss_fn=F.cross_entropy)
               if store else None)
        with rec if rec is not None else warnings.catch_warnings():
            for i in range(8):
                x, y = X[8 * i:8 * i + 8], Y[8 * i:8 * i + 8]
                with acc.accumulate(model):
                    loss = F.cross_entropy(model(x), y)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(model.parameters(), 0.5)
                        snaps.append(model[0].weight.detach().clone())
                    if rec is not None:
                        rec.log(loss=loss, inputs=x, targets=y)
                    opt.step()
                    opt.zero_grad()
        return model, snaps

    ref, _ = run(None)
    model, snaps = run(tmp_path / "r.zarr")
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    run_ = trajlab.open_run(tmp_path / "r.zarr")
    assert run_.steps.tolist() == [0, 1, 2, 3]
    assert run_.root.batch_size.values.tolist() == [16] * 4
    np.testing.assert_array_equal(run_.layer("0").weight.values, torch.stack(snaps).numpy())


def test_resume_leaves_out_what_the_first_run_left_out(tmp_path):
    """mode="a" on a GPT-2 run whose wpe was left out at its first step: the same layers are
    recorded, the appended weights continue the run."""
    model = gpt2()
    xs = batches(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, xs[:2], store=tmp_path / "r.zarr", internal=False)
        snaps = []
        train(model, xs[2:], store=tmp_path / "r.zarr", internal=False, mode="a",
              snapshots=snaps)
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.steps.tolist() == [0, 1, 2, 3] and "transformer.wpe" not in run.layers
    name = "transformer.h.0.mlp.c_proj"
    np.testing.assert_array_equal(run.layer(name).weight.values[2],
                                  snaps[0][f"{name}.weight"].T.numpy())


def test_trainer_callback_passes_max_steps(tmp_path):
    """The callback gives the Recorder the Trainer's max_steps (the run's length, for the
    early disk-space warning) unless steps= is given."""
    from transformers import TrainerCallback

    from trajlab.integrations.hf import RecorderCallback

    got = []
    for name, cb in (("a", RecorderCallback(tmp_path / "a.zarr")),
                     ("b", RecorderCallback(tmp_path / "b.zarr", steps=1000))):

        class Spy(TrainerCallback):
            def on_step_end(self, args, state, control, cb=cb, name=name, **kw):
                got.append((name, cb.recorder.options.steps))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _trainer(tmp_path, [cb, Spy()], steps=2).train()
    assert got == [("a", 2), ("a", 2), ("b", 1000), ("b", 1000)]
