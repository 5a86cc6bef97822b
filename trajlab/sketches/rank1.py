"""Exact rank-one factors: a layer without weight sharing has ``G_i = outer(delta_i, a_i)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from trajlab.dims import IN, OUT, SAMPLE
from trajlab.sketches.base import SketchKind, Var, _require


class Rank1(SketchKind):
    """``ps_grad_out`` (B, m), ``ps_input`` (B, n): ``G_i = outer(ps_grad_out_i, ps_input_i)``.

    Exact and independent of any SVD: B(m + n) numbers per step instead of B m n. The batch
    mean ``mean_i outer(delta_i, a_i)`` is the batch gradient, so ``grad`` is not stored.
    """

    name = "rank1"
    summary = "exact rank-1 factors"
    exact = True
    implies_grad = True
    batch_var = ("ps_grad_out", -2)
    single_position = True

    def variables(self, rank: int) -> dict[str, Var]:
        return {
            "ps_grad_out": Var((SAMPLE, OUT), "ps", "per-sample output gradient (scaled by the "
                               "batch size): G_i = outer(ps_grad_out, ps_input)", True),
            "ps_input": Var((SAMPLE, IN), "ps", "per-sample layer input", True),
        }

    def capture(self, act, delta, *, basis=None, want_per_sample=False):
        if act.shape[-1] != 1:
            raise ValueError("rank-1 factors need one position per sample")
        a, d = act[..., 0], delta[..., 0]
        ps = torch.einsum("bm,bn->bmn", d, a) if want_per_sample else None
        return {"ps_grad_out": d, "ps_input": a.clone()}, ps

    def mean_gradient(self, tensors):
        d, a = tensors["ps_grad_out"], tensors["ps_input"]
        return d.transpose(-1, -2) @ a.to(d.dtype) / d.shape[-2]

    def mean_gradient_times(self, tensors, r):
        d, a = tensors["ps_grad_out"], tensors["ps_input"]
        return d.transpose(-1, -2) @ (a @ r.to(a.dtype)).to(d.dtype) / d.shape[-2]

    def sample_gradient(self, tensors, i):
        return torch.outer(tensors["ps_grad_out"][i], tensors["ps_input"][i])

    def sample_gradients(self, tensors):
        d, a = tensors["ps_grad_out"], tensors["ps_input"]
        return d[..., :, None] * a[..., None, :]

    def rescale(self, tensors, c):
        return {**tensors, "ps_grad_out": tensors["ps_grad_out"] * c}

    def concat(self, parts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        return {k: torch.cat([p[k] for p in parts]) for k in ("ps_grad_out", "ps_input")}

    def implied_grad(self, arrays, batch):
        d = np.nan_to_num(np.asarray(arrays["ps_grad_out"], dtype=np.float64))
        a = np.nan_to_num(np.asarray(arrays["ps_input"], dtype=np.float64))
        g = np.einsum("tbm,tbn->tmn", d, a, optimize=True)
        dtype = np.result_type(arrays["ps_grad_out"].dtype, arrays["ps_input"].dtype)
        return (g / np.maximum(np.asarray(batch), 1)[:, None, None]).astype(dtype)

    def reconstruct(self, arrays, b):
        d = np.asarray(arrays["ps_grad_out"])[:b]
        a = np.asarray(arrays["ps_input"])[:b]
        grads = np.einsum("bm,bn->bmn", d, a)
        return grads, np.zeros(b, dtype=grads.dtype)

    def directions(self, tensors, u1, v1):
        _require(self, tensors, ("ps_grad_out", "ps_input"))
        d, a = tensors["ps_grad_out"], tensors["ps_input"]
        av = torch.einsum("...bn,...n->...b", a, v1.to(a.dtype))
        du = torch.einsum("...bm,...m->...b", d, u1.to(d.dtype))
        return d * av[..., None], a * du[..., None]

    def second_moment(self, tensors):
        _require(self, tensors, ("ps_grad_out", "ps_input"))
        d, a = tensors["ps_grad_out"], tensors["ps_input"]
        return torch.einsum("...bm,...bn->...mn", d * d, a * a)
