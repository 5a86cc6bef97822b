"""Assembling one recorded step from what the hooks captured (pure torch, no I/O).

A step may see several backward passes through a layer before ``optimizer.step()``: micro-batches
of gradient accumulation, or a backward whose step was skipped (a non-finite loss, a GradScaler
overflow) followed by ``zero_grad()`` and a new one. The step is assembled from the suffix of
micro-batches whose gradients ``.grad`` actually holds, found with a cheap random-probe fit
``.grad @ r ~= c * sum_k mean_k @ r``; ``c`` is the scale applied after backward (1/S under a
GradScaler, the clip coefficient under clipping). A residual above the precision of the
arithmetic means ``.grad`` was changed in a way no scalar explains (elementwise clipping, an
explicit weight penalty added to the loss): the step cannot be recorded faithfully.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trajlab.sketches import SketchKind


@dataclass
class Capture:
    """One backward pass through one layer.

    Attributes
    ----------
    micro : index of the model forward (micro-batch) it belongs to.
    batch : samples in that micro-batch.
    tensors : the sketch kind's per-sample variables, on the training device.
    per_sample : sample 0's dense gradient (1, m, n), first recorded step only, for the check,
        and only for a kind that cannot give it from ``tensors``
        (:func:`trajlab.record.capture.gives_sample_gradient`); else None.
    eps : machine epsilon of the lowest precision involved (autocast, input or weight dtype).
    forwards_seen : model forwards started in the step when this backward arrived (a backward
        of micro-batch k that arrives after forward k + 1 started means several forwards shared
        one backward, see :func:`interleaved`).
    """

    micro: int
    batch: int
    tensors: dict[str, Tensor]
    per_sample: Tensor | None = None
    eps: float = 0.0
    forwards_seen: int = 0


@dataclass
class Micro:
    """One forward of the model during a recorded step, and what ``log()`` said after it."""

    rng: Any = None
    inputs: Any = None
    targets: Any = None
    indices: Tensor | None = None
    loss: float | None = None
    batch: int | None = None
    marked_only: bool = False  # started by an integration's batch mark, no forward seen yet
    autocast: Any = None  # the autocast state at its forward (replayed by the self-check)


@dataclass
class Assembled:
    """A layer's step: the per-sample sketch of all selected micro-batches, scaled so that its
    batch mean is the ``.grad`` the optimizer applied.

    ``per_sample``: sample 0's dense gradient (1, m, n), scaled the same way, where the first
    step's check needs it (see :class:`Capture`); else None.
    """

    tensors: dict[str, Tensor]
    per_sample: Tensor | None
    scale: float
    first_micro: int
    n: int
    residual: float
    tol: float
    micro_batches: list[int] = field(default_factory=list)


#: A fitted scale within this many rounding units (of the lowest precision in play) of 1 is
#: exactly 1: on plain loops the probe fit gives ``|c - 1|`` of 1-4 float32 ulps (measured on
#: the benchmark MLP and ConvNet), and multiplying the captured per-sample information by it
#: would only add rounding. A clip coefficient that close to 1 changes ``.grad`` by less than
#: its own rounding.
SNAP_ULPS = 16


def tolerance(eps: float, n: int, positions: int) -> float:
    """Relative tolerance of a gradient comparison: float rounding of n*P accumulated terms at
    precision ``eps`` (generous), at most 5% (bfloat16)."""
    return float(min(5e-2, max(1e3 * eps * math.sqrt(max(1, n * positions)), 1e-9)))


def probes(n: int, dtype: torch.dtype, device: torch.device, k: int = 2) -> Tensor:
    """Fixed random probe vectors (n, k) from a private generator (the user's RNG is never
    touched)."""
    gen = torch.Generator().manual_seed(12345 + n)
    return torch.randn(n, k, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _float64(t: Tensor | np.ndarray) -> np.ndarray:
    """A small tensor as a float64 numpy array (the fits below are a few dozen numbers: numpy's
    per-call cost is a fraction of torch's)."""
    if isinstance(t, Tensor):
        return t.detach().to("cpu", torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def scale_of(y: Tensor | np.ndarray, S: Tensor | np.ndarray) -> tuple[float, float]:
    """``(c, residual)`` of the least-squares fit ``y ~= c S`` (relative residual)."""
    y, S = _float64(y).ravel(), _float64(S).ravel()
    ny = float(np.linalg.norm(y))
    ns2 = float(S @ S)
    if ny == 0.0:
        return (0.0, 0.0) if ns2 else (1.0, 0.0)
    if ns2 == 0.0:
        return 1.0, 1.0
    c = float(y @ S) / ns2
    return c, float(np.linalg.norm(y - c * S)) / ny


def fit_scale(y: Tensor | np.ndarray,
              parts: Sequence[Tensor | np.ndarray]) -> tuple[int, float, float]:
    """Which suffix of micro-batches ``.grad`` holds, and at what scale.

    Parameters
    ----------
    y : ``.grad @ r``.
    parts : ``mean_k @ r`` for each micro-batch k, in order.

    Returns
    -------
    (first, c, residual) : ``.grad ~= c * sum_{k >= first} mean_k`` with the smallest relative
        residual ``||y - c S|| / ||y||`` (ties: the longest suffix).
    """
    best = (0, 1.0, math.inf)
    y = _float64(y)
    total = np.zeros_like(y)
    suffix = []
    for z in reversed(parts):
        total = total + _float64(z)
        suffix.append(total)
    suffix.reverse()  # suffix[j] = sum_{k >= j}
    for j, S in enumerate(suffix):
        c, res = scale_of(y, S)
        if res < best[2] - 1e-15:
            best = (j, c, res)
    return best


def interleaved(captures: Sequence[Capture], micro_batches: Sequence[int]) -> bool:
    """Whether several selected forwards were followed by one shared backward (the model
    applied to its own output, or losses of several forwards summed before backward): their
    samples are then not distinct, and per-sample gradients cannot be told apart."""
    chosen = set(micro_batches)
    for c in captures:
        if c.micro in chosen and any(m > c.micro and m < c.forwards_seen for m in chosen):
            return True
    return False


def assemble(kind: SketchKind, captures: list[Capture], grad: Tensor, positions: int,
             r: Tensor, *, first: int | None = None) -> Assembled:
    """Assemble one layer's step from its captures (see the module docstring).

    ``first``: force the first micro-batch (so that every layer of the step agrees).
    """
    by_micro: dict[int, list[Capture]] = {}
    for cap in captures:
        by_micro.setdefault(cap.micro, []).append(cap)
    order = sorted(by_micro)
    reused = [m for m in order if len(by_micro[m]) > 1]
    if reused:
        raise ValueError(f"applied {len(by_micro[reused[0]])} times in one forward")
    caps = [by_micro[m][0] for m in order]
    y = grad @ r.to(grad.dtype)
    parts = [kind.mean_gradient_times(c.tensors, r) for c in caps]
    if any(p is None for p in parts):
        raise ValueError(f"sketch kind {kind.name!r} cannot check the gradient")
    if len(parts) == 1 and (first is None or first == order[0]):
        # one micro-batch (the common case): one conversion for both sides of the fit
        wide = torch.promote_types(y.dtype, parts[0].dtype)  # exact for both
        yp = _float64(torch.stack((y.to(wide), parts[0].to(wide))))
        j, (c, res) = 0, scale_of(yp[0], yp[1])
    elif first is None:
        j, c, res = fit_scale(y, parts)
    else:
        j = order.index(first) if first in order else 0
        c, res = scale_of(y, sum(_float64(p) for p in parts[j:]))
    chosen = caps[j:]
    n = sum(cp.batch for cp in chosen)
    eps = max(cp.eps for cp in chosen)
    if abs(c - 1.0) <= SNAP_ULPS * eps:
        c = 1.0  # nothing rescaled .grad: the fit's rounding is not a scale
    factors = [c * n / cp.batch for cp in chosen]
    scaled = [cp.tensors if f == 1.0 else kind.rescale(cp.tensors, f)
              for cp, f in zip(chosen, factors)]
    tensors = scaled[0] if len(scaled) == 1 else kind.concat(scaled)
    # sample 0 of the step is sample 0 of its first micro-batch (the check reads only that)
    ps = chosen[0].per_sample
    if ps is not None and factors[0] != 1.0:
        ps = ps * factors[0]
    return Assembled(tensors, ps, c, order[j], n, res, tolerance(eps, n, positions),
                     [order[i] for i in range(j, len(order))])
