"""The contract of a layer rule: how one module type is recorded.

A rule owns, for its module type:

* which weight matrices it records (:meth:`LayerRule.matrices`: a parameter, or a row block of
  one, e.g. attention's q/k/v in ``in_proj_weight``) and how each maps to an (out, in) matrix;
* which child modules it covers itself (:meth:`LayerRule.claims`, e.g. attention's
  ``out_proj``, whose ``forward`` is never called);
* how its hooks are installed (:meth:`LayerRule.install`; default: one forward hook with
  keyword arguments) and which output carries the gradient (:meth:`LayerRule.grad_output`);
* the sketch kind it produces and its typed geometry (:meth:`LayerRule.describe`);
* the per-sample gradients of a micro-batch, as patches ``(act, delta)`` whose products give
  them, or as dense per-sample gradients (:meth:`LayerRule.per_sample`);
* why a module of its type cannot be recorded (:meth:`LayerRule.refuse`), said before training.

Register a rule with :func:`trajlab.register_rule`; the recorder finds it by the module's type
(subclasses included unless a rule for the subclass is registered, or the rule's
``subclasses`` is False).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from trajlab.store.metadata import Geometry


@dataclass(frozen=True)
class Matrix:
    """One weight matrix a rule records from its module.

    Attributes
    ----------
    part : suffix of the recorded name (``""`` for the module's name itself, else
        ``"<module>:<part>"``).
    param : name of the module's parameter holding it (``"weight"``).
    rows : (start, stop) rows of the parameter (reshaped to a matrix), or None for all.
    """

    part: str = ""
    param: str = "weight"
    rows: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        return self.param + (f"[{self.rows[0]}:{self.rows[1]}]" if self.rows else "")


@dataclass(frozen=True)
class Description:
    """What a rule reports about a module on its first recorded input."""

    sketch: str  # sketch kind name ("rank1", "subspace")
    positions: int = 1  # weight-sharing positions per sample
    geometry: Geometry | None = None


@dataclass
class Patches:
    """Per-sample gradients ``G_i = sum_p delta[i, :, p] act[i, :, p]^T``."""

    act: Tensor  # (B, n, P)
    delta: Tensor  # (B, m, P), the loss-mean factor undone


@dataclass
class Dense:
    """Per-sample gradients given densely, ``(B, m, n)``, the loss-mean factor undone."""

    grads: Tensor


class LayerRule:
    """How one module type is recorded. Subclasses override what differs from a plain layer
    whose ``weight`` is the recorded matrix and whose first positional input is the layer input.
    """

    #: Display name of the module type (stored in layer metadata).
    module_type: str = ""
    #: Whether subclasses of the registered type use this rule too.
    subclasses: bool = True

    # ------------------------------------------------------------------ what is recorded
    def refuse(self, module: nn.Module) -> str | None:
        """Why this module cannot be recorded (None: it can)."""
        return None

    def matrices(self, module: nn.Module) -> list[Matrix]:
        """The weight matrices recorded from ``module``."""
        return [Matrix()]

    def claims(self, module: nn.Module) -> list[str]:
        """Names of child modules this rule records itself (they get no rule of their own)."""
        return []

    def weight_matrix(self, module: nn.Module, matrix: Matrix) -> Tensor:
        """The matrix as an (out, in) view of the parameter (no copy)."""
        w = getattr(module, matrix.param)
        w = w.reshape(w.shape[0], -1)
        return w if matrix.rows is None else w[matrix.rows[0]:matrix.rows[1]]

    def grad_matrix(self, module: nn.Module, matrix: Matrix) -> Tensor | None:
        """``.grad`` of the matrix, shaped like :meth:`weight_matrix` (None when absent)."""
        p = getattr(module, matrix.param)
        if p.grad is None:
            return None
        g = p.grad.reshape(p.shape[0], -1)
        return g if matrix.rows is None else g[matrix.rows[0]:matrix.rows[1]]

    def parameter(self, module: nn.Module, matrix: Matrix) -> Tensor:
        """The parameter tensor itself (for optimizer look-ups and dtype checks)."""
        return getattr(module, matrix.param)

    # ------------------------------------------------------------------ hooks
    def install(self, module: nn.Module,
                on_forward: Callable[[tuple, dict, Any], None]) -> list[Any]:
        """Install the hooks that call ``on_forward(args, kwargs, output)`` after each forward
        of ``module``; returns the handles."""
        def hook(mod, args, kwargs, output):
            on_forward(args, kwargs, output)

        return [module.register_forward_hook(hook, with_kwargs=True)]

    def grad_output(self, output: Any) -> Tensor | None:
        """The output tensor whose gradient the per-sample gradients need."""
        if isinstance(output, Tensor):
            return output
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            return output[0]
        return None

    def batch_size(self, module: nn.Module, args: tuple, kwargs: dict) -> int:
        """Samples in the micro-batch (first dimension of the first input by default)."""
        return int(args[0].shape[0])

    # ------------------------------------------------------------------ per-sample data
    def describe(self, module: nn.Module, matrix: Matrix, args: tuple, kwargs: dict
                 ) -> Description:
        """Sketch kind, positions per sample and geometry, seen on the first recorded input."""
        raise NotImplementedError

    def per_sample(self, module: nn.Module, matrix: Matrix, args: tuple, kwargs: dict,
                   grad_out: Tensor) -> Patches | Dense:
        """Per-sample gradients of ``matrix`` for the micro-batch whose inputs were ``args`` and
        whose output gradient is ``grad_out`` (the loss-mean factor must be undone: multiply
        by the micro-batch size)."""
        raise NotImplementedError


def rank1_sketch(act: Tensor, delta: Tensor) -> dict[str, Tensor]:
    """Exact per-sample factors for a layer without weight sharing (kept for callers of the
    first release): ``G_i = outer(delta_i, act_i)``."""
    return {"ps_grad_out": delta, "ps_input": act.clone()}


def subspace_sketch(act: Tensor, delta: Tensor, U: Tensor, V: Tensor, *,
                    want_per_sample: bool = False):
    """Top-k subspace sketch of ``G_i = delta_i act_i^T`` (see
    :class:`trajlab.sketches.Subspace`)."""
    from trajlab.sketches import sketch_kind

    tensors, ps = sketch_kind("subspace").capture(act, delta, basis=(U, V),
                                                  want_per_sample=want_per_sample)
    tensors.pop("_mean", None)
    return tensors, ps

