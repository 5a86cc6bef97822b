"""Assembly: a recorded step's captures turned into one checked record per layer.

Just before the optimizer applies ``.grad``, the recorder calls :func:`assemble_layer` for
every layer (the captures of all micro-batches, scaled so that their mean is ``.grad``, see
:func:`trajlab.record.step.assemble`); the first recorded step of a new store drops the layers
broadcast over the batch (:func:`drop_broadcast`) and runs :func:`first_step_checks`. Every
problem raised here names the layer and the fix.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from trajlab.errors import RecorderError, SelfCheckError, user_stacklevel
from trajlab.record import checks, store_policy
from trajlab.record.layer_state import LayerState
from trajlab.record.step import Assembled, Micro, assemble, interleaved, probes
from trajlab.store.metadata import RunMeta


def check_dtype(meta: RunMeta | None, layers: list[LayerState]) -> None:
    """Refuse a model whose dtype changed since the run store was made."""
    dtype = store_policy.numpy_dtype(layers[0].target.param.dtype)
    if meta is not None and meta.dtype != dtype:
        raise RecorderError(f"the model's weights are now {dtype} but the run stores "
                            f"{meta.dtype}: changing the model's dtype mid-run is not "
                            "supported; record the rest into a new store")


def gradient(layer: LayerState, *, step: int) -> Tensor | None:
    """The layer's ``.grad`` matrix; raises when the layer was never described (no forward
    with gradients) or its capture found a loop the recorder cannot record."""
    if layer.meta is None:
        raise RecorderError(
            f"layer {layer.name!r} saw no forward pass with gradients at step "
            f"{step}: it was not used in the forward pass, or backward ran under "
            "no_grad, or the model is run through torch.compile but an uncompiled "
            "module was given to Recorder (pass the compiled one). Record only layers "
            "used every step (layers=[...])")
    grad = layer.grad()
    if isinstance(layer.failed, RecorderError):
        raise layer.failed  # a loop the recorder cannot record (not numerical)
    return grad


def assemble_layer(layer: LayerState, grad: Tensor, *, step: int, first: int | None,
                   checked: bool) -> Assembled:
    """The layer's step from its captures, checked against ``grad``.

    Parameters
    ----------
    first : the micro-batch the other layers' records start at (None for the first layer).
    checked : whether the first recorded step is behind (a residual is then a
        ``RecorderError``, not a ``SelfCheckError``).
    """
    if layer.probe_r is None:
        layer.probe_r = probes(layer.meta.shape[1], grad.dtype, grad.device)
    try:
        asm = assemble(layer.kind, layer.captures, grad.detach(), layer.meta.positions,
                       layer.probe_r, first=first)
    except ValueError as e:
        raise SelfCheckError(
            f"layer {layer.name!r} was {e} (shared weights, e.g. a layer reused in a "
            "loop): its per-sample gradients are not recorded exactly; pass "
            "layers=[...] without it, or per_sample=False") from None
    if interleaved(layer.captures, asm.micro_batches):
        raise SelfCheckError(
            f"layer {layer.name!r}: the model was called {len(asm.micro_batches)} times "
            "before one shared backward (the model applied to its own output, or the "
            "losses of several forwards summed before backward()), so the samples of "
            "those calls are not distinct and their per-sample gradients cannot be told "
            "apart. Call backward() once per forward (gradient accumulation), or record "
            "with per_sample=False")
    # .grad is checked for NaN/Inf only when the check fails: isfinite(...).all() of a
    # 400k-element gradient costs ~3 ms on one CPU thread, more than a small step.
    if not asm.residual <= asm.tol and bool(torch.isfinite(grad).all()):
        msg = checks.unexplained_grad(layer.name, step, asm.residual, asm.tol, asm.scale)
        raise (SelfCheckError(msg) if not checked else RecorderError(msg))
    return asm


def failure(layer: LayerState, grad: Tensor | None, *, checked: bool) -> str:
    """Why a layer has no record this step (its row is then flagged non-finite); a layer
    without ``.grad`` at the first recorded step is an error."""
    if not checked and grad is None and not layer.failed:
        raise RecorderError(f"layer {layer.name!r} has no .grad at optimizer.step(): was "
                            "backward called, and is the layer trained?")
    return (f"{type(layer.failed).__name__}: {layer.failed}" if layer.failed else
            "no .grad at optimizer.step()" if grad is None
            else "no backward pass reached it this step")


def drop_broadcast(layers: list[LayerState], summary: dict[str, Any], *,
                   explicit: bool) -> list[LayerState]:
    """First step of a new store: leave out (with a warning) layers whose input has batch
    size 1 while the model's batch has more samples. Their output is broadcast over the
    batch (GPT-2's positional embedding ``wpe``, indexed with shape (1, T)), so the
    gradient reaching it is already summed over the samples: per-sample gradients cannot
    be separated. Selected explicitly with ``layers=``, such a layer is an error.

    Returns the layers kept; the summary's entries of the modules left out say why.
    """
    seen: dict[str, dict[int, int]] = {}
    full: dict[int, int] = {}
    for layer in layers:
        if layer.captures and layer.failed is None:
            seen[layer.name] = {c.micro: c.batch for c in layer.captures}
            for m, b in seen[layer.name].items():
                full[m] = max(full.get(m, 0), b)
    bad = [layer for layer in layers if layer.name in seen and all(
        b == 1 and full[m] > 1 for m, b in seen[layer.name].items())]
    if not bad:
        return layers
    B = max(full.values())
    names = ", ".join(repr(layer.name) for layer in bad)
    why = (f"its input has batch size 1 while the model's batch has {B} samples: it is "
           "broadcast over the batch (e.g. positional embeddings indexed with shape "
           "(1, T)), so the gradient reaching it is already summed over the samples and its "
           "per-sample gradients cannot be separated")
    fix = ("index it per sample (e.g. pass position_ids of shape (B, T)) to record it, or "
           "record with per_sample=False")
    if explicit or len(bad) == len(layers):
        raise SelfCheckError(f"layer(s) {names}: {why}. Leave it out of layers=[...], or "
                             f"{fix}")
    for layer in bad:
        layer.dropped = True
        layer.captures = []
    kept = [layer for layer in layers if not layer.dropped]
    modules = {layer.target.module_name for layer in bad}
    for e in summary["modules"]:
        if e["name"] in modules and not any(layer.target.module_name == e["name"]
                                            for layer in kept):
            e.update(recorded=False, recorded_parameters=0, why=why)
            e.pop("how", None)
    warnings.warn(f"trajlab: layer(s) {names} not recorded: {why}. The other layers are "
                  f"recorded; {fix}", RuntimeWarning, stacklevel=user_stacklevel())
    return kept


def first_step_checks(layers: list[LayerState], micros: list[Micro], model: nn.Module, *,
                      loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
                      isolated: Callable[[], contextlib.AbstractContextManager]) -> None:
    """The first recorded step's thorough checks: each layer's per-sample mean against its
    ``.grad``, and (with ``loss_fn`` and the logged inputs) sample 0's gradient recomputed
    independently, in ``isolated()`` (hooks off, RNG and buffers restored).

    Both read the sketch kind's own tensors (``mean_gradient``, ``sample_gradient``); sample 0's
    dense gradient kept by the capture is read only for a kind that cannot give it
    (:func:`trajlab.record.capture.gives_sample_gradient`).
    """
    for layer in layers:
        asm = layer.assembled
        if asm is None:
            continue
        mean = layer.kind.mean_gradient(asm.tensors)
        grad = layer.grad()
        if mean is not None and grad is not None:
            checks.check_mean(layer.name, mean, grad.detach(), asm.tol)
    if loss_fn is None:
        return
    asm0 = next((layer.assembled for layer in layers), None)
    if asm0 is None:
        return
    micro = micros[asm0.first_micro] if asm0.first_micro < len(micros) else None
    if micro is None or micro.inputs is None:
        return
    entries = []
    for layer in layers:
        asm = layer.assembled
        if asm is None:
            entries.append((layer.name, None, 1.0))
            continue
        g0 = layer.kind.sample_gradient(asm.tensors, 0)
        if g0 is None and asm.per_sample is not None:
            g0 = asm.per_sample[0]
        entries.append((layer.name, g0, asm.scale))
    tol = max(layer.assembled.tol for layer in layers if layer.assembled is not None)
    micro_batches = len(asm0.micro_batches)

    def recompute() -> list[Tensor | None]:
        params = [layer.target.param for layer in layers]
        with isolated(), torch.enable_grad(), checks.replayed(micro.rng, micro.autocast):
            out = checks.call_model(model, micro.inputs)
            B = checks.batch_of(micro.inputs)
            loss = checks.sample_loss(loss_fn, out, micro.targets, B)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        res = []
        for layer, g in zip(layers, grads):
            if g is None:
                res.append(None)
                continue
            t = layer.target
            res.append(t.rule.matrix_of(t.module, t.matrix, g))
        return res

    checks.check_one_sample(entries, recompute, tol=max(tol, 1e4 * checks.eps_of(
        layers[0].target.param.dtype)), n=asm0.n, micro_batches=micro_batches)


__all__ = ["assemble_layer", "check_dtype", "drop_broadcast", "failure", "first_step_checks",
           "gradient"]
