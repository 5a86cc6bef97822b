"""The first recorded step's self-check, per sketch kind: it reads the kind's own tensors
(``mean_gradient``, ``sample_gradient``) and builds dense per-sample gradients only for a kind
that cannot give sample 0's gradient (the subspace sketch), and it still catches every failure
it names (issue 26 item 3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trajlab
from trajlab.record import assembly, capture, checks
from trajlab.record.rules import Dense, Diagonal, Patches, Rows
from trajlab.sketches import sketch_kind

F64 = torch.float64
B = 8


class Net(nn.Module):
    """One layer of each built-in sketch kind: rows (``emb``), diagonal (``norm``), subspace
    (``conv``, weight-shared) and rank1 (``lin``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.norm = nn.LayerNorm(6)
        self.conv = nn.Conv1d(6, 5, 3)
        self.lin = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(x))  # (B, T, 6)
        h = torch.tanh(self.conv(h.transpose(1, 2)))  # (B, 5, T - 2)
        return self.lin(h.mean(-1))


KINDS = {"emb": "rows", "norm": "diagonal", "conv": "subspace", "lin": "rank1"}


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Net().to(F64)
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 7, (B, 5), generator=g)
    Y = torch.randint(0, 4, (B,), generator=g)
    return model, X, Y


def _one_step(tmp_path, layer: str, *, train_loss, loss_fn=F.cross_entropy, micro: int = 1):
    """One recorded step of ``Net`` recording only ``layer``; ``train_loss(out, y)`` is the
    loss each micro-batch backpropagates."""
    model, X, Y = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with trajlab.Recorder(model, tmp_path / "r.zarr", optimizer=opt, layers=[layer],
                          loss_fn=loss_fn) as rec:
        opt.zero_grad()
        k = B // micro
        for j in range(micro):
            x, y = X[j * k:(j + 1) * k], Y[j * k:(j + 1) * k]
            loss = train_loss(model(x), y)
            loss.backward()
            rec.log(loss=loss, inputs=x, targets=y)
        opt.step()


def test_dense_gradients_only_for_kinds_without_sample_gradient():
    for name, want in (("rank1", True), ("rows", True), ("diagonal", True),
                       ("subspace", False), ("none", False)):
        assert capture.gives_sample_gradient(sketch_kind(name)) is want, name


@pytest.mark.parametrize("layer", list(KINDS))
def test_sample_zero_read_from_the_kind_or_kept_dense(tmp_path, monkeypatch, layer):
    """At the check, exact kinds carry no dense gradients; the subspace layer carries sample
    0's alone, equal to torch.func's gradient of sample 0's own loss (independent)."""
    seen = {}
    original = assembly.first_step_checks

    def spy(layers, *a, **kw):
        for lay in layers:
            seen[lay.name] = (lay.kind.name, lay.assembled.per_sample,
                              lay.kind.sample_gradient(lay.assembled.tensors, 0))
        return original(layers, *a, **kw)

    monkeypatch.setattr(assembly, "first_step_checks", spy)
    _one_step(tmp_path, layer, train_loss=F.cross_entropy)
    kind, dense, g0 = seen[layer]
    assert kind == KINDS[layer]

    model, X, Y = _setup()
    module = getattr(model, layer)
    ref = torch.autograd.grad(F.cross_entropy(model(X[:1]), Y[:1]), module.weight)[0]
    ref = torch.diag(ref) if layer == "norm" else ref.reshape(ref.shape[0], -1)
    if kind == "subspace":
        assert g0 is None and dense.shape == (1, *ref.shape)
        torch.testing.assert_close(dense[0], ref, rtol=1e-10, atol=1e-13)
    else:
        assert dense is None
        torch.testing.assert_close(g0, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("layer", list(KINDS))
def test_correct_loops_pass(tmp_path, layer):
    _one_step(tmp_path, layer, train_loss=F.cross_entropy)
    _one_step(tmp_path / "acc", layer, micro=2,
              train_loss=lambda out, y: F.cross_entropy(out, y) / 2)


def _other_loss(out, y):
    return F.mse_loss(out, F.one_hot(y, 4).to(out.dtype))


FAILURES = {
    "summed": ({"train_loss": lambda out, y: F.cross_entropy(out, y, reduction="sum")},
               "summed over samples"),
    "weighted": ({"train_loss": lambda out, y: 3 * F.cross_entropy(out, y)},
                 "differ by a factor 3"),
    "other loss_fn": ({"train_loss": F.cross_entropy, "loss_fn": _other_loss},
                      "different directions"),
    "accumulation": ({"train_loss": F.cross_entropy, "micro": 2}, "number of micro-batches"),
}


@pytest.mark.filterwarnings("ignore:trajlab. no step was recorded:RuntimeWarning")
@pytest.mark.parametrize("case", list(FAILURES))
@pytest.mark.parametrize("layer", list(KINDS))
def test_each_failure_is_caught_and_named(tmp_path, layer, case):
    kw, match = FAILURES[case]
    with pytest.raises(trajlab.SelfCheckError, match=match):
        _one_step(tmp_path, layer, **kw)


def test_check_mean_catches_a_mean_that_is_not_grad():
    g = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    checks.check_mean("w", g * (1 + 1e-12), g, 1e-9)
    with pytest.raises(trajlab.SelfCheckError, match="batch mean of the recorded per-sample"):
        checks.check_mean("w", g * 1.01, g, 1e-9)
    bad = g.clone()
    bad[0, 0] = float("nan")
    checks.check_mean("w", g * 1.01, bad, 1e-9)  # a non-finite .grad is flagged elsewhere


def test_sample_zero_dense_equals_the_whole_capture_s_first_sample():
    """One sample captured alone gives the same dense gradient as sample 0 of the whole
    micro-batch, for each per-sample form; a form that cannot be cut is captured whole."""
    g = torch.Generator().manual_seed(2)
    U, _ = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=F64))
    forms = [
        (Patches(torch.randn(B, 6, 3, generator=g, dtype=F64),
                 torch.randn(B, 5, 3, generator=g, dtype=F64)), "subspace", (U, V), 2),
        (Patches(torch.randn(B, 6, 1, generator=g, dtype=F64),
                 torch.randn(B, 5, 1, generator=g, dtype=F64)), "rank1", None, 0),
        (Dense(torch.randn(B, 5, 6, generator=g, dtype=F64)), "subspace", (U, V), 2),
        (Diagonal(torch.randn(B, 5, generator=g, dtype=F64)), "diagonal", None, 0),
        (Rows(torch.randint(-1, 5, (B, 3), generator=g),
              torch.randn(B, 3, 6, generator=g, dtype=F64), 5), "rows", None, 3),
    ]
    for ps, name, basis, rank in forms:
        kind = sketch_kind(name)
        _, whole = ps.capture(kind, basis=basis, rank=rank, want_per_sample=True)
        got = capture.sample_zero_dense(ps, kind, basis=basis, rank=rank)
        assert got.shape == (1, *whole.shape[1:]), name
        torch.testing.assert_close(got, whole[:1], rtol=1e-12, atol=1e-14)

    class Whole(Dense):
        """A form whose tensor does not have the samples first: captured whole."""

        @property
        def batch(self) -> int:
            return B + 1

    ps = Whole(torch.randn(B, 5, 6, generator=g, dtype=F64))
    got = capture.sample_zero_dense(ps, sketch_kind("subspace"), basis=(U, V), rank=2)
    torch.testing.assert_close(got, ps.grads[:1], rtol=0, atol=0)
