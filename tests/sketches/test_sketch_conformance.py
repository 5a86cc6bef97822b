"""The sketch-kind conformance suite: one parametrised class run for every registered kind.

Each :class:`KindSetting` gives per-sample gradients ``G`` (B, m, n) of a shape the kind is
meant for (rank-one, diagonal, row-sparse, dense with a basis) and what the kind holds of them
(``G`` itself for exact kinds, the projection on the basis for a projecting kind).
:class:`TestSketchKindConformance` checks, for every kind, against computations from ``G``:

* the declared variables (dims, dtype class, sample axis, ``batch_var``, ``needs``) match the
  captured tensors, and :meth:`~trajlab.sketches.SketchKind.sample_size` counts their numbers;
* reading (numpy): :meth:`reconstruct` gives what the kind holds and the squared norm it misses,
  :meth:`implied_grad` the batch mean where the kind implies it;
* recording (torch): batch size, batch mean, its product with probe vectors, single samples,
  rescaling and joining micro-batches;
* the analysis adaptor: ``G_i v_1``, ``G_i^T u_1``, ``sum_i G_i**2`` and the coverage, with and
  without a leading step dimension;
* the capabilities the callers ask (``needs_basis``, ``single_position``, ``diagonal``,
  ``exact``, ``per_sample``, ``projected``) hold as stated.

A ``projected`` kind (statistics in the recorder's singular basis, stored through
:meth:`~trajlab.sketches.SketchKind.finalize`) has no directions or second moment: there the
analysis adaptor's checks compare its noise terms (:func:`trajlab.sde.basis.basis_noise_terms`)
with :func:`trajlab.sde.layer_terms` on the dense ``G``.

A new kind registers itself in :mod:`trajlab.sketches` and gets one :class:`KindSetting` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from trajlab.dims import IN, OUT, RANK, SAMPLE
from trajlab.sde import layer_terms
from trajlab.sde.basis import basis_gradient_terms, basis_noise_terms
from trajlab.sketches import SketchKind, sketch_kind, sketch_kinds, weights_only_kind
from trajlab.spectral import hessian_quadform

F64 = torch.float64
B, M, N, K = 6, 4, 5, 2
Basis = tuple[torch.Tensor, torch.Tensor]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass
class Form:
    """Per-sample gradients ``G`` (b, m, n) and how the kind captures samples ``sl`` of them
    from their natural form (factors, dense matrices)."""

    G: torch.Tensor
    capture: Callable[[SketchKind, Basis | None, slice], dict[str, torch.Tensor]]


def _dense_form(G: torch.Tensor) -> Form:
    return Form(G, lambda kind, basis, sl: kind.capture_dense(G[sl], basis=basis)[0])


def _rank1(gen: torch.Generator, b: int) -> Form:
    """Layer inputs and output gradients of a layer without weight sharing (one position)."""
    d = torch.randn(b, M, 1, generator=gen, dtype=F64)
    a = torch.randn(b, N, 1, generator=gen, dtype=F64)
    return Form(d @ a.mT, lambda kind, basis, sl: kind.capture(a[sl], d[sl], basis=basis)[0])


def _diagonal(gen: torch.Generator, b: int) -> Form:
    """Square (b, M, M): a diagonal matrix's per-sample gradients."""
    return _dense_form(torch.diag_embed(torch.randn(b, M, generator=gen, dtype=F64)))


def _rows(gen: torch.Generator, b: int) -> Form:
    """Each sample's gradient has two of the M rows nonzero (a token-like pattern)."""
    G = torch.zeros(b, M, N, dtype=F64)
    for i in range(b):
        rows = torch.randperm(M, generator=gen)[:2]
        G[i, rows] = torch.randn(2, N, generator=gen, dtype=F64)
    return _dense_form(G)


def _dense(gen: torch.Generator, b: int) -> Form:
    return _dense_form(torch.randn(b, M, N, generator=gen, dtype=F64))


def _projection(G: torch.Tensor, basis: Basis | None) -> torch.Tensor:
    """``P_U G + G P_V - P_U G P_V`` (the part of G a top-k subspace sketch holds)."""
    U, V = basis
    PU, PV = U @ U.T, V @ V.T
    return PU @ G + G @ PV - PU @ G @ PV


@dataclass
class KindSetting:
    """How to exercise one registered kind.

    Attributes
    ----------
    make : per-sample gradients of the form the kind is meant for.
    rank : the layer rank its variables are declared with for those captures.
    held : what the kind holds of G (None: G itself).
    """

    name: str
    make: Callable[[torch.Generator, int], Form]
    rank: int = 1
    held: Callable[[torch.Tensor, Basis | None], torch.Tensor] | None = None


SETTINGS = {s.name: s for s in [
    KindSetting("rank1", _rank1),
    KindSetting("subspace", _dense, rank=K, held=_projection),
    KindSetting("diagonal", _diagonal),
    KindSetting("rows", _rows, rank=M),
    KindSetting("none", _dense),
    KindSetting("rank1_basis", _rank1, rank=min(M, N)),
]}

#: The weight a projected kind's statistics are taken in (the recorder's pre-update weight).
WEIGHT = torch.randn(M, N, generator=_gen(9), dtype=F64)
NOISE = ("drift_noise", "drift_noise_var", "diffusion2", "diffusion2_var", "noise_proj",
         "grad_first", "grad_second")


def _basis(seed: int = 7) -> Basis:
    """Top-K singular vectors of a random (M, N) matrix (the recorder's basis)."""
    U, _, Vh = torch.linalg.svd(torch.randn(M, N, generator=_gen(seed), dtype=F64),
                                full_matrices=False)
    return U[:, :K].contiguous(), Vh[:K].T.contiguous()


@dataclass
class Captured:
    kind: SketchKind
    setting: KindSetting
    G: torch.Tensor
    basis: Basis | None
    tensors: dict[str, torch.Tensor]

    @property
    def held(self) -> torch.Tensor:
        h = self.setting.held
        return self.G if h is None else h(self.G, self.basis)

    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors as the store holds them: declared variables only, with the basis the
        recorder adds for a kind that needs one."""
        tensors = (self.kind.finalize(self.tensors, WEIGHT) if self.kind.projected
                   else self.tensors)
        out = {k: v for k, v in tensors.items() if k in self.kind.variables(self.setting.rank)}
        if self.kind.needs_basis:
            out["basis_u"], out["basis_v"] = self.basis
        return out


def _capture(name: str, seed: int = 0, b: int = B) -> Captured:
    kind = sketch_kind(name)
    setting = SETTINGS[name]
    form = setting.make(_gen(seed), b)
    basis = _basis() if kind.needs_basis else None
    return Captured(kind, setting, form.G, basis, form.capture(kind, basis, slice(None)))


PER_SAMPLE = [n for n in SETTINGS if sketch_kind(n).per_sample]


def test_every_registered_kind_has_a_setting():
    assert set(sketch_kinds()) == set(SETTINGS), "give each registered kind a KindSetting"


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_kind_is_registered_under_its_name(name):
    kind = sketch_kind(name)
    assert isinstance(kind, SketchKind) and kind.name == name and kind.summary
    assert name in repr(kind)


def test_the_weights_only_kind_holds_no_samples():
    kind = weights_only_kind()
    assert not kind.per_sample and kind.variables(3) == {} and kind.needs() == ()
    assert kind.sample_size((M, N), 3) == 0 and kind.batch_var is None
    assert not (kind.exact or kind.implies_grad or kind.needs_basis or kind.diagonal)
    with pytest.raises(NotImplementedError, match="per-sample"):
        _dense(_gen(0), B).capture(kind, None, slice(None))
    with pytest.raises(NotImplementedError):
        kind.directions({}, torch.ones(M, dtype=F64), torch.ones(N, dtype=F64))


@pytest.mark.parametrize("name", PER_SAMPLE)
class TestSketchKindConformance:
    # ------------------------------------------------------------------ layout
    def test_variables_match_the_captured_tensors(self, name):
        c = _capture(name)
        kind, rank = c.kind, c.setting.rank
        declared = kind.variables(rank)
        size = {SAMPLE: B, OUT: M, IN: N, RANK: rank}
        stored = c.stored()
        assert set(kind.needs()) <= set(declared)
        missing = set(declared) - set(stored) - {"basis_residual"}  # the recorder's, with U, V
        assert not missing, f"declared but not captured: {missing}"
        for k, t in stored.items():
            var = declared[k]
            assert tuple(t.shape) == tuple(size[d] for d in var.dims), k
            assert var.per_sample == (bool(var.dims) and var.dims[0] == SAMPLE)
            if var.dtype in ("ps", "param") or np.dtype(var.dtype).kind == "f":
                assert t.is_floating_point(), k
            else:
                assert not t.is_floating_point(), k
        key, dim = kind.batch_var
        assert declared[key].per_sample and stored[key].shape[dim] == B

    def test_sample_size_counts_the_stored_numbers_per_sample(self, name):
        c = _capture(name)
        declared = c.kind.variables(c.setting.rank)
        numbers = sum(t.numel() for k, t in c.stored().items() if declared[k].per_sample)
        assert c.kind.sample_size((M, N), c.setting.rank) * B == numbers

    # ------------------------------------------------------------------ reading (numpy)
    def test_reconstruct_gives_what_the_kind_holds_and_the_norm_it_misses(self, name):
        c = _capture(name)
        arrays = {k: v.numpy() for k, v in c.stored().items()}
        if c.kind.projected:  # statistics only: refused, naming the sketch that holds them
            with pytest.raises(ValueError, match="'rank1' sketch"):
                c.kind.reconstruct(arrays, B)
            return
        grads, missed = c.kind.reconstruct(arrays, B)
        held = c.held.numpy()
        np.testing.assert_allclose(grads, held, rtol=0, atol=1e-12)
        lost = (c.G.numpy() ** 2).sum((1, 2)) - (held ** 2).sum((1, 2))
        np.testing.assert_allclose(missed, lost, rtol=0, atol=1e-12)
        if c.kind.exact:
            np.testing.assert_allclose(grads, c.G.numpy(), rtol=0, atol=1e-12)

    def test_implied_grad_is_the_batch_mean(self, name):
        c = _capture(name)
        if not c.kind.implies_grad:
            with pytest.raises(NotImplementedError):
                c.kind.implied_grad({}, np.array([B]))
            return
        assert c.kind.exact, "a kind that implies the batch gradient must hold it exactly"
        arrays = {k: v.numpy()[None] for k, v in c.stored().items()}
        got = c.kind.implied_grad(arrays, np.array([B]))
        np.testing.assert_allclose(got[0], c.G.mean(0).numpy(), rtol=0, atol=1e-12)

    # ------------------------------------------------------------------ recording (torch)
    def test_batch_size_mean_and_single_samples(self, name):
        c = _capture(name)
        kind, t = c.kind, c.tensors
        assert kind.batch_size(t) == B
        mean = kind.mean_gradient(t)
        if mean is not None:
            torch.testing.assert_close(mean, c.G.mean(0), rtol=0, atol=1e-12)
            r = torch.randn(c.G.shape[-1], 3, generator=_gen(3), dtype=F64)
            torch.testing.assert_close(kind.mean_gradient_times(t, r), c.G.mean(0) @ r,
                                       rtol=0, atol=1e-12)
        else:
            assert not kind.implies_grad
        if kind.exact:
            for i in (0, B - 1):
                torch.testing.assert_close(kind.sample_gradient(t, i), c.G[i], rtol=0,
                                           atol=1e-12)
            torch.testing.assert_close(kind.sample_gradients(t), c.G, rtol=0, atol=1e-12)
        else:
            assert kind.sample_gradient(t, 0) is None
            with pytest.raises(NotImplementedError):
                kind.sample_gradients(t)

    def test_rescale_scales_every_sample(self, name):
        c = _capture(name)
        if c.kind.projected:
            scaled = Captured(c.kind, c.setting, -2.5 * c.G, None,
                              c.kind.rescale(c.tensors, -2.5))
            _assert_noise(_noise_of(scaled.kind, scaled.stored()), _dense_noise(-2.5 * c.G))
            return
        u1, v1 = _pair(c)
        scaled = c.kind.rescale(c.stored(), -2.5)
        gv, gtu = c.kind.directions(c.stored(), u1, v1)
        sv, stu = c.kind.directions(scaled, u1, v1)
        torch.testing.assert_close(sv, -2.5 * gv, rtol=1e-13, atol=0)
        torch.testing.assert_close(stu, -2.5 * gtu, rtol=1e-13, atol=0)
        torch.testing.assert_close(c.kind.second_moment(scaled),
                                   6.25 * c.kind.second_moment(c.stored()), rtol=1e-13, atol=0)

    def test_concat_of_micro_batches_equals_the_whole_batch(self, name):
        kind = sketch_kind(name)
        form = SETTINGS[name].make(_gen(5), B)
        G = form.G
        basis = _basis() if kind.needs_basis else None
        whole = form.capture(kind, basis, slice(None))
        parts = [form.capture(kind, basis, slice(0, 2)), form.capture(kind, basis, slice(2, B))]
        c = Captured(kind, SETTINGS[name], G, basis, whole)
        joined = Captured(kind, SETTINGS[name], G, basis, kind.concat(parts)).stored()
        whole = c.stored()
        assert kind.batch_size(joined) == B
        if kind.projected:
            _assert_noise(_noise_of(kind, joined), _noise_of(kind, whole), rtol=1e-13)
            torch.testing.assert_close(kind.mean_gradient(kind.concat(parts)), G.mean(0),
                                       rtol=0, atol=1e-12)
            return
        u1, v1 = _pair(c)
        for a, b in zip(kind.directions(joined, u1, v1), kind.directions(whole, u1, v1)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        torch.testing.assert_close(kind.second_moment(joined), kind.second_moment(whole),
                                   rtol=0, atol=1e-12)
        if kind.mean_gradient(c.tensors) is not None:
            torch.testing.assert_close(kind.mean_gradient(kind.concat(parts)), G.mean(0),
                                       rtol=0, atol=1e-12)

    # ------------------------------------------------------------------ analysis (torch)
    def test_directions_second_moment_and_coverage(self, name):
        c = _capture(name)
        if c.kind.projected:
            with pytest.raises(NotImplementedError, match="basis_noise_terms"):
                c.kind.directions(c.stored(), *_pair(c))
            with pytest.raises(NotImplementedError, match="basis_noise_terms"):
                c.kind.second_moment(c.stored())
            _assert_noise(_noise_of(c.kind, c.stored()), _dense_noise(c.G))
            return
        u1, v1 = _pair(c)
        held_u, held_v = _held_pair(c, u1, v1)
        Gv, Gtu = c.kind.directions(c.stored(), u1, v1)
        torch.testing.assert_close(Gv, c.G @ held_v, rtol=0, atol=1e-12)
        torch.testing.assert_close(Gtu, c.G.mT @ held_u, rtol=0, atol=1e-12)
        torch.testing.assert_close(c.kind.second_moment(c.stored()), (c.G ** 2).sum(0),
                                   rtol=0, atol=1e-12)
        cu, cv = c.kind.coverage(c.stored(), u1, v1)
        torch.testing.assert_close(cu, torch.linalg.vector_norm(held_u), rtol=0, atol=1e-12)
        torch.testing.assert_close(cv, torch.linalg.vector_norm(held_v), rtol=0, atol=1e-12)

    def test_adaptor_carries_a_leading_step_dimension(self, name):
        steps = [_capture(name, seed=s) for s in (0, 1)]
        kind = steps[0].kind
        stacked = {k: torch.stack([c.stored()[k] for c in steps]) for k in steps[0].stored()}
        if kind.projected:
            got = basis_noise_terms(WEIGHT.expand(2, M, N), 0.1, stacked)
            got["grad_first"], got["grad_second"] = basis_gradient_terms(stacked)
            for i, c in enumerate(steps):
                _assert_noise({k: v[i] for k, v in got.items()}, _noise_of(kind, c.stored()),
                              rtol=1e-13)
            return
        pairs = [_pair(c) for c in steps]
        u1 = torch.stack([p[0] for p in pairs])
        v1 = torch.stack([p[1] for p in pairs])
        Gv, Gtu = kind.directions(stacked, u1, v1)
        sm = kind.second_moment(stacked)
        cu, cv = kind.coverage(stacked, u1, v1)
        assert kind.batch_size(stacked) == B
        for i, c in enumerate(steps):
            gv, gtu = kind.directions(c.stored(), *pairs[i])
            torch.testing.assert_close(Gv[i], gv, rtol=0, atol=1e-12)
            torch.testing.assert_close(Gtu[i], gtu, rtol=0, atol=1e-12)
            torch.testing.assert_close(sm[i], kind.second_moment(c.stored()), rtol=0, atol=1e-12)
            one_u, one_v = kind.coverage(c.stored(), *pairs[i])
            torch.testing.assert_close(cu[i], one_u, rtol=0, atol=1e-12)
            torch.testing.assert_close(cv[i], one_v, rtol=0, atol=1e-12)

    # ------------------------------------------------------------------ capabilities
    def test_needs_basis(self, name):
        kind = sketch_kind(name)
        form = SETTINGS[name].make(_gen(0), B)
        if kind.needs_basis:
            with pytest.raises(ValueError, match="basis"):
                form.capture(kind, None, slice(None))
        else:
            form.capture(kind, None, slice(None))  # no basis needed
            cu, cv = kind.coverage({}, torch.ones(M, dtype=F64), torch.ones(N, dtype=F64))
            assert float(cu) == 1.0 == float(cv)

    def test_capture_from_inputs_and_output_gradients(self, name):
        kind = sketch_kind(name)
        gen = _gen(4)
        basis = _basis() if kind.needs_basis else None
        positions = 1 if kind.single_position else 3
        act = torch.randn(B, N, positions, generator=gen, dtype=F64)
        delta = torch.randn(B, M, positions, generator=gen, dtype=F64)
        try:
            got, _ = kind.capture(act, delta, basis=basis)
        except NotImplementedError:
            return  # the kind is captured from its own form only (e.g. rows)
        G = delta @ act.mT
        try:
            want, _ = kind.capture_dense(G, basis=basis)
        except NotImplementedError:  # a factored kind: compare the gradients it holds
            if kind.projected:
                c = Captured(kind, SETTINGS[name], G, None, got)
                _assert_noise(_noise_of(kind, c.stored()), _dense_noise(G))
            else:
                torch.testing.assert_close(kind.sample_gradients(got), G, rtol=0, atol=1e-12)
        else:
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-12)
        if kind.single_position:
            with pytest.raises(ValueError, match="one position"):
                kind.capture(torch.randn(B, N, 2, dtype=F64), torch.randn(B, M, 2, dtype=F64),
                             basis=basis)

    def test_diagonal_kinds_hold_diagonal_matrices(self, name):
        kind = sketch_kind(name)
        if not kind.diagonal:
            return
        assert kind.exact, "the closed-form SDE terms need the exact diagonals"
        assert all(IN not in v.dims for v in kind.variables(1).values())
        tensors, _ = kind.capture_dense(torch.randn(B, M, M, generator=_gen(2), dtype=F64))
        G = kind.sample_gradients(tensors)
        assert torch.count_nonzero(G - torch.diag_embed(torch.diagonal(G, 0, -2, -1))) == 0


def _noise_of(kind: SketchKind, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A projected kind's noise terms at :data:`WEIGHT`, lr 0.1, and the batch gradient's
    (``grad_first``: ``u_1^T g v_1``, ``grad_second``: ``d^2 s_1[g]``)."""
    out = basis_noise_terms(WEIGHT, 0.1, stored)
    out["grad_first"], out["grad_second"] = basis_gradient_terms(stored)
    return out


def _dense_noise(G: torch.Tensor) -> dict[str, torch.Tensor]:
    """The noise terms of :func:`~trajlab.sde.layer_terms` from dense ``G`` at :data:`WEIGHT`
    (an independent computation: directions and the covariance diagonal straight from G)."""
    U, _, Vh = torch.linalg.svd(WEIGHT, full_matrices=False)
    u1, v1 = U[:, 0], Vh[0]
    g = G.mean(0)
    sd = ((G ** 2).sum(0) - B * g ** 2) / (B * (B - 1))
    out = layer_terms(WEIGHT, g, -0.1 * g, 0.1, G.shape[0], G @ v1, G.mT @ u1, sd, u1=u1,
                      v1=v1)
    out["grad_first"] = u1 @ g @ v1
    out["grad_second"] = hessian_quadform(WEIGHT, g[None])[0]
    return out


def _assert_noise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                  rtol: float = 1e-11) -> None:
    for k in NOISE:
        scale = float(want[k].abs().max())
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=rtol * scale, msg=k)


def _pair(c: Captured) -> tuple[torch.Tensor, torch.Tensor]:
    """A unit pair (u1, v1) to project on: W's top pair for a kind with a basis (the recorder's
    case: u1 in span U, v1 in span V), else a random one."""
    if c.kind.needs_basis:
        return c.basis[0][:, 0].clone(), c.basis[1][:, 0].clone()
    gen = _gen(11)
    u = torch.randn(c.G.shape[-2], generator=gen, dtype=F64)
    v = torch.randn(c.G.shape[-1], generator=gen, dtype=F64)
    return u / u.norm(), v / v.norm()


def _held_pair(c: Captured, u1: torch.Tensor, v1: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts of (u1, v1) the sketch projects on: ``U U^T u1``, ``V V^T v1`` for a kind with
    a basis, (u1, v1) for an exact kind."""
    if c.kind.needs_basis:
        U, V = c.basis
        return U @ (U.T @ u1), V @ (V.T @ v1)
    return u1, v1
