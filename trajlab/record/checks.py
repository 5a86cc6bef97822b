"""The recorder's checks that what it captures is what the optimizer applies.

* Every recorded step: a random-probe fit of ``.grad`` against the captured per-sample
  gradients (:mod:`trajlab.record.step`), which finds the applied scale and the micro-batches
  ``.grad`` holds, and fails when no scalar explains ``.grad``.
* First recorded step: the full batch mean against ``.grad``, and, given ``loss_fn`` and the
  batch, one sample's gradient recomputed independently, replaying the forward's randomness
  (dropout) and autocast state. Messages name the cause the numbers point to, and only that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from trajlab.errors import SelfCheckError


def eps_of(*dtypes: torch.dtype | None) -> float:
    """Machine epsilon of the lowest floating precision among ``dtypes``."""
    out = 0.0
    for d in dtypes:
        if d is not None and d.is_floating_point:
            out = max(out, float(torch.finfo(d).eps))
    return out


def unexplained_grad(layer: str, step: int, residual: float, tol: float, scale: float) -> str:
    return (
        f"layer {layer!r} at step {step}: the per-sample gradients captured through the layer's "
        f"forward do not explain its .grad, even allowing a global scale (relative residual "
        f"{residual:.2e}, tolerance {tol:.1e}, best scale {scale:.4g}). Something added to or "
        "changed .grad other than a rescaling: an explicit penalty on the weights in the loss "
        "(use the optimizer's weight_decay instead), the weight used outside the layer (tied "
        "weights, a functional call), or an elementwise edit such as clip_grad_value_ "
        "(clip_grad_norm_ and GradScaler are fine)"
    )


def check_mean(layer: str, mean: Tensor, grad: Tensor, tol: float) -> None:
    """First recorded step: the assembled batch mean must equal ``.grad``."""
    scale = torch.linalg.vector_norm(grad.double()).clamp_min(1e-300)
    err = float(torch.linalg.vector_norm(mean.double() - grad.double()) / scale)
    if not err <= tol and bool(torch.isfinite(grad).all()):
        raise SelfCheckError(
            f"self-check failed for layer {layer!r}: the batch mean of the recorded per-sample "
            f"gradients differs from .grad by {err:.2e} (relative, tolerance {tol:.1e}) although "
            "a scalar explained it on probe vectors. Pass self_check=False to record anyway, "
            "and please report this case"
        )


@contextlib.contextmanager
def replayed(rng: Any, autocast: Sequence[tuple[str, torch.dtype]] | None):
    """Run with the RNG state a forward started from, and its autocast settings."""
    devices = list(range(torch.cuda.device_count())) if rng and rng[1] is not None else []
    with torch.random.fork_rng(devices=devices):
        if rng is not None:
            torch.random.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])
        with contextlib.ExitStack() as stack:
            for device_type, dtype in autocast or ():
                stack.enter_context(torch.autocast(device_type, dtype=dtype))
            yield


def rng_state() -> tuple[Tensor, list[Tensor] | None]:
    """The CPU (and CUDA, when initialised) RNG states, to replay a forward."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), cuda


def autocast_state(device_types: Sequence[str]) -> list[tuple[str, torch.dtype]]:
    """Autocast settings in force now, per device type."""
    out = []
    for dt in device_types:
        try:
            if torch.is_autocast_enabled(dt):
                out.append((dt, torch.get_autocast_dtype(dt)))
        except (RuntimeError, TypeError):  # pragma: no cover - device type unknown to torch
            continue
    return out


def check_one_sample(
    layers: Sequence[tuple[str, Tensor | None, float]],
    recompute: Callable[[], list[Tensor | None]],
    *,
    tol: float,
    n: int,
    micro_batches: int,
) -> None:
    """Sample 0's gradient recomputed with ``loss_fn`` against the recorded one.

    The recorded per-sample gradients are those the optimizer applied: equal to the gradient
    of each sample's own loss when the training loss is the batch mean and any loss scale was
    undone in ``.grad`` (GradScaler), or that times the scale ``c`` applied to ``.grad`` after
    backward (clipping). Either is accepted; anything else is named.

    Parameters
    ----------
    layers : (name, recorded gradient of sample 0, applied scale c) per layer.
    recompute : returns each layer's recomputed gradient of sample 0 (same order).
    tol : relative tolerance (by the precision in play).
    n : samples in the step.  micro_batches : micro-batches the step accumulated.
    """
    grads = recompute()
    tol = max(tol, 1e-9)
    for (name, mine, c), g in zip(layers, grads):
        if g is None or mine is None:
            continue
        g = g.reshape(mine.shape).double()
        mine = mine.double()
        ng, nm = float(torch.linalg.vector_norm(g)), float(torch.linalg.vector_norm(mine))
        if ng == 0.0 and nm == 0.0:
            continue
        err = float(torch.linalg.vector_norm(mine - g)) / max(ng, nm)
        if c and c > 0:
            err_c = float(torch.linalg.vector_norm(mine - c * g)) / max(c * ng, nm)
            err = min(err, err_c)
        if err <= tol:
            continue
        ratio = nm / ng if ng > 0 else float("inf")
        cos = float((mine * g).sum()) / max(ng * nm, 1e-300)
        if cos > 1 - 10 * tol and abs(ratio - n) < 1e-3 * n and n > 1:
            hint = (f"The recorded gradient is {ratio:.4g}x (= the batch size) the recomputed "
                    "one: the loss is summed over samples; use a mean-reduced loss "
                    "(reduction='mean').")
        elif (cos > 1 - 10 * tol and micro_batches > 1
              and abs(ratio - micro_batches) < 1e-3 * micro_batches):
            hint = (f"The recorded gradient is {ratio:.4g}x (= the number of micro-batches) the "
                    "recomputed one: with gradient accumulation divide each micro-batch's loss "
                    "by the number of micro-batches (loss / accumulation_steps).")
        elif cos > 1 - 10 * tol:
            hint = (f"The two point the same way but differ by a factor {ratio:.4g}: the loss "
                    "used in training is not the mean of loss_fn over the samples (a weighted "
                    "or rescaled loss?).")
        else:
            hint = ("They point in different directions: loss_fn differs from the loss used in "
                    "training, or the model's output for one sample depends on the other samples "
                    "of its batch (a layer that mixes samples), or on state that changed between "
                    "the two forwards.")
        raise SelfCheckError(
            f"self-check failed for layer {name!r}: sample 0's gradient recomputed with loss_fn "
            f"differs from the recorded one by {err:.2e} (relative, tolerance {tol:.1e}). "
            f"{hint} Pass self_check=False to record anyway."
        )


# ----------------------------------------------------------------------------- sample 0's loss
def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """The model on the logged ``inputs``: a mapping is passed as keyword arguments
    (``model(**batch)``, as Hugging Face models take their batches), anything else as the one
    positional argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def batch_of(inputs: Any) -> int | None:
    """Samples in the logged ``inputs``: dimension 0 of its first tensor (nested mappings,
    tuples and lists are searched in order)."""
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() else None
    items = inputs.values() if isinstance(inputs, Mapping) else (
        inputs if isinstance(inputs, (tuple, list)) else ())
    for v in items:
        b = batch_of(v)
        if b is not None:
            return b
    return None


def first_sample(obj: Any, batch: int | None) -> Any:
    """``obj`` cut to sample 0 along dimension 0, keeping its type: tensors with ``batch`` rows
    are sliced ``[:1]``; mappings (dicts, Hugging Face ``ModelOutput``), tuples and lists
    (named tuples too) are rebuilt with each entry cut. A tensor that is not batched (a scalar
    such as a ``ModelOutput``'s ``loss``, a mean over the whole batch) is dropped: ``None`` in
    its place, so a ``loss_fn`` that reads it fails instead of comparing a batch quantity."""
    if isinstance(obj, Tensor):
        if batch is None:
            return obj[:1]
        return obj[:1] if obj.dim() and obj.shape[0] == batch else None
    if isinstance(obj, Mapping):
        cut = {k: first_sample(v, batch) for k, v in obj.items()}
        try:
            return type(obj)(**cut) if _is_model_output(obj) else type(obj)(cut)
        except Exception:  # noqa: BLE001 - a mapping type we cannot rebuild: a plain dict
            return cut
    if isinstance(obj, tuple):
        cut = [first_sample(v, batch) for v in obj]
        return type(obj)(*cut) if hasattr(obj, "_fields") else type(obj)(cut)
    if isinstance(obj, list):
        return [first_sample(v, batch) for v in obj]
    return obj


def _is_model_output(obj: Any) -> bool:
    """A Hugging Face ``ModelOutput`` (by its base classes' names: transformers is not
    imported here)."""
    return any(c.__name__ == "ModelOutput" for c in type(obj).__mro__)


def sample_loss(loss_fn: Callable[[Any, Any], Tensor], output: Any, targets: Any,
                batch: int | None) -> Tensor:
    """``loss_fn`` on sample 0: the model's output over the whole micro-batch cut to sample 0
    (its own type kept, see :func:`first_sample`) and sample 0's targets."""
    def cut(obj: Any) -> Any:  # a plain tensor: its first row, as before
        return obj[:1] if isinstance(obj, Tensor) else first_sample(obj, batch)

    out0, y0 = cut(output), cut(targets)
    what = (f"the first step's self-check calls loss_fn(output, targets) on sample 0 (the "
            f"model's output over the logged inputs cut to its first sample along dimension 0, "
            f"its type kept: {type(output).__name__}, with entries that are not per sample, "
            f"such as a ModelOutput's loss, set to None)")
    fix = ("Make loss_fn compute the mean loss from the per-sample outputs (e.g. the logits), "
           "or pass self_check=False")
    try:
        loss = loss_fn(out0, y0)
    except Exception as e:
        raise SelfCheckError(f"{what} and it raised {type(e).__name__}: {e}. {fix}") from e
    if loss is None:
        raise SelfCheckError(f"{what} and it returned None. {fix}")
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise SelfCheckError(f"loss_fn must return the mean loss as a one-element tensor; it "
                             f"returned {type(loss).__name__}"
                             + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor)
                                else ""))
    return loss.reshape(())
