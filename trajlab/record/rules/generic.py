"""The generic fallback: any module with 2-D weight parameters that no rule covers.

Per-sample gradients come from torch.func over the module's own forward: for the captured
inputs ``x`` and output gradient ``dy`` of a micro-batch,
``G_i = grad_W <module_W(x_i), dy_i>`` for each sample, ``vmap``-ed (``functional_call`` +
``vmap(grad)``), then projected to the subspace sketch. Exact, and correct for any forward that
treats samples independently, but it re-runs the module's forward and backward per sample
(slower than a dedicated rule): the layer's metadata says ``generic:<type>`` and the recorder
warns once per module. Random operations inside the module (dropout) cannot be replayed by
``vmap``: such a layer's rows are flagged and a dedicated rule is needed.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from trajlab.record.rules.base import Dense, Description, LayerRule, Matrix
from trajlab.sketches import Subspace


def matrix_parameters(module: nn.Module) -> list[str]:
    """Names of the module's own 2-D parameters (what the fallback records)."""
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 2]


class GenericRule(LayerRule):
    """Fallback for ``module_type`` (``"generic:<class name>"``): each own 2-D parameter
    ``P`` (out, in) is a recorded matrix (named after the module, or ``module:P`` when it has
    several or its name is not ``weight``)."""

    positionwise = False  # runs the module on its own inputs, in its own layout

    def __init__(self, module_type: str) -> None:
        self.module_type = module_type

    def matrices(self, module: nn.Module) -> list[Matrix]:
        names = matrix_parameters(module)
        if names == ["weight"]:
            return [Matrix()]
        return [Matrix(part=n, param=n) for n in names]

    def how(self, module: nn.Module) -> str:
        return ("generic fallback (no rule for this type: torch.func per-sample gradients, "
                "slower; a rule makes it fast)")

    def describe(self, module, matrix, args, kwargs) -> Description:
        if matrix == self.matrices(module)[0]:
            warnings.warn(
                f"trajlab: {type(module).__name__} has no layer rule; its weight matrices are "
                "recorded by the generic fallback (torch.func per-sample gradients over the "
                "module's forward at every recorded step: slower than a rule; see "
                "docs/recorder.md, 'Adding a layer rule')", RuntimeWarning, stacklevel=2)
        x = next((a for a in args if isinstance(a, Tensor)), None)
        positions = math.prod(x.shape[1:-1]) if x is not None and x.dim() >= 3 else 1
        return Description(Subspace.name, int(positions))

    def per_sample(self, module, matrix, args, kwargs, grad_out: Tensor) -> Dense:
        w = self.parameter(module, matrix).detach()
        B = int(grad_out.shape[0])
        batched = _batched(args, B), _batched(kwargs, B)
        buffers = {n: b.detach().clone() for n, b in module.named_buffers()}

        def sample_loss(weight, a, kw, dy):
            a = _unsqueeze(a, batched[0])
            kw = _unsqueeze(kw, batched[1])
            out = self.grad_output(functional_call(module, {matrix.param: weight}, a, kw))
            return (out * dy.unsqueeze(0)).sum()

        try:
            G = vmap(grad(sample_loss), in_dims=(None, batched[0], batched[1], 0),
                     randomness="error")(w, _detached(args), _detached(kwargs),
                                         grad_out.detach())
        except Exception as e:  # said with its cause; the recorder flags the row
            raise RuntimeError(
                f"the generic fallback could not vmap {type(module).__name__}'s forward over "
                f"samples ({type(e).__name__}: {str(e).splitlines()[0][:200]}); a layer rule "
                "is needed (docs/recorder.md, 'Adding a layer rule')") from e
        finally:
            live = dict(module.named_buffers())
            with torch.no_grad():
                for n, b in buffers.items():
                    live[n].copy_(b)
        return Dense(torch.stack([self.matrix_of(module, matrix, g) for g in G]) * B)


def _batched(tree: Any, B: int) -> Any:
    """vmap in_dims for args/kwargs: 0 for tensors with a leading batch dimension."""
    if isinstance(tree, Tensor):
        return 0 if tree.dim() >= 1 and tree.shape[0] == B else None
    if isinstance(tree, tuple):
        return tuple(_batched(t, B) for t in tree)
    if isinstance(tree, list):
        return [_batched(t, B) for t in tree]
    if isinstance(tree, dict):
        return {k: _batched(v, B) for k, v in tree.items()}
    return None


def _unsqueeze(tree: Any, dims: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.unsqueeze(0) if dims == 0 else tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(_unsqueeze(t, d) for t, d in zip(tree, dims))
    if isinstance(tree, dict):
        return {k: _unsqueeze(v, dims[k]) for k, v in tree.items()}
    return tree


def _detached(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, (tuple, list)):
        return type(tree)(_detached(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _detached(v) for k, v in tree.items()}
    return tree
