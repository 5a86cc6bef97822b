"""Emission: one recorded step's rows, as the writer takes them, and the new store's metadata.

After ``optimizer.step()`` returns, the recorder hands the step to the writer: one row per
layer (:func:`layer_rows`: weights before and after the update, ``.grad`` where stored, the
assembled per-sample tensors, the subspace basis, the probe gradient) and the root row
(:func:`root_row`: step, lr, batch size, loss, indices). At the first recorded step of a new
store, :func:`run_meta` fixes its metadata. Nothing here writes: the writer does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trajlab.errors import RecorderError
from trajlab.record import store_policy
from trajlab.record.layer_state import LayerState
from trajlab.record.optimizer_state import with_optimizer_spec
from trajlab.record.options import RecorderOptions
from trajlab.record.step import Micro
from trajlab.store.metadata import RunMeta


class LearningRates:
    """The learning rate a parameter's optimizer group has now (the group found once, and
    again when the groups change)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._group_of: dict[int, int | None] = {}

    def __call__(self, param: Tensor) -> float:
        groups = self.optimizer.param_groups
        index = self._group_of.get(id(param))
        if index is None or index >= len(groups) or not any(
                p is param for p in groups[index]["params"]):
            index = next((i for i, g in enumerate(groups)
                          if any(p is param for p in g["params"])), None)
            self._group_of[id(param)] = index
        if index is not None:
            lr = groups[index].get("lr", float("nan"))
            return float(lr.item() if isinstance(lr, Tensor) else lr)
        raise RecorderError(
            "a recorded layer's weight is not among the optimizer's parameters; pass the "
            "optimizer that trains this model"
        )


@torch.no_grad()
def layer_rows(layers: list[LayerState], *, lr_of: Callable[[Tensor], float],
               per_sample: bool, ps_dtype: torch.dtype | None,
               probe_grads: Mapping[str, Tensor] | None
               ) -> tuple[dict[str, dict[str, Any]], int | None, list[int]]:
    """Every layer's row of the step (call after ``optimizer.step()``).

    Returns
    -------
    rows : layer name -> variable -> tensor or number.
    batch : the samples every layer saw (None without per-sample information).
    micro_batches : the step's micro-batches that the layers' captures came from.

    Raises
    ------
    RecorderError
        Layers saw different numbers of samples.
    """
    rows: dict[str, dict[str, Any]] = {}
    batch = None
    micro_batches: list[int] = []
    for layer in layers:
        asm = layer.assembled
        Wnow = layer.weight().detach()
        W = layer.weight_before
        out: dict[str, Any] = {
            "lr": lr_of(layer.target.param),
            "weight": W,
            "weight_after": Wnow.clone(),  # the writer derives the update
            "grad_scale": float(asm.scale) if asm is not None else float("nan"),
        }
        if layer.meta.stored_grad:
            grad = layer.grad()
            out["grad"] = (torch.full_like(W, float("nan")) if grad is None
                           else grad.detach().clone())
        if per_sample:
            if asm is None:  # the capture failed (warned): its row holds NaN, flagged
                out["nonfinite"] = True
            else:
                b = asm.n
                if batch is not None and b != batch:
                    hint = (" (a layer whose input has batch size 1 is broadcast over the "
                            "batch, e.g. positional embeddings indexed with shape (1, T): "
                            "leave it out with layers=[...])" if min(b, batch) == 1 else "")
                    raise RecorderError(
                        f"layer {layer.name!r} saw {b} samples this step, other layers "
                        f"{batch}; all recorded layers must see the same batch{hint}")
                batch = b
                micro_batches = asm.micro_batches
                tensors = layer.kind.finalize(asm.tensors, W)  # after the step's checks
                for k, per in layer.kind.variables(layer.meta.rank).items():
                    if k in tensors:
                        v = tensors[k]
                        if per.dtype == "ps" and ps_dtype is not None:
                            v = v.to(ps_dtype)
                        elif per.dtype in ("ps", "param") and v.dtype == torch.bfloat16:
                            v = v.float()
                        out[k] = v
            if layer.kind.needs_basis and layer.basis is not None:
                U, V, residual = layer.basis
                out["basis_u"], out["basis_v"] = U, V
                out["basis_residual"] = float(residual)
        if probe_grads is not None:
            out["probe_grad"] = probe_grads[layer.name]
        rows[layer.name] = out
    return rows, batch, micro_batches


def logged_batch(micros: list[Micro]) -> int:
    """The step's batch size from what ``log()`` said (``batch_size=`` or the indices)."""
    return int(sum(m.batch or (m.indices.numel() if m.indices is not None else 0)
                   for m in micros))


def root_row(*, step: int, lr: float, batch: int, micros: list[Micro], probe: bool,
             extra: Mapping[str, Any], warn: Callable[[str, str], None]) -> dict[str, Any]:
    """The step's root row: its index, the first layer's lr, batch size, the mean of the logged
    losses and the logged indices (dropped, with ``warn(key, message)``, when they do not
    count the batch); ``extra`` are further root variables (BatchNorm's statistics)."""
    indices = None
    if micros and all(m.indices is not None for m in micros):
        indices = torch.cat([m.indices for m in micros])
        if indices.numel() != batch:
            warn("indices", f"log(indices=...) got {indices.numel()} indices for a batch of "
                 f"{batch} samples at step {step}; indices not recorded at this step")
            indices = None
    losses = [m.loss for m in micros if m.loss is not None]
    return {
        "step": np.int64(step),
        "lr": np.float64(lr),
        "batch_size": np.int32(batch),
        "loss": math.fsum(losses) / len(losses) if losses else float("nan"),
        "indices": indices,
        "probe": np.bool_(probe),
        **extra,  # BatchNorm's gamma, running_var (record/batchnorm.py)
    }


def run_meta(layers: list[LayerState], *, options: RecorderOptions, every: int,
             metadata: dict[str, Any], optimizer: torch.optim.Optimizer,
             summary: dict[str, Any], batch_size: int) -> RunMeta:
    """The metadata of a new run store, fixed at its first recorded step."""
    metas = [layer.meta for layer in layers]
    dtype = store_policy.numpy_dtype(layers[0].target.param.dtype)
    ps_dtype = options.per_sample_dtype or dtype
    chunk = options.chunk_steps or store_policy.chunk_steps(
        metas, batch_size, np.dtype(dtype).itemsize)
    # the optimizer's SDE parameters for the analysis (issue 23, optimizer_state.py)
    user = with_optimizer_spec(metadata, optimizer, [layer.target.param for layer in layers])
    return store_policy.new_meta(
        metas=metas, dtype=dtype, ps_dtype=ps_dtype, every=every, chunk=chunk,
        sampler=options.sampler, dataset_size=options.dataset_size, user=user,
        probe=options.probe is not None, model=summary)


__all__ = ["LearningRates", "layer_rows", "logged_batch", "root_row", "run_meta"]
