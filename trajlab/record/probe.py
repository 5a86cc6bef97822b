"""Full-data gradient probe: the gradient of the loss over a whole data set at some steps."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class FullGradientProbe:
    """Ask the recorder for the full-data gradient every ``every`` optimizer steps.

    With random reshuffling the batch gradient is a biased stand-in for the gradient of the
    training loss (MATH.md §4a); the analysis uses the probe's gradient where one was taken.

    Parameters
    ----------
    data : re-iterable of (inputs, targets) or (inputs, targets, indices) batches covering the
        training set (e.g. a DataLoader, also the training one over
        :class:`trajlab.data.WithIndices`, or a list of tensors).
    loss_fn : mean-reduced loss ``loss_fn(model(x), y)``.
    every : probe at recorded steps whose index is a multiple of ``every``.
    """

    data: Iterable
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    every: int = 100

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"FullGradientProbe.every must be >= 1, got {self.every}")

    def gradient(self, model: nn.Module, params: list[Tensor]) -> list[Tensor]:
        """Mean gradient over ``data`` w.r.t. ``params``; does not touch ``.grad``."""
        total = [torch.zeros_like(p) for p in params]
        count = 0
        for batch in self.data:
            x, y = _inputs_targets(batch)
            loss = self.loss_fn(model(x), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            n = len(x)
            for t, g in zip(total, grads):
                if g is not None:
                    t.add_(g, alpha=n)
            count += n
        if count == 0:
            raise ValueError("FullGradientProbe.data yielded no samples")
        return [t / count for t in total]


def _inputs_targets(batch) -> tuple:
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1]
    kind = (f"a {type(batch).__name__} of {len(batch)} items"
            if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}")
    raise ValueError(f"FullGradientProbe.data must yield (inputs, targets) or (inputs, targets, "
                     f"indices) batches, got {kind}")
