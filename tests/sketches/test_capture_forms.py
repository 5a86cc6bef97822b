"""The default ``capture_diagonal`` / ``capture_rows`` of a sketch kind: a kind without a compact
form for diagonal or row-sparse per-sample gradients sketches the dense matrices, built here
sample by sample, with the same basis; a kind that cannot sketch dense gradients says so by
name."""

from __future__ import annotations

import re

import pytest
import torch

from trajlab.sketches import SketchKind, sketch_kinds
from trajlab.sketches.base import dense_from_rows

F64 = torch.float64
B, M, N, P, K = 4, 6, 3, 5, 2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rows_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with repeats within a sample and skipped (negative) positions."""
    g = _gen(0)
    index = torch.randint(0, M, (B, P), generator=g)
    index[0, 1] = index[0, 0]  # a repeated row: its gradients add up
    index[1, 2] = -1
    index[2, :] = -1  # a sample without any gradient
    return index, torch.randn(B, P, N, generator=g, dtype=F64)


def _dense_by_loop(index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    G = torch.zeros(B, M, N, dtype=F64)
    for i in range(B):
        for p in range(P):
            if index[i, p] >= 0:
                G[i, index[i, p]] += values[i, p]
    return G


def _basis(kind: SketchKind, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not kind.needs_basis:
        return None
    g = _gen(1)
    return (torch.linalg.qr(torch.randn(m, K, generator=g, dtype=F64)).Q,
            torch.linalg.qr(torch.randn(n, K, generator=g, dtype=F64)).Q)


def _assert_same(got, want):
    assert sorted(got[0]) == sorted(want[0])
    for k in want[0]:
        torch.testing.assert_close(got[0][k], want[0][k], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_dense_from_rows_equals_the_sum_sample_by_sample():
    index, values = _rows_case()
    torch.testing.assert_close(dense_from_rows(index, values, M), _dense_by_loop(index, values),
                               rtol=0, atol=1e-15)


def _inherits(kind: SketchKind, method: str) -> bool:
    return getattr(type(kind), method) is getattr(SketchKind, method)


def _defaults(method: str) -> list[str]:
    """Kinds that sketch dense gradients and keep the default ``method``."""
    return sorted(name for name, kind in sketch_kinds().items()
                  if _inherits(kind, method) and not _inherits(kind, "capture_dense"))


@pytest.mark.parametrize("name", _defaults("capture_diagonal"))
def test_default_capture_diagonal_sketches_the_dense_diagonals(name):
    kind = sketch_kinds()[name]
    values = torch.randn(B, M, generator=_gen(2), dtype=F64)
    dense = torch.stack([torch.diag(v) for v in values])
    basis = _basis(kind, M, M)
    _assert_same(kind.capture_diagonal(values, basis=basis, want_per_sample=True),
                 kind.capture_dense(dense, basis=basis, want_per_sample=True))


@pytest.mark.parametrize("name", _defaults("capture_rows"))
def test_default_capture_rows_sketches_the_dense_rows(name):
    kind = sketch_kinds()[name]
    index, values = _rows_case()
    basis = _basis(kind, M, N)
    _assert_same(kind.capture_rows(index, values, rows=M, slots=P, basis=basis,
                                   want_per_sample=True),
                 kind.capture_dense(_dense_by_loop(index, values), basis=basis,
                                    want_per_sample=True))


@pytest.mark.parametrize("name", sorted(
    name for name, kind in sketch_kinds().items() if _inherits(kind, "capture_dense")))
def test_a_kind_that_cannot_sketch_dense_gradients_says_so_by_name(name):
    kind = sketch_kinds()[name]
    index, values = _rows_case()
    with pytest.raises(NotImplementedError, match=re.escape(repr(kind.name))):
        kind.capture_diagonal(values[:, 0])
    with pytest.raises(NotImplementedError, match=re.escape(repr(kind.name))):
        kind.capture_rows(index, values, rows=M, slots=P)
