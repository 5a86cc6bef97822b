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
from collections.abc import Callable, Sequence
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
