"""The sketch kinds of the new rules, against dense references: "diagonal" (normalisation
scales) and "rows" (embedding tables); and the SDE terms of a diagonal operator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trajlab.errors import RecorderError
from trajlab.record.rules import Diagonal, Rows
from trajlab.sde import sketch_layer_terms
from trajlab.sde.resolvent import resolvent_layer_terms
from trajlab.sketches import sketch_kind

F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- diagonal
def test_diagonal_kind_equals_dense_diagonals():
    kind = sketch_kind("diagonal")
    g = _gen()
    T, B, d = 3, 5, 4
    vals = torch.randn(T, B, d, generator=g, dtype=F64)
    G = torch.diag_embed(vals)  # (T, B, d, d)
    u1 = torch.randn(T, d, generator=g, dtype=F64)
    v1 = torch.randn(T, d, generator=g, dtype=F64)
    t = {"ps_diag": vals}
    Gv, Gtu = kind.directions(t, u1, v1)
    torch.testing.assert_close(Gv, (G @ v1[:, None, :, None])[..., 0], rtol=0, atol=1e-15)
    torch.testing.assert_close(Gtu, (G.mT @ u1[:, None, :, None])[..., 0], rtol=0, atol=1e-15)
    torch.testing.assert_close(kind.second_moment(t), (G * G).sum(1))
    tensors, dense = kind.capture_diagonal(vals[0], want_per_sample=True)
    torch.testing.assert_close(dense, G[0])
    torch.testing.assert_close(kind.mean_gradient(tensors), G[0].mean(0))
    r = torch.randn(d, 2, generator=g, dtype=F64)
    torch.testing.assert_close(kind.mean_gradient_times(tensors, r), G[0].mean(0) @ r)
    arrays = {"ps_diag": vals.numpy()}
    np.testing.assert_allclose(kind.implied_grad(arrays, np.full(T, B)), G.mean(1).numpy())
    grads, resid = kind.reconstruct({"ps_diag": vals[0].numpy()}, 3)
    np.testing.assert_array_equal(grads, G[0, :3].numpy())
    assert not resid.any()


def test_diagonal_form_captured_densely_by_other_kinds():
    g = _gen(1)
    vals = torch.randn(4, 5, generator=g, dtype=F64)
    U = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=F64)).Q
    got, _ = Diagonal(vals).capture(sketch_kind("subspace"), basis=(U, V), rank=2,
                                    want_per_sample=False)
    want, _ = sketch_kind("subspace").capture_dense(torch.diag_embed(vals), basis=(U, V))
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def _diag_step(gamma, seed=0, B=6, lr=0.1):
    g = _gen(seed)
    d = gamma.numel()
    vals = torch.randn(B, d, generator=g, dtype=F64)
    W = torch.diag(gamma)
    grad = torch.diag(vals.mean(0))
    return W, grad, -lr * grad, lr, {"ps_diag": vals}


@pytest.mark.parametrize("terms", ["svd", "resolvent"])
def test_sde_terms_of_a_diagonal_operator_have_the_closed_form(terms):
    """K = max|gamma|, d sigma_1[D] = sign(gamma_j*) D_j*j*, no second-order term along
    diagonal directions (MATH.md §2 with u_1 = sign e_j*, v_1 = e_j*)."""
    gamma = torch.tensor([0.7, -1.6, 1.1, -0.3, 1.2], dtype=F64)
    W, grad, upd, lr, t = _diag_step(gamma)
    if terms == "svd":
        out = sketch_layer_terms(W, grad, upd, lr, "diagonal", t)
    else:
        out = resolvent_layer_terms(W[None], grad[None], upd[None],
                                    torch.tensor([lr], dtype=F64), sketch="diagonal",
                                    tensors={k: v[None] for k, v in t.items()})
        out = {k: v[0] for k, v in out.items()}
    vals = t["ps_diag"]
    B, j = vals.shape[0], 1
    om = vals[:, j] - vals[:, j].mean()
    assert float(out["K"]) == pytest.approx(1.6, rel=1e-13)
    assert float(out["spectral_gap"]) == pytest.approx((1.6 - 1.2) / 1.6, rel=1e-12)
    assert not bool(out["degenerate"])
    assert float(out["drift_flow"]) == pytest.approx(float(grad[j, j]), rel=1e-12)  # -sign*g
    assert float(out["diffusion2"]) == pytest.approx(lr * float((om * om).sum()) / (B * (B - 1)),
                                                     rel=1e-12)
    for k in ("drift_noise", "drift_noise_var"):
        assert abs(float(out[k])) < 1e-14 * float(out["K"]), k
    assert float(out["pathwise_increment"]) == pytest.approx(-float(upd[j, j]), rel=1e-12)


def test_tied_maxima_are_flagged_degenerate():
    """The default gamma = 1 (and any tie of |gamma_j|) has no unique top pair."""
    for gamma in (torch.ones(4, dtype=F64), torch.tensor([1.5, 0.2, -1.5], dtype=F64)):
        W, grad, upd, lr, t = _diag_step(gamma)
        out = resolvent_layer_terms(W[None], grad[None], upd[None],
                                    torch.tensor([lr], dtype=F64), sketch="diagonal",
                                    tensors={k: v[None] for k, v in t.items()})
        assert bool(out["degenerate"][0]) and float(out["spectral_gap"][0]) == 0.0


# ----------------------------------------------------------------------------- rows
def _rows_case(seed=0, B=4, P=6, m=9, n=3):
    g = _gen(seed)
    index = torch.randint(0, m, (B, P), generator=g)
    index[:, 1] = index[:, 0]  # repeats are coalesced
    index[0, -1] = -1  # padding positions carry no gradient
    values = torch.randn(B, P, n, generator=g, dtype=F64)
    return Rows(index, values, m)


def test_rows_capture_coalesces_and_is_exact():
    rows = _rows_case()
    kind = sketch_kind("rows")
    t, dense = kind.capture_rows(rows.index, rows.values, rows=rows.rows, slots=6,
                                 want_per_sample=True)
    want = rows.dense()
    torch.testing.assert_close(dense, want)
    idx = t["ps_row_index"]
    assert idx.shape == (4, 6) and (idx[0] >= 0).sum() < 6  # coalesced: fewer than P rows
    for i in range(4):  # distinct rows per sample
        live = idx[i][idx[i] >= 0]
        assert live.unique().numel() == live.numel()
    np.testing.assert_array_equal(t["row_samples"].numpy(),
                                  (want != 0).any(-1).sum(0).numpy())
    torch.testing.assert_close(kind.mean_gradient(t), want.mean(0))
    r = torch.randn(3, 2, generator=_gen(3), dtype=F64)
    torch.testing.assert_close(kind.mean_gradient_times(t, r), want.mean(0) @ r)
    torch.testing.assert_close(kind.sample_gradient(t, 2), want[2])
    half = kind.concat([kind.rescale(t, 2.0), t])
    torch.testing.assert_close(kind.mean_gradient(half), 1.5 * want.mean(0))


def test_rows_adaptor_equals_dense_with_leading_dims():
    kind = sketch_kind("rows")
    steps = [kind.capture_rows(c.index, c.values, rows=c.rows, slots=6)[0]
             for c in (_rows_case(s) for s in range(3))]
    dense = torch.stack([kind.sample_gradients(t) for t in steps])  # (T, B, m, n)
    t = {k: torch.stack([s[k] for s in steps]) for k in steps[0]}
    t["ps_row_index"] = t["ps_row_index"].to(F64)  # the analysis reads every array as float64
    g = _gen(7)
    u1 = torch.randn(3, 9, generator=g, dtype=F64)
    v1 = torch.randn(3, 3, generator=g, dtype=F64)
    Gv, Gtu = kind.directions(t, u1, v1)
    torch.testing.assert_close(Gv, torch.einsum("tbmn,tn->tbm", dense, v1))
    torch.testing.assert_close(Gtu, torch.einsum("tbmn,tm->tbn", dense, u1))
    torch.testing.assert_close(kind.second_moment(t), (dense * dense).sum(1))
    arrays = {k: v.numpy() for k, v in t.items()}
    arrays["ps_row_index"] = arrays["ps_row_index"].astype(np.int64)
    np.testing.assert_allclose(kind.implied_grad(arrays, np.full(3, 4)),
                               dense.mean(1).numpy(), rtol=1e-14, atol=1e-15)
    one = {k: v[1] for k, v in arrays.items()}
    grads, resid = kind.reconstruct(one, 4)
    np.testing.assert_allclose(grads, dense[1].numpy(), rtol=1e-14, atol=1e-15)
    assert not resid.any()


def test_rows_more_distinct_rows_than_slots_is_a_clear_error():
    rows = _rows_case(P=6)
    with pytest.raises(RecorderError, match="distinct rows but the store keeps 2"):
        sketch_kind("rows").capture_rows(rows.index, rows.values, rows=rows.rows, slots=2)


def test_rows_form_captured_densely_by_other_kinds():
    rows = _rows_case()
    g = _gen(2)
    U = torch.linalg.qr(torch.randn(9, 2, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(3, 2, generator=g, dtype=F64)).Q
    got, _ = rows.capture(sketch_kind("subspace"), basis=(U, V), rank=2, want_per_sample=False)
    want, _ = sketch_kind("subspace").capture_dense(rows.dense(), basis=(U, V))
    for k in want:
        torch.testing.assert_close(got[k], want[k])


@pytest.mark.parametrize("options", [{}, {"population": 50}, {"full": True}, {"noise": False}])
def test_closed_form_diagonal_terms_equal_the_matrix_kernels(options):
    """diagonal_layer_terms (O(T B d)) == resolvent_layer_terms on diag(gamma) (O(T d^3))."""
    from trajlab.sde import diagonal_layer_terms

    g = _gen(9)
    T, B, d = 5, 6, 7
    gamma = (0.5 + torch.rand(T, d, generator=g, dtype=F64)) * torch.where(
        torch.rand(T, d, generator=g) < 0.5, -1.0, 1.0)
    vals = torch.randn(T, B, d, generator=g, dtype=F64)
    grad = vals.mean(1)
    upd = -0.1 * grad + 1e-3 * torch.randn(T, d, generator=g, dtype=F64)  # any optimizer
    lr = torch.full((T,), 0.1, dtype=F64)
    full = torch.randn(T, d, generator=g, dtype=F64) if options.get("full") else None
    if full is not None:
        full[1] = float("nan")  # no probe at that step
    noise = options.get("noise", True)
    pop = options.get("population")
    want = resolvent_layer_terms(
        torch.diag_embed(gamma), torch.diag_embed(grad), torch.diag_embed(upd), lr,
        sketch="diagonal" if noise else None, tensors={"ps_diag": vals} if noise else None,
        grad_full=None if full is None else torch.diag_embed(full), population=pop)
    got = diagonal_layer_terms(gamma, grad, upd, lr, ps_diag=vals if noise else None,
                               grad_full=full, population=pop)
    assert set(got) == set(want)
    assert not want["degenerate"].any()
    for k, v in want.items():
        torch.testing.assert_close(got[k].to(v.dtype), v, rtol=1e-10, atol=1e-13,
                                   equal_nan=True, msg=k)
