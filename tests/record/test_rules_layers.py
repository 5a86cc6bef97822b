"""What the new rules add beyond the conformance suite: exact operator norms by geometry
(never relabelled), the model summary and `trajlab info` on real architectures, the generic
fallback's flag and warning, embedding and attention specifics, wide layers' basis residual."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trajlab
from trajlab.analysis import analyze
from trajlab.analysis.tasks import _operator_norms
from trajlab.cli.info import format_info
from trajlab.record.rules import Matrix, rule_for

F64 = torch.float64


def _dense_norm(module: nn.Module, in_shape: tuple[int, ...]) -> float:
    """sigma_1 of the layer's own linear map (bias off) from its Jacobian."""
    def f(z):
        x = z.reshape(1, *in_shape)
        if isinstance(module, nn.ConvTranspose2d):
            y = F.conv_transpose2d(x, module.weight, None, module.stride, module.padding,
                                   module.output_padding, 1, module.dilation)
        else:
            y = module._conv_forward(x, module.weight, None)
        return y.reshape(-1)

    J = torch.autograd.functional.jacobian(f, torch.zeros(int(np.prod(in_shape)), dtype=F64))
    return float(torch.linalg.matrix_norm(J, ord=2))


CONVS = [
    (lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 9)),
    (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2, padding_mode="replicate"),
     (3, 10)),
    (lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), (2, 8)),
    (lambda: nn.Conv1d(2, 3, 4, padding="same"), (2, 8)),  # pads (1, 2): refused
    (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 6, 5)),
    (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="replicate"), (2, 6, 7)),
    (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="zeros"), (2, 5, 5)),
    (lambda: nn.ConvTranspose2d(3, 2, (2, 3), stride=2, padding=1, output_padding=1),
     (3, 4, 3)),
]


@pytest.mark.parametrize("make,in_shape", CONVS, ids=lambda v: "" if callable(v) else str(v))
def test_operator_norm_is_the_layers_own_operator_or_refused(make, in_shape):
    torch.manual_seed(0)
    module = make().double()
    rule = rule_for(module)
    x = torch.randn(1, *in_shape, dtype=F64)
    geometry = rule.describe(module, Matrix(), (x,), {}).geometry
    W = rule.weight_matrix(module, Matrix()).detach().numpy()[None]
    if len(geometry.padding) != geometry.spatial_dims:  # asymmetric "same" padding
        with pytest.raises(ValueError, match="asymmetric"):
            _operator_norms(W, geometry)
        return
    got = _operator_norms(np.concatenate([W, 2 * W]), geometry)
    exact = _dense_norm(module, in_shape)
    np.testing.assert_allclose(got, [exact, 2 * exact], rtol=1e-9)


def test_operator_definition_end_to_end_for_conv1d_and_transposed(tmp_path):
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(2, 3, 3, padding=1, padding_mode="reflect")
            self.up = nn.ConvTranspose2d(3, 2, 2, stride=2)
            self.fc = nn.Linear(2 * 2 * 12, 3)

        def forward(self, x):
            h = torch.tanh(self.c1(x))  # (B, 3, 6)
            h = self.up(h.reshape(-1, 3, 1, 6))  # (B, 2, 2, 12)
            return self.fc(torch.tanh(h).flatten(1))

    model = Net().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    X = torch.randn(16, 2, 6, dtype=F64)
    Y = torch.randint(0, 3, (16,))
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt) as rec:
        for s in range(2):
            opt.zero_grad()
            F.cross_entropy(model(X[8 * s:8 * s + 8]), Y[8 * s:8 * s + 8]).backward()
            rec.log()
            opt.step()
    ds = analyze(tmp_path / "r.zarr", scheduler="synchronous", progress=False,
                 conv_definition="operator")
    assert float(ds.K_operator.isel(step=0).sel(layer="c1")) == pytest.approx(
        _dense_norm(_with_weight(model.c1, tmp_path, "c1"), (2, 6)), rel=1e-9)
    assert float(ds.K_operator.isel(step=0).sel(layer="up")) == pytest.approx(
        _dense_norm(_with_weight(model.up, tmp_path, "up"), (3, 1, 6)), rel=1e-9)
    np.testing.assert_allclose(ds.K_operator.sel(layer="fc"), ds.K.sel(layer="fc"))


def _with_weight(module: nn.Module, tmp_path, name: str) -> nn.Module:
    """A copy of ``module`` holding the step-0 weight recorded in the store."""
    import copy

    run = trajlab.open_run(tmp_path / "r.zarr")
    W = torch.from_numpy(run.layer(name).weight.isel(step=0).values)
    m = copy.deepcopy(module)
    shape = m.weight.shape
    with torch.no_grad():
        if isinstance(m, nn.ConvTranspose2d):
            m.weight.copy_(W.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1))
        else:
            m.weight.copy_(W.reshape(shape))
    return m


# ----------------------------------------------------------------------------- summary / info
class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.layers = nn.Sequential(*(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
                                      for _ in range(2)))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.layers(self.emb(x)).mean(1))


class BasicBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.block = BasicBlock(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.block(torch.relu(self.gn(self.stem(x)))).mean((2, 3)))


@pytest.mark.parametrize("make,data", [
    (Transformer, lambda: torch.randint(0, 40, (8, 6))),
    (lambda: ResNet().eval(), lambda: torch.randn(8, 3, 6, 6)),
], ids=["transformer", "resnet"])
def test_summary_and_info_list_every_parametrised_module(tmp_path, make, data):
    torch.manual_seed(2)
    model = make()
    X, Y = data(), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt) as rec:
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            opt.step()
    entries = {e["name"]: e for e in rec.summary["modules"]}
    owners = {n for n, m in model.named_modules() if list(m.parameters(recurse=False))}
    claimed = {n for n in owners if n.endswith("self_attn.out_proj")}
    assert set(entries) == owners - claimed  # out_proj is recorded as attn:out
    for e in entries.values():
        assert e["recorded"] or "BatchNorm" in e["type"], e
        assert e.get("how") or e.get("why")
    total = rec.summary["weight_parameters"]
    assert sum(e.get("recorded_parameters", 0) for e in entries.values()) == total
    text = format_info(tmp_path / "r.zarr")
    assert "(100%)" in text
    for name in trajlab.open_run(tmp_path / "r.zarr").layers:
        assert f"  {name} " in text
    if isinstance(model, ResNet):
        assert "not recorded: block.bn1 (BatchNorm2d" in text
        assert "residual blocks" in text
    else:
        assert "layers.1.self_attn:out" in text and "exact sparse rows" in text
        assert "exact diagonal" in text and "attention" in text


# ----------------------------------------------------------------------------- generic
class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 5, dtype=F64))

    def forward(self, x):
        h = x @ self.weight.T
        return h * torch.sigmoid(h)


def test_generic_fallback_is_flagged_and_warned_once(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(Gated(), nn.Linear(4, 3).double())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    X, Y = torch.randn(6, 5, dtype=F64), torch.randint(0, 3, (6,))
    with warnings.catch_warnings(record=True) as record, trajlab.Recorder(
            model, tmp_path / "r.zarr", optimizer=opt, loss_fn=F.cross_entropy) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            rec.log(inputs=X, targets=Y)
            opt.step()
    notices = [w for w in record if "Gated has no layer rule" in str(w.message)]
    assert len(notices) == 1 and notices[0].category is RuntimeWarning
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.layer_meta("0").module == "generic:Gated"
    assert "generic fallback" in rec.summary["modules"][0]["how"]


def test_generic_fallback_replays_without_side_effects_on_other_hooks(tmp_path):
    """The fallback re-runs the module's forward (children included): the recorder's own hooks
    stay silent there, so a recorded child is captured once."""
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.U = nn.Parameter(torch.randn(5, 5, dtype=F64) / 3)
            self.inner = nn.Linear(5, 5).double()

        def forward(self, x):
            return self.inner(x @ self.U.T)

    torch.manual_seed(4)
    model = nn.Sequential(Wrapper(), nn.Tanh(), nn.Linear(5, 3).double())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    X, Y = torch.randn(6, 5, dtype=F64), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                              loss_fn=F.cross_entropy) as rec:
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            rec.log(inputs=X, targets=Y)
            opt.step()
    assert set(rec.layer_names) == {"0:U", "0.inner", "2"}


# ----------------------------------------------------------------------------- embedding
def test_embedding_refusal_sparse_gradients_and_slots(tmp_path):
    bad = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Flatten(),
                        nn.Linear(12, 2))
    opt = torch.optim.SGD(bad.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="scale_grad_by_freq=True"):
        rec = trajlab.Recorder(bad, tmp_path / "a.zarr", optimizer=opt)
    assert rec.layer_names == ["2"]

    torch.manual_seed(5)
    emb = nn.Embedding(10, 4, sparse=True).double()
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(12, 2).double())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 10, (5, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with trajlab.Recorder(model, tmp_path / "b.zarr", optimizer=opt,
                              loss_fn=F.cross_entropy) as rec:
            y = torch.randint(0, 2, (5,))
            opt.zero_grad()
            F.cross_entropy(model(tokens), y).backward()
            assert emb.weight.grad.is_sparse
            rec.log(inputs=tokens, targets=y)
            opt.step()
            # a later step with more distinct rows per sample than slots (3) stops recording
            long = torch.arange(10).repeat(5, 1)
            opt.zero_grad()
            F.cross_entropy(nn.Linear(40, 2).double()(emb(long).flatten(1)), y).backward()
            opt.step()
    run = trajlab.open_run(tmp_path / "b.zarr")
    assert run.n_steps == 1 and run.layer_meta("0").rank == 3
    assert any("distinct rows" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- attention
def test_attention_replays_leave_nothing_behind(tmp_path):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(20, 8),
                          nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True),
                          nn.Flatten(), nn.Linear(40, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    X, Y = torch.randint(0, 20, (6, 5)), torch.randint(0, 3, (6,))
    rule = rule_for(model[1].self_attn)
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt,
                          loss_fn=F.cross_entropy) as rec:  # self-check replays the dropout
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            rec.log(inputs=X, targets=Y)
            opt.step()
    gc.collect()
    assert not rule._memo
    run = trajlab.open_run(tmp_path / "r.zarr")
    assert run.layer_meta("1.self_attn:k").param == "in_proj_weight[8:16]"
    assert run.layer_meta("1.self_attn:out").param == "out_proj.weight"


# ----------------------------------------------------------------------------- wide layers
def test_wide_weight_shared_layer_records_its_basis_residual(tmp_path):
    """min(m, n) > 256: the basis comes from warm-started iterations, its residual is stored."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(270, 260), nn.Tanh())
    head = nn.Linear(260, 3)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01)
    X, Y = torch.randn(4, 3, 270), torch.randint(0, 3, (4,))
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt) as rec:
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(head(model(X).mean(1)), Y).backward()
            rec.log()
            opt.step()
    res = trajlab.open_run(tmp_path / "r.zarr").layer("0").basis_residual.values
    assert res[0] < 1e-5  # the first step's basis is an exact SVD
    assert np.isfinite(res).all() and (res < 1e-2).all()  # then a few tracking iterations
    ds = trajlab.analyze(tmp_path / "r.zarr", scheduler="synchronous", progress=False)
    assert float(ds.coverage.min()) > 0.9999  # what the analysis reports of the basis
