"""Exact row-sparse per-sample gradients (embedding tables): (row index, row gradient) pairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from trajlab.dims import IN, OUT, RANK, SAMPLE
from trajlab.errors import RecorderError
from trajlab.sketches.base import SketchKind, Var, _require


class RowsSketch(SketchKind):
    """``ps_row_index`` (B, R), ``ps_row_grad`` (B, R, n) and ``row_samples`` (m,) with
    ``G_i = sum_r e_{ps_row_index[i, r]} ps_row_grad[i, r]^T``.

    Each sample's distinct rows, coalesced (a token repeated in a sequence is one row), padded
    with index -1 and zero rows up to R slots (the layer's ``rank``: the positions per sample at
    the first recorded step); ``row_samples`` counts the samples touching each row (and gives
    m). Exact: B R (n + 1) + m numbers per step instead of B m n, no one-hot matrix is ever
    formed, and the batch mean is the batch gradient (``grad`` is not stored). The analysis
    adaptor gathers and scatters rows: ``G_i v_1`` puts ``row . v_1`` at each row index,
    ``G_i^T u_1 = sum_r u_1[index_r] row_r``; ``sum_i G_i**2`` is one scatter-add.
    """

    name = "rows"
    summary = "exact sparse rows"
    exact = True
    implies_grad = True
    batch_var = ("ps_row_index", -2)

    def variables(self, rank: int) -> dict[str, Var]:
        return {
            "ps_row_index": Var((SAMPLE, RANK), "int64", "row of W whose gradient the slot "
                                "holds (-1: empty slot)"),
            "ps_row_grad": Var((SAMPLE, RANK, IN), "ps", "per-sample gradient of that row "
                               "(scaled by the batch size): G_i = sum_slots "
                               "outer(e_ps_row_index, ps_row_grad)", True),
            "row_samples": Var((OUT,), "int32", "number of samples whose gradient has this "
                               "row at this step"),
        }

    # ------------------------------------------------------------------ recording
    def capture_rows(self, index: Tensor, values: Tensor, *, rows: int, slots: int,
                     basis: tuple[Tensor, Tensor] | None = None, want_per_sample: bool = False):
        """Coalesce per-position (row, gradient) pairs into ``slots`` rows per sample.

        Parameters
        ----------
        index : (B, P) integer rows (negative: no gradient).  values : (B, P, n).
        rows : rows m of the matrix.  slots : R, rows stored per sample.
        basis : unused (the rows are exact).

        Raises
        ------
        RecorderError
            A sample holds more than ``slots`` distinct rows.
        """
        B, P, n = values.shape
        dev = index.device
        keep = (index >= 0).reshape(-1)
        sample = torch.arange(B, device=dev).repeat_interleave(P)[keep]
        key = sample * rows + index.reshape(-1)[keep]
        uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
        summed = values.new_zeros(uniq.shape[0], n).index_add_(
            0, inverse, values.reshape(-1, n)[keep])
        owner = torch.div(uniq, rows, rounding_mode="floor")
        row = uniq - owner * rows
        counts = torch.bincount(owner, minlength=B)
        if counts.numel() and int(counts.max()) > slots:
            raise RecorderError(
                f"a sample holds {int(counts.max())} distinct rows but the store keeps {slots} "
                "per sample (the positions per sample at the first recorded step); record "
                "inputs no longer than at the first step, or record this run into a new store")
        slot = torch.arange(uniq.shape[0], device=dev) - (torch.cumsum(counts, 0) - counts)[owner]
        out_index = torch.full((B, slots), -1, dtype=torch.int64, device=dev)
        out_index[owner, slot] = row
        out_rows = values.new_zeros(B, slots, n)
        out_rows[owner, slot] = summed
        tensors = {"ps_row_index": out_index, "ps_row_grad": out_rows,
                   "row_samples": torch.bincount(row, minlength=rows)}
        return tensors, (self.sample_gradients(tensors) if want_per_sample else None)

    def capture_dense(self, G, *, basis=None, want_per_sample=False):
        B, m, _ = G.shape
        index = torch.arange(m, device=G.device).expand(B, m)
        index = torch.where((G != 0).any(-1), index, torch.full_like(index, -1))
        return self.capture_rows(index, G, rows=m, slots=m, want_per_sample=want_per_sample)

    def sample_gradients(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """The dense per-sample gradients (..., B, m, n)."""
        return _scatter(_index(tensors), tensors["ps_row_grad"], _rows(tensors))

    def mean_gradient(self, tensors):
        return self.sample_gradients(tensors).mean(-3)

    def mean_gradient_times(self, tensors, r):
        val = tensors["ps_row_grad"]
        proj = val @ r.to(val.dtype)  # (B, R, p): rows times the probes, no dense matrix
        return _scatter(_index(tensors), proj, _rows(tensors)).mean(-3)

    def sample_gradient(self, tensors, i):
        one = {k: (v[i:i + 1] if k != "row_samples" else v) for k, v in tensors.items()}
        return self.sample_gradients(one)[0]

    def rescale(self, tensors, c):
        return {**tensors, "ps_row_grad": tensors["ps_row_grad"] * c}

    def concat(self, parts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        out = {k: torch.cat([p[k] for p in parts]) for k in ("ps_row_index", "ps_row_grad")}
        out["row_samples"] = sum(p["row_samples"] for p in parts)
        return out

    # ------------------------------------------------------------------ reading (numpy)
    def implied_grad(self, arrays, batch):
        idx = np.asarray(arrays["ps_row_index"])
        val = np.asarray(arrays["ps_row_grad"])
        m = np.asarray(arrays["row_samples"]).shape[-1]
        T, n = val.shape[0], val.shape[-1]
        out = np.zeros((T, m, n), dtype=np.float64)
        keep = idx >= 0
        t = np.broadcast_to(np.arange(T)[:, None, None], idx.shape)
        np.add.at(out, (t[keep], idx[keep]), np.nan_to_num(val[keep].astype(np.float64)))
        return (out / np.maximum(np.asarray(batch), 1)[:, None, None]).astype(val.dtype)

    def reconstruct(self, arrays, b):
        idx = np.asarray(arrays["ps_row_index"])[:b]
        val = np.asarray(arrays["ps_row_grad"])[:b]
        m = np.asarray(arrays["row_samples"]).shape[-1]
        out = np.zeros((b, m, val.shape[-1]), dtype=val.dtype)
        keep = idx >= 0
        s = np.broadcast_to(np.arange(b)[:, None], idx.shape)
        np.add.at(out, (s[keep], idx[keep]), val[keep])
        return out, np.zeros(b, dtype=val.dtype)

    # ------------------------------------------------------------------ analysis (torch)
    def needs(self) -> tuple[str, ...]:
        return ("ps_row_index", "ps_row_grad", "row_samples")

    def directions(self, tensors, u1, v1):
        _require(self, tensors, self.needs())
        idx, val = _index(tensors), tensors["ps_row_grad"]
        keep = (idx >= 0).to(val.dtype)
        safe = idx.clamp_min(0)
        lead = val.shape[:-2]  # (..., B)
        rv = torch.einsum("...rn,...n->...r", val, v1.to(val.dtype)[..., None, :]) * keep
        Gv = val.new_zeros(*lead, u1.shape[-1]).scatter_add_(-1, safe, rv)
        u = u1.to(val.dtype)[..., None, :].expand(*lead, u1.shape[-1])
        ur = torch.gather(u, -1, safe) * keep  # (..., B, R)
        return Gv, torch.einsum("...r,...rn->...n", ur, val)

    def second_moment(self, tensors):
        _require(self, tensors, self.needs())
        idx, val = _index(tensors), tensors["ps_row_grad"]
        lead = val.shape[:-3]
        n = val.shape[-1]
        flat_idx = idx.clamp_min(0).reshape(*lead, -1)
        sq = (val * val * (idx >= 0).to(val.dtype)[..., None]).reshape(*lead, -1, n)
        out = val.new_zeros(*lead, _rows(tensors), n)
        return out.scatter_add_(-2, flat_idx[..., None].expand(*flat_idx.shape, n), sq)


def _index(tensors: Mapping[str, Tensor]) -> Tensor:
    idx = tensors["ps_row_index"]
    return idx if not idx.is_floating_point() else idx.round().to(torch.int64)


def _rows(tensors: Mapping[str, Tensor]) -> int:
    return int(tensors["row_samples"].shape[-1])


def _scatter(idx: Tensor, val: Tensor, m: int) -> Tensor:
    """Dense (..., B, m, n) from slots ``idx`` (..., B, R) and rows ``val`` (..., B, R, n)."""
    keep = (idx >= 0).to(val.dtype)[..., None]
    safe = idx.clamp_min(0)[..., None].expand(*idx.shape, val.shape[-1])
    out = val.new_zeros(*val.shape[:-2], m, val.shape[-1])
    return out.scatter_add_(-2, safe, val * keep)
