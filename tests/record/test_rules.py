"""The layer-rule conformance suite: one parametrised class run for every registered rule.

Each :class:`Setting` is a tiny float64 model around the layer type under test, its data and
the recorded names to check. :class:`TestRuleConformance` runs, for every setting:

* per-sample information against torch.func: the rule's per-sample gradients (its contract
  output, whatever its form) equal ``vmap(grad)`` of the model to 1e-10; the stored sketch is
  exact to 1e-10 for exact kinds, and for subspace sketches the stored projections are exact and
  the reported error is the true error (Pythagoras);
* the batch mean of the rule's per-sample gradients equals ``.grad`` (and so does the stored
  or implied batch gradient);
* training is bit-identical with and without the recorder;
* every hook is gone after exit and after an exception, nothing is written onto the modules;
* the layer metadata (with its geometry) survives the store: written, reopened, equal;
* the analysis terms of a recorded step equal the dense references of MATH.md computed from
  the torch.func per-sample gradients (``tests/sde/sde_reference.py``).

A new rule gets one :class:`Setting` here (see docs/recorder.md, "Adding a layer rule").
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import reference_per_sample_grads
from torch import nn

import trajlab
from trajlab.analysis import analyze
from trajlab.record.rules import (
    Dense,
    Description,
    Diagonal,
    LayerRule,
    Matrix,
    Patches,
    Rows,
    register_rule,
    rule_for,
    rules,
    unregister_rule,
)
from trajlab.store.metadata import ConvGeometry, LayerMeta

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sde"))
from sde_reference import dense_terms

F64 = torch.float64
B = 6
LR = 0.05
#: torch.func references of attention go through vmap's fallback for SDPA (a torch notice).
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


# ----------------------------------------------------------------------------- models
class Head(nn.Module):
    """``body`` then mean over every non-batch, non-feature axis and a Linear classifier."""

    def __init__(self, body: nn.Module, features: int, classes: int = 3, channels_last=True):
        super().__init__()
        self.body = body
        self.head = nn.Linear(features, classes)
        self.channels_last = channels_last

    def forward(self, x):
        h = torch.tanh(self.body(x))
        h = h.flatten(2).mean(-1) if not self.channels_last else h.reshape(
            h.shape[0], -1, h.shape[-1]).mean(1)
        return self.head(h)


class SelfAttention(nn.Module):
    """MultiheadAttention, batch-first, with a key padding mask read from the data (feature 0
    below -1.2 masks a position, never the first) and a causal mask."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x):
        L = x.shape[1]
        pad = x[..., 0] < -1.2
        pad[:, 0] = False
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        return self.attn(x, x, x, key_padding_mask=pad, attn_mask=causal,
                         need_weights=False)[0]


class CrossAttentionSeqFirst(nn.Module):
    """MultiheadAttention with batch_first=False and kdim/vdim != embed_dim (separate q/k/v
    weights); the model's own input stays batch-first."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 3, kdim=5, vdim=4, batch_first=False)

    def forward(self, x):
        q = x.transpose(0, 1)
        pad = x[..., 1] < -1.2
        pad[:, 0] = False
        return self.attn(q, q[..., :5], q[..., 2:], key_padding_mask=pad)[0].transpose(0, 1)


class TokenModel(nn.Module):
    def __init__(self, encoder: nn.Module | None = None):
        super().__init__()
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.enc = encoder
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.emb(tokens)
        if self.enc is not None:
            h = self.enc(h)
        return self.head(torch.tanh(h).mean(1))


class Gated(nn.Module):
    """A module no rule covers: its 2-D weight enters non-linearly (generic fallback)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))

    def forward(self, x):
        h = x @ self.weight.T
        return h * torch.sigmoid(h)


class Affine(nn.Module):
    """A user's layer type with its own rule (below): ``x @ A^T``, parameter named ``A``."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.A = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))

    def forward(self, x):
        return x @ self.A.T


class AffineRule(LayerRule):
    """The toy user rule: one matrix (parameter ``A``), exact rank-one factors."""

    module_type = "Affine"

    def matrices(self, module):
        return [Matrix(param="A")]

    def describe(self, module, matrix, args, kwargs):
        return Description("rank1")

    def per_sample(self, module, matrix, args, kwargs, grad_out):
        x = args[0].detach()
        return Patches(x[..., None], grad_out[..., None] * x.shape[0])


@contextlib.contextmanager
def affine_rule():
    register_rule(Affine, AffineRule())
    try:
        yield
    finally:
        unregister_rule(Affine)


def _random_scales(model: nn.Module) -> nn.Module:
    """Distinct normalisation scales of both signs, the largest in magnitude negative (the
    default 1s tie: sigma_1 is then degenerate; a negative top scale checks the sign of u_1)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, *([nn.RMSNorm] if hasattr(
                    nn, "RMSNorm") else []))) and m.weight is not None:
                w = 0.5 + torch.rand(m.weight.shape, generator=g, dtype=F64)
                w = w * torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0)
                top = w.abs().argmax()
                w.view(-1)[top] = -w.view(-1)[top].abs()
                m.weight.copy_(w)
    return model


def _seq(d):
    return lambda g: torch.randn(B, 5, d, generator=g, dtype=F64)


def _img(c, h, w):
    return lambda g: torch.randn(B, c, h, w, generator=g, dtype=F64)


def _tokens(g):
    t = torch.randint(0, 12, (B, 7), generator=g)
    t[:, 1] = t[:, 0]  # a repeated token in every sample
    return t


# ----------------------------------------------------------------------------- settings
@dataclass
class Setting:
    """One rule's test setting.

    Attributes
    ----------
    id : the test id.  model : builds the float64 model (seeded).  data : inputs from a
    generator.  names : recorded names under test, with the sketch kind each must use.
    geometry : expected geometry per name.  rank : the recorder's subspace rank.
    random : the forward draws random numbers (dropout): no torch.func reference exists, the
    recorder's self-check replays it instead.  context : active while recording (a user rule).
    module_type : expected ``LayerMeta.module`` per name (default the rule's type).
    """

    id: str
    model: Callable[[], nn.Module]
    data: Callable[[torch.Generator], torch.Tensor]
    names: dict[str, str]
    geometry: dict[str, Any] = field(default_factory=dict)
    rank: int = 2
    random: bool = False
    context: Callable[[], Any] = contextlib.nullcontext
    module_type: dict[str, str] = field(default_factory=dict)


def _seeded(build):
    def make():
        torch.manual_seed(0)
        return _random_scales(build().double())
    return make


SETTINGS = [
    Setting("Linear", _seeded(lambda: nn.Sequential(nn.Linear(6, 9), nn.Tanh(),
                                                     nn.Linear(9, 3))),
            lambda g: torch.randn(B, 6, generator=g, dtype=F64), {"0": "rank1", "2": "rank1"}),
    Setting("Linear-sequence", _seeded(lambda: Head(nn.Linear(5, 7), 7)), _seq(5),
            {"body": "subspace"}),
    Setting("Conv2d", _seeded(lambda: Head(nn.Conv2d(3, 4, 3, stride=2, padding=1,
                                                     padding_mode="reflect"), 4,
                                           channels_last=False)),
            _img(3, 6, 5), {"body": "subspace"},
            {"body": ConvGeometry((4, 3, 3, 3), (2, 2), (1, 1), (1, 1), "reflect", (6, 5))}),
    Setting("Conv1d", _seeded(lambda: Head(nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2,
                                                     padding_mode="replicate"), 4,
                                           channels_last=False)),
            lambda g: torch.randn(B, 3, 11, generator=g, dtype=F64), {"body": "subspace"},
            {"body": ConvGeometry((4, 3, 3), (2,), (2,), (2,), "replicate", (11,))}),
    Setting("ConvTranspose2d", _seeded(lambda: Head(nn.ConvTranspose2d(3, 2, (2, 3), stride=2,
                                                                       padding=1,
                                                                       output_padding=1), 2,
                                                    channels_last=False)),
            _img(3, 3, 4), {"body": "subspace"},
            {"body": ConvGeometry((3, 2, 2, 3), (2, 2), (1, 1), (1, 1), "zeros", (3, 4),
                                  transposed=True, output_padding=(1, 1))}),
    Setting("MultiheadAttention-batch-first", _seeded(lambda: Head(SelfAttention(), 6)),
            _seq(6), {f"body.attn:{p}": "subspace" for p in ("q", "k", "v", "out")}),
    Setting("MultiheadAttention-seq-first", _seeded(lambda: Head(CrossAttentionSeqFirst(), 6)),
            _seq(6), {f"body.attn:{p}": "subspace" for p in ("q", "k", "v", "out")}, rank=3),
    Setting("MultiheadAttention-dropout",
            _seeded(lambda: TokenModel(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2,
                                                                  batch_first=True))),
            _tokens, {"enc.self_attn:q": "subspace", "enc.self_attn:out": "subspace",
                      "enc.norm1": "diagonal", "emb": "rows"}, random=True),
    Setting("Embedding", _seeded(TokenModel), _tokens, {"emb": "rows", "head": "rank1"}),
    Setting("LayerNorm", _seeded(lambda: Head(nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8)),
                                              8)),
            _seq(5), {"body.1": "diagonal"}),
    Setting("GroupNorm", _seeded(lambda: Head(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                                                            nn.GroupNorm(2, 4)), 4,
                                              channels_last=False)),
            _img(3, 4, 4), {"body.1": "diagonal"}),
    pytest.param(Setting("RMSNorm", _seeded(lambda: Head(nn.Sequential(
        nn.Linear(5, 8), nn.RMSNorm(8)), 8)), _seq(5), {"body.1": "diagonal"}),
        marks=pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch has no RMSNorm")),
    Setting("generic-fallback", _seeded(lambda: Head(Gated(5, 4), 4)), _seq(5),
            {"body": "subspace"}, rank=4, module_type={"body": "generic:Gated"}),
    Setting("user-rule", _seeded(lambda: nn.Sequential(Affine(6, 5), nn.Tanh(),
                                                        nn.Linear(5, 3))),
            lambda g: torch.randn(B, 6, generator=g, dtype=F64), {"0": "rank1"},
            context=affine_rule, module_type={"0": "Affine"}),
]


try:  # transformers' Conv1D (GPT-2), lazily registered; in the conformance class when installed
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except ImportError:  # pragma: no cover - the [hf] extra is part of [test]
    _HFConv1D = None
if _HFConv1D is not None:
    SETTINGS.append(Setting(
        "Conv1D-transformers", _seeded(lambda: nn.Sequential(_HFConv1D(9, 6), nn.Tanh(),
                                                             _HFConv1D(3, 9))),
        lambda g: torch.randn(B, 6, generator=g, dtype=F64), {"0": "rank1", "2": "rank1"}))
    SETTINGS.append(Setting(
        "Conv1D-transformers-sequence", _seeded(lambda: Head(_HFConv1D(7, 5), 7)), _seq(5),
        {"body": "subspace"}))


def _id(s) -> str:
    return s.id if isinstance(s, Setting) else s.values[0].id


# ----------------------------------------------------------------------------- helpers
def _batch(setting: Setting, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return setting.data(g), torch.randint(0, 3, (B,), generator=g)


def _target(model: nn.Module, name: str) -> tuple[nn.Module, LayerRule, Matrix]:
    mname, _, part = name.partition(":")
    module = model.get_submodule(mname)
    rule = rule_for(module)
    matrix = next(m for m in rule.matrices(module) if m.part == part)
    return module, rule, matrix


def _reference(setting: Setting, model: nn.Module, X, Y) -> dict[str, torch.Tensor]:
    """torch.func per-sample gradients of each recorded matrix, (B, m, n)."""
    ref = reference_per_sample_grads(copy.deepcopy(model), F.cross_entropy, X, Y)
    out = {}
    for name in setting.names:
        module, rule, matrix = _target(model, name)
        mname = name.partition(":")[0]
        G = ref[f"{mname}.{matrix.param}" if mname else matrix.param]
        out[name] = torch.stack([rule.matrix_of(module, matrix, g) for g in G])
    return out


def _dense(ps) -> torch.Tensor:
    """Dense (B, m, n) gradients from any per-sample form of the rule contract."""
    if isinstance(ps, Patches):
        return torch.bmm(ps.delta, ps.act.transpose(1, 2))
    if isinstance(ps, Dense):
        return ps.grads
    if isinstance(ps, Diagonal):
        return torch.diag_embed(ps.values)
    if isinstance(ps, Rows):
        return ps.dense()
    raise TypeError(type(ps))


def _contract(model: nn.Module, name: str, X, Y):
    """Run the rule's contract by hand: its hooks capture one forward; after the backward,
    its per-sample gradients and ``.grad`` as matrices."""
    module, rule, matrix = _target(model, name)
    seen = {}

    def on_forward(args, kwargs, output):
        out = rule.grad_output(output)
        seen["call"] = (args, kwargs)
        out.register_hook(lambda g: seen.__setitem__("grad", g))

    handles = rule.install(module, on_forward)
    try:
        model.zero_grad()
        F.cross_entropy(model(X), Y).backward()
    finally:
        for h in handles:
            h.remove()
    args, kwargs = seen["call"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the generic fallback's notice
        desc = rule.describe(module, matrix, args, kwargs)
    ps = rule.per_sample(module, matrix, args, kwargs, seen["grad"])
    return desc, ps, rule.grad_matrix(module, matrix).detach()


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def _train(setting: Setting, model: nn.Module, steps: int, store=None):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rec = None
    if store is not None:
        rec = trajlab.Recorder(model, store, optimizer=opt, loss_fn=F.cross_entropy,
                               rank=setting.rank, layers=list(setting.names))
        rec.__enter__()
    try:
        for s in range(steps):
            X, Y = _batch(setting, s)
            opt.zero_grad()
            loss = F.cross_entropy(model(X), Y)
            loss.backward()
            if rec is not None:
                rec.log(loss=loss, inputs=X, targets=Y)
            opt.step()
    finally:
        if rec is not None:
            rec.__exit__(None, None, None)
    return model, rec


@pytest.fixture(scope="module", params=SETTINGS, ids=_id)
def recorded(request, tmp_path_factory):
    """One setting recorded for two SGD steps, with the pre-step model of step 0."""
    setting: Setting = request.param
    model = setting.model()
    before = copy.deepcopy(model)
    store = tmp_path_factory.mktemp(setting.id) / "run.zarr"
    with setting.context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the generic fallback's notice
        warnings.simplefilter("ignore", UserWarning)  # torch's vmap-of-SDPA notice
        _, rec = _train(setting, model, 2, store)
        metas = {layer.name: layer.meta for layer in rec._layers}
    return setting, before, store, metas


# ----------------------------------------------------------------------------- the suite
class TestRuleConformance:
    """Every registered rule (and the generic fallback, and a user's rule) obeys the contract."""

    def test_per_sample_gradients_equal_torch_func(self, recorded):
        setting, model, store, _ = recorded
        if setting.random:
            pytest.skip("random forward: no torch.func reference (self-check replays it)")
        X, Y = _batch(setting, 0)
        with setting.context():
            ref = _reference(setting, model, X, Y)
            for name in setting.names:
                _, ps, _ = _contract(copy.deepcopy(model), name, X, Y)
                got = _dense(ps)  # each sample's own gradient: the loss-mean factor undone
                scale = ref[name].abs().max()
                assert float((got - ref[name]).abs().max() / scale) < 1e-10, name
        run = trajlab.open_run(store)
        for name, kind in setting.names.items():
            lm = run.layer_meta(name)
            assert lm.sketch == kind, name
            want = ref[name].numpy()
            got = trajlab.per_sample_gradients(run, name, 0)
            scale = np.abs(want).max()
            if got.exact:
                assert np.abs(got.grads - want).max() / scale < 1e-10, name
                continue
            ds = run.layer(name).isel(step=0)
            U, V = ds.basis_u.values, ds.basis_v.values
            np.testing.assert_allclose(ds.ps_proj_out.values[:B], want @ V, rtol=1e-9,
                                       atol=1e-12 * scale)
            np.testing.assert_allclose(ds.ps_proj_in.values[:B], want.transpose(0, 2, 1) @ U,
                                       rtol=1e-9, atol=1e-12 * scale)
            true = ((want - got.grads) ** 2).sum((1, 2))
            total = (want ** 2).sum((1, 2))
            np.testing.assert_allclose(got.residual, true, rtol=1e-6, atol=1e-10 * total.max())
            assert (got.relative_error <= 1.0 + 1e-12).all()

    def test_batch_mean_equals_grad(self, recorded):
        setting, model, store, _ = recorded
        X, Y = _batch(setting, 0)
        with setting.context():
            for name in setting.names:
                m = copy.deepcopy(model)
                with _replay_rng(setting):
                    _, ps, grad = _contract(m, name, X, Y)
                mean = _dense(ps).mean(0)
                assert float((mean - grad).abs().max() / grad.abs().max()) < 1e-10, name
        run = trajlab.open_run(store)
        ref = copy.deepcopy(model)
        ref.zero_grad()
        with _replay_rng(setting):
            F.cross_entropy(ref(X), Y).backward()
        if setting.random:
            return  # another dropout draw than the recorded step's
        for name in setting.names:
            with setting.context():
                module, rule, matrix = _target(ref, name)
            stored = run.layer(name).grad.isel(step=0).values  # stored, or implied by the sketch
            want = rule.grad_matrix(module, matrix).numpy()
            assert np.abs(stored - want).max() / np.abs(want).max() < 1e-12, name

    def test_training_bit_identical_with_and_without_recorder(self, recorded, tmp_path):
        setting = recorded[0]
        with setting.context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(11)
            plain, _ = _train(setting, setting.model(), 3)
            torch.manual_seed(11)
            rec, _ = _train(setting, setting.model(), 3, tmp_path / "r.zarr")
        for (n, a), b in zip(plain.named_parameters(), rec.parameters()):
            assert torch.equal(a, b), n
        assert trajlab.open_run(tmp_path / "r.zarr").n_steps == 3

    def test_hooks_gone_after_exit_and_after_an_exception(self, recorded, tmp_path):
        setting = recorded[0]
        model = setting.model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        hooks = _hooks(model)
        attrs = {n: set(vars(m)) for n, m in model.named_modules()}
        X, Y = _batch(setting)
        with setting.context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with trajlab.Recorder(model, tmp_path / "a.zarr", optimizer=opt,
                                  layers=list(setting.names)) as rec:
                assert _hooks(model) > hooks
                opt.zero_grad()
                F.cross_entropy(model(X), Y).backward()
                rec.log(inputs=X, targets=Y)
                opt.step()
            assert _hooks(model) == hooks
            with pytest.raises(ZeroDivisionError), trajlab.Recorder(
                    model, tmp_path / "b.zarr", optimizer=opt, layers=list(setting.names)):
                opt.zero_grad()
                F.cross_entropy(model(X), Y).backward()  # tensor hooks pending
                raise ZeroDivisionError("the training loop fails")
            assert _hooks(model) == hooks
        assert {n: set(vars(m)) for n, m in model.named_modules()} == attrs

    def test_layer_metadata_and_geometry_round_trip_through_the_store(self, recorded):
        setting, model, store, metas = recorded
        run = trajlab.open_run(store)
        for name in setting.names:
            lm = run.layer_meta(name)
            assert lm == metas[name], name
            assert LayerMeta.from_dict(json.loads(json.dumps(lm.to_dict()))) == lm
            with setting.context():
                module, rule, matrix = _target(model, name)
            assert lm.module == setting.module_type.get(name, rule.module_type)
            assert lm.geometry == setting.geometry.get(name)
            assert lm.shape == tuple(rule.weight_matrix(module, matrix).shape)

    def test_analysis_terms_equal_dense_references(self, recorded):
        setting, model, store, _ = recorded
        if setting.random:
            pytest.skip("random forward: no torch.func reference")
        X, Y = _batch(setting, 0)
        with setting.context():
            ref = _reference(setting, model, X, Y)
        ds = analyze(store, layers=list(setting.names), scheduler="synchronous",
                     progress=False).sel(step=0)
        run = trajlab.open_run(store)
        for name in setting.names:
            W = torch.from_numpy(run.layer(name).weight.isel(step=0).values)
            update = torch.from_numpy(run.layer(name)["update"].isel(step=0).values)
            want = dense_terms(W, ref[name], LR, update=update)
            assert not bool(ds.degenerate.sel(layer=name))
            for k in ("K", "drift_flow", "diffusion2", "drift_noise", "diffusion2_var",
                      "drift_noise_var", "drift_discretization", "pathwise_increment"):
                got = float(ds[k].sel(layer=name))
                scale = max(abs(float(want[k])), 1e-12 * float(want["K"]))
                assert abs(got - float(want[k])) <= 1e-7 * scale, (name, k, got,
                                                                    float(want[k]))


@contextlib.contextmanager
def _replay_rng(setting: Setting):
    """The same dropout draws for two forwards (random settings)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        yield


def test_every_registered_rule_has_a_setting():
    """A rule registered without a conformance setting fails here."""
    covered = set()
    for s in SETTINGS:
        s = s if isinstance(s, Setting) else s.values[0]
        with s.context():
            for m in s.model().modules():
                covered.add(type(m))
    missing = [t.__name__ for t in rules() if not any(issubclass(c, t) for c in covered)]
    assert not missing, f"rules without a conformance setting: {missing}"
