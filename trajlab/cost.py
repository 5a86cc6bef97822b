"""A cost plan before training: bytes per recorded step, the recorder's time per step against a
plain step, and what a whole run would take (disk, wall time), measured on a few steps of the
user's own model into a temporary store.

>>> plan = trajlab.estimate(model, (x, y), optimizer=opt, loss_fn=F.cross_entropy,
...                         steps=30_000, every=10, budget="50GB")     # doctest: +SKIP
>>> print(plan)                                                        # doctest: +SKIP

Nothing of the user's run changes: the model and optimizer are copied, and the temporary store
is removed.
"""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trajlab.record.disk_space import size_text

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}


def parse_bytes(text: str | float) -> int:
    """``"50GB"``, ``"1.5 TiB"``, ``"200mb"`` or a number of bytes -> bytes (kB, MB, GB, TB are
    powers of 1000; KiB, MiB, GiB, TiB powers of 1024)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"a byte budget must be positive, got {text!r}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"cannot read {text!r} as a size: give a positive number with a unit, "
                         "e.g. 50GB, 1.5TB, 800MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class CostEstimate:
    """What recording a run would cost, measured on a few steps.

    Attributes
    ----------
    bytes_per_recorded_step : stored (compressed) bytes of one recorded step, metadata
        excluded; measured over short chunks, so an upper bound for long runs (weights compress
        better in longer chunks).
    plain_step_seconds : one training step without the recorder (median).
    recorded_step_seconds : one recorded step (forward, backward, capture, step) plus its
        share of the writer's work, counted as if the writer did not overlap training (an upper
        bound on a machine with a spare core).
    fixed_seconds : the recorder's one-off cost (store creation at the first recorded step).
    steps, every : the run projected (None: not given).
    budget_bytes : the disk budget asked for (None: not given).
    free_bytes : free space where the store would go (None: not known).
    measured_steps : recorded steps the figures come from.
    """

    bytes_per_recorded_step: float
    plain_step_seconds: float
    recorded_step_seconds: float
    fixed_seconds: float
    steps: int | None
    every: int
    budget_bytes: int | None
    free_bytes: int | None
    measured_steps: int

    @property
    def overhead(self) -> float:
        """Recorded step time / plain step time."""
        return self.recorded_step_seconds / self.plain_step_seconds

    @property
    def recorded_steps(self) -> int | None:
        """Steps of the run that would be recorded."""
        return None if self.steps is None else math.ceil(self.steps / self.every)

    @property
    def total_bytes(self) -> float | None:
        """Projected size of the store for the whole run."""
        n = self.recorded_steps
        return None if n is None else n * self.bytes_per_recorded_step

    @property
    def total_seconds(self) -> float | None:
        """Projected wall time of the whole run with the recorder (training included)."""
        n = self.recorded_steps
        if n is None or self.steps is None:
            return None
        return ((self.steps - n) * self.plain_step_seconds + n * self.recorded_step_seconds
                + self.fixed_seconds)

    @property
    def every_for_budget(self) -> int | None:
        """The smallest ``every`` whose store fits the budget (or the free space when no budget
        was given); None when neither the steps nor a limit are known."""
        limit = self.budget_bytes if self.budget_bytes is not None else self.free_bytes
        if self.steps is None or limit is None:
            return None
        return max(1, math.ceil(self.steps * self.bytes_per_recorded_step / limit))

    def __str__(self) -> str:
        lines = [(
            f"per recorded step: {size_text(self.bytes_per_recorded_step)} on disk, "
            f"{self.recorded_step_seconds * 1e3:.1f} ms against {self.plain_step_seconds * 1e3:.1f}"
            f" ms for a plain step ({self.overhead:.2f}x); the recorder's fixed cost "
            f"{self.fixed_seconds * 1e3:.0f} ms (measured on {self.measured_steps} recorded "
            "steps; bytes are an upper bound: weights compress better in long chunks)")]
        if self.steps is not None:
            lines.append(
                f"the run: {self.steps} steps, every={self.every} -> {self.recorded_steps} "
                f"recorded, {size_text(self.total_bytes or 0)} on disk, about "
                f"{_duration(self.total_seconds or 0)} of training with the recorder "
                f"({_duration(self.steps * self.plain_step_seconds)} without)")
        if self.free_bytes is not None:
            fits = self.total_bytes is None or self.total_bytes <= self.free_bytes
            lines.append(f"free space at the target: {size_text(self.free_bytes)}"
                         + ("" if fits else " -- NOT ENOUGH for this run"))
        e = self.every_for_budget
        if e is not None:
            which = (f"the budget of {size_text(self.budget_bytes)}"
                     if self.budget_bytes is not None else "the free space")
            lines.append(f"every={e} is the smallest that fits {which}"
                         + ("" if e <= self.every else f" (every={self.every} does not)"))
        return "\n".join(lines)


def _copy_training(model: nn.Module, optimizer: torch.optim.Optimizer
                   ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A deep copy of the model and a fresh optimizer of the same class over its parameters,
    with the same parameter groups and hyper-parameters (no state: the first steps of a run)."""
    clone = copy.deepcopy(model)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    params = list(clone.parameters())
    groups = []
    for g in optimizer.param_groups:
        try:
            mine = [params[index[id(p)]] for p in g["params"]]
        except KeyError:
            raise ValueError("the optimizer holds parameters that are not the model's; pass the "
                             "optimizer of this model") from None
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": mine})
    import inspect

    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return clone, type(optimizer)(groups, **defaults)  # every group carries its own values


def _stored_bytes(store: Path) -> int:
    """Bytes of the store's chunks (metadata documents excluded)."""
    total = 0
    for root, _, files in os.walk(store):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files
                     if f != "zarr.json")
    return total


def estimate(
    model: nn.Module,
    example_batch: tuple[torch.Tensor, torch.Tensor],
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    steps: int | None = None,
    every: int = 1,
    budget: str | int | None = None,
    target: str | os.PathLike | None = None,
    measure_steps: int = 16,
    **recorder_options: Any,
) -> CostEstimate:
    """Measure what recording would cost, on a few steps of a copy of the model.

    Parameters
    ----------
    model, optimizer : the model and optimizer of the run (copied; neither changes).
    example_batch : ``(inputs, targets)`` of one training batch (its batch size is the run's).
    loss_fn : ``loss_fn(model(inputs), targets)``, a mean over the batch.
    steps : optimizer steps of the whole run (for the projection).
    every : the ``every`` the run would record with.
    budget : disk budget (``"50GB"``, bytes); the result names the ``every`` that fits it.
    target : where the store would go (its free space is reported and checked).
    measure_steps : recorded steps measured (more: steadier figures, longer estimate).
    recorder_options : further :class:`trajlab.Recorder` options (``per_sample``,
        ``compression``, ``writer``, ...), as the run would use them.

    Returns
    -------
    CostEstimate
        Bytes and time per recorded step, and the run's projection; ``print`` it.
    """
    from trajlab.record.recorder import Recorder

    if steps is not None and (isinstance(steps, bool) or int(steps) < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(every, bool) or int(every) < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    if int(measure_steps) < 2:
        raise ValueError(f"measure_steps must be at least 2, got {measure_steps!r}")
    for key in ("every", "mode", "optimizer"):
        if key in recorder_options:
            raise TypeError(f"estimate() sets Recorder's {key!r} itself; leave it out")
    budget_bytes = None if budget is None else parse_bytes(budget)
    free = None
    if target is not None:
        where = Path(target).expanduser().resolve()
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free
    x, y = example_batch
    n = int(measure_steps)

    def train_step(m: nn.Module, opt: torch.optim.Optimizer, rec: Recorder | None) -> None:
        opt.zero_grad()
        loss = loss_fn(m(x), y)
        loss.backward()
        if rec is not None:
            rec.log(loss=loss, inputs=x, targets=y)
        opt.step()

    m, opt = _copy_training(model, optimizer)
    for _ in range(2):  # warm-up (allocator, kernels)
        train_step(m, opt, None)
    plain = []
    for _ in range(n):
        t0 = time.perf_counter()
        train_step(m, opt, None)
        plain.append(time.perf_counter() - t0)
    plain.sort()
    plain_step = plain[len(plain) // 2]

    m, opt = _copy_training(model, optimizer)
    with tempfile.TemporaryDirectory(prefix="trajlab-estimate-",
                                     dir=None if target is None else where) as tmp:
        store = Path(tmp) / "estimate.zarr"
        options = {"loss_fn": loss_fn, **recorder_options}
        t_start = time.perf_counter()
        rec = Recorder(m, store, optimizer=opt, **options)
        with rec:
            train_step(m, opt, rec)  # the first recorded step lays out the store
            t_first = time.perf_counter()
            for _ in range(n - 1):
                train_step(m, opt, rec)
        t_end = time.perf_counter()
        size = _stored_bytes(store)
    # steps 2..n with the writer's flush of their rows at close() counted as if it did not
    # overlap training (an upper bound); the first step's extra time is the store's creation
    recorded = (t_end - t_first) / (n - 1)
    fixed = max(0.0, (t_first - t_start) - recorded)
    return CostEstimate(
        bytes_per_recorded_step=size / n, plain_step_seconds=plain_step,
        recorded_step_seconds=recorded, fixed_seconds=fixed,
        steps=None if steps is None else int(steps), every=int(every),
        budget_bytes=budget_bytes, free_bytes=free, measured_steps=n)


__all__ = ["CostEstimate", "estimate", "parse_bytes"]
