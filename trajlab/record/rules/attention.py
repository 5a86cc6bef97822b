"""nn.MultiheadAttention: q, k, v and the output projection as four recorded matrices.

The projections happen inside ``F.multi_head_attention_forward``, so no module output carries
their gradients. The rule replays the attention once per recorded micro-batch, in the backward
pass, from the captured inputs: the projected ``q, k, v`` (computed with the layer's own
weights) enter the same functional call with identity projections, so autograd gives
``dL/dq, dL/dk, dL/dv`` (B, L, E) and the per-sample gradients are exact patches
``G_i = sum_l delta_il x_il^T`` over the sequence (a subspace sketch, as for a Linear over
sequences). Multiplying by an identity matrix is exact in floating point, and the RNG state
and autocast settings of the original call are restored, so attention dropout draws the same
mask: the replay is the training forward, not an approximation of it.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trajlab.record.rules.base import (
    Description,
    LayerRule,
    Matrix,
    Patches,
    require_batched,
)
from trajlab.sketches import Subspace

#: Private keyword (added by :meth:`MultiheadAttentionRule.install`, never the user's) carrying
#: the RNG state and autocast settings the forward started with.
_STATE = "_trajlab_forward_state"
_PARTS = ("q", "k", "v")


def _forward_state(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, Any] | None:
    """RNG state (when attention dropout is active) and autocast settings of a forward."""
    rng = None
    if module.training and module.dropout > 0:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        rng = (torch.random.get_rng_state(), cuda)
    query = args[0] if args else kwargs.get("query")
    device = query.device.type if isinstance(query, Tensor) else "cpu"
    amp = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
    return rng, (device, amp)


@contextlib.contextmanager
def _replayed(state: tuple[Any, Any] | None):
    rng, (device, amp) = state if state is not None else (None, ("cpu", None))
    devices = list(range(torch.cuda.device_count())) if rng and rng[1] is not None else []
    with torch.random.fork_rng(devices=devices, enabled=rng is not None):
        if rng is not None:
            torch.random.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            yield


class _Replay:
    """Per-micro-batch results shared by the four matrices of one attention call."""

    def __init__(self, inputs: dict[str, Tensor], grads: dict[str, Tensor], attn: Tensor):
        self.inputs, self.grads, self.attn = inputs, grads, attn


class MultiheadAttentionRule(LayerRule):
    """``nn.MultiheadAttention``: ``name:q``, ``name:k``, ``name:v`` (row blocks of
    ``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when kdim/vdim
    differ from embed_dim) and ``name:out`` (``out_proj.weight``; the rule claims ``out_proj``,
    whose forward is never called). ``batch_first`` either way, ``key_padding_mask``,
    ``attn_mask``, ``is_causal``, ``add_bias_kv``, ``add_zero_attn`` and dropout are replayed as
    given. Gradients reaching the returned attention weights are not part of the per-sample
    gradients (the first step's self-check reports it if a loss uses them)."""

    module_type = "MultiheadAttention"
    positionwise = False  # reads batch_first itself

    def __init__(self) -> None:
        # One replay per attention call, shared by its four matrices; an entry lives as long as
        # the call's query tensor (the recorder keeps it until the backward has passed).
        self._memo: dict[int, tuple[weakref.ref, tuple, _Replay]] = {}

    def matrices(self, module: nn.Module) -> list[Matrix]:
        E = module.embed_dim
        if module._qkv_same_embed_dim:
            qkv = [Matrix(p, "in_proj_weight", (i * E, (i + 1) * E))
                   for i, p in enumerate(_PARTS)]
        else:
            qkv = [Matrix(p, f"{p}_proj_weight") for p in _PARTS]
        return [*qkv, Matrix("out", "out_proj.weight")]

    def claims(self, module: nn.Module) -> list[str]:
        return ["out_proj"]

    def install(self, module, on_forward):
        pending: list[Any] = []

        def pre(mod, args, kwargs):
            pending[:] = [_forward_state(mod, args, kwargs)]

        def hook(mod, args, kwargs, output):
            state = pending.pop() if pending else None
            on_forward(args, {**kwargs, _STATE: state}, output)

        return [module.register_forward_pre_hook(pre, with_kwargs=True),
                module.register_forward_hook(hook, with_kwargs=True)]

    def batch_size(self, module, args, kwargs) -> int:
        q = _bound(module, args, kwargs)["query"]
        return int(q.shape[0] if module.batch_first else q.shape[1])

    def describe(self, module, matrix, args, kwargs) -> Description:
        p = _bound(module, args, kwargs)
        for name in ("query", "key", "value"):
            require_batched(module, name, p[name], 3)
        seq = 1 if module.batch_first else 0
        which = {"q": "query", "out": "query", "k": "key", "v": "value"}[matrix.part]
        return Description(Subspace.name, int(p[which].shape[seq]))

    def per_sample(self, module, matrix, args, kwargs, grad_out: Tensor) -> Patches:
        rep = self._replay(module, args, kwargs, grad_out)
        if matrix.part == "out":
            act, delta = rep.attn, grad_out
        else:
            act, delta = rep.inputs[matrix.part], rep.grads[matrix.part]
        if module.batch_first:  # (B, L, E) -> (B, E, L)
            act, delta = act.transpose(1, 2), delta.transpose(1, 2)
        else:  # (L, B, E) -> (B, E, L)
            act, delta = act.permute(1, 2, 0), delta.permute(1, 2, 0)
        return Patches(act, delta * act.shape[0])  # undo the loss mean

    # ------------------------------------------------------------------ the replay
    def _replay(self, module: nn.Module, args: tuple, kwargs: dict, grad_out: Tensor) -> _Replay:
        p = _bound(module, args, kwargs)
        query = p["query"]
        sig = (id(module), grad_out.data_ptr(), tuple(grad_out.shape), grad_out.dtype)
        hit = self._memo.get(id(query))
        if hit is not None and hit[0]() is query and hit[1] == sig:
            return hit[2]
        rep = _attention_replay(module, p, kwargs.get(_STATE), grad_out)
        key = id(query)
        ref = weakref.ref(query, lambda _r, k=key, memo=self._memo: memo.pop(k, None))
        self._memo[key] = (ref, sig, rep)
        return rep


def _bound(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    user = {k: v for k, v in kwargs.items() if k != _STATE}
    ba = inspect.signature(module.forward).bind(*args, **user)
    ba.apply_defaults()
    return dict(ba.arguments)


def _projections(module: nn.Module) -> tuple[list[Tensor], list[Tensor | None]]:
    if module._qkv_same_embed_dim:
        ws = list(module.in_proj_weight.detach().chunk(3))
    else:
        ws = [getattr(module, f"{p}_proj_weight").detach() for p in _PARTS]
    b = module.in_proj_bias
    bs = list(b.detach().chunk(3)) if b is not None else [None, None, None]
    return ws, bs


def _attention_replay(module: nn.Module, p: dict[str, Any], state, grad_out: Tensor) -> _Replay:
    ws, bs = _projections(module)
    raw = {part: p[name].detach() for part, name in zip(_PARTS, ("query", "key", "value"))}
    E = module.embed_dim
    with torch.enable_grad(), _replayed(state):
        proj = {}
        with torch.no_grad():
            for part, w, b in zip(_PARTS, ws, bs):
                proj[part] = F.linear(raw[part], w, b)
        leaves = {k: v.detach().requires_grad_(True) for k, v in proj.items()}
        q, k, v = (leaves[part] for part in _PARTS)
        if module.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        eye = torch.eye(E, dtype=q.dtype, device=q.device)
        bias_k = None if module.bias_k is None else module.bias_k.detach()
        bias_v = None if module.bias_v is None else module.bias_v.detach()
        attn, _ = F.multi_head_attention_forward(
            q, k, v, E, module.num_heads, None, None, bias_k, bias_v, module.add_zero_attn,
            module.dropout, eye, None, training=module.training,
            key_padding_mask=p["key_padding_mask"], need_weights=p["need_weights"],
            attn_mask=p["attn_mask"], use_separate_proj_weight=True, q_proj_weight=eye,
            k_proj_weight=eye, v_proj_weight=eye,
            average_attn_weights=p["average_attn_weights"], is_causal=p["is_causal"])
        if module.batch_first:
            attn = attn.transpose(0, 1)
        d_attn = grad_out.to(attn.dtype) @ module.out_proj.weight.detach().to(attn.dtype)
        grads = torch.autograd.grad(attn, [leaves[part] for part in _PARTS], d_attn,
                                    allow_unused=True)
    out = {part: (torch.zeros_like(leaves[part]) if g is None else g)
           for part, g in zip(_PARTS, grads)}
    return _Replay(raw, out, attn.detach())
