"""The contract of a layer rule: how one module type is recorded.

A rule owns, for its module type:

* which weight matrices it records (:meth:`LayerRule.matrices`: a parameter, or a row block of
  one, e.g. attention's q/k/v in ``in_proj_weight``) and how each maps to an (out, in) matrix
  (:meth:`LayerRule.matrix_of`: a reshape by default, a transpose for transposed convolutions,
  ``diag`` for normalisation scales);
* which child modules it covers itself (:meth:`LayerRule.claims`, e.g. attention's
  ``out_proj``, whose ``forward`` is never called);
* how its hooks are installed (:meth:`LayerRule.install`; default: one forward hook with
  keyword arguments) and which output carries the gradient (:meth:`LayerRule.grad_output`);
* the sketch kind it produces and its typed geometry (:meth:`LayerRule.describe`);
* the per-sample gradients of a micro-batch (:meth:`LayerRule.per_sample`), in the form natural
  to the layer: :class:`Patches` ``(act, delta)`` whose products give them, :class:`Dense`
  gradients, :class:`Diagonal` vectors (a diagonal matrix) or :class:`Rows` (row-sparse
  gradients, e.g. an embedding table);
* why a module of its type cannot be recorded (:meth:`LayerRule.refuse`), said before training.

Each per-sample form knows how the sketch kinds capture it (:meth:`PerSample.capture`), so a
rule never depends on how its data is stored.

Register a rule with :func:`trajlab.register_rule`; the recorder finds it by the module's type
(subclasses included unless a rule for the subclass is registered, or the rule's
``subclasses`` is False).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from trajlab.errors import RecorderError
from trajlab.sketches import Subspace
from trajlab.sketches.base import dense_from_rows
from trajlab.store.metadata import Geometry

if TYPE_CHECKING:
    from trajlab.sketches import SketchKind


@dataclass(frozen=True)
class Matrix:
    """One weight matrix a rule records from its module.

    Attributes
    ----------
    part : suffix of the recorded name (``""`` for the module's name itself, else
        ``"<module>:<part>"``).
    param : name of the module's parameter holding it (``"weight"``; a dotted name reaches a
        child module's parameter, e.g. ``"out_proj.weight"``).
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
    """What a rule reports about a module on its first recorded input.

    Attributes
    ----------
    sketch : sketch kind name (``"rank1"``, ``"subspace"``, ``"diagonal"``, ``"rows"``).
    positions : weight-sharing positions per sample (tokens, pixels).
    geometry : the linear map's geometry beyond the matrix (convolutions), or None.
    rank : size of the sketch's ``rank`` dimension for kinds that size it themselves (the
        ``rows`` kind: row slots per sample); the recorder chooses it for ``subspace``.
    """

    sketch: str
    positions: int = 1
    geometry: Geometry | None = None
    rank: int = 0


class PerSample:
    """Per-sample gradients of one matrix for one micro-batch, in some form.

    Subclasses say how a sketch kind captures them (:meth:`capture`); the loss-mean factor must
    already be undone (gradients of each sample's own loss).
    """

    @property
    def batch(self) -> int:
        """Samples B in the micro-batch."""
        raise NotImplementedError

    def capture(self, kind: SketchKind, *, basis: tuple[Tensor, Tensor] | None, rank: int,
                want_per_sample: bool) -> tuple[dict[str, Tensor], Tensor | None]:
        """The sketch ``kind``'s tensors for these gradients (and the dense (B, m, n) gradients
        when ``want_per_sample``; for the first step's self-check)."""
        raise NotImplementedError


@dataclass
class Patches(PerSample):
    """Per-sample gradients ``G_i = sum_p delta[i, :, p] act[i, :, p]^T``."""

    act: Tensor  # (B, n, P)
    delta: Tensor  # (B, m, P), the loss-mean factor undone

    @property
    def batch(self) -> int:
        return int(self.act.shape[0])

    def capture(self, kind, *, basis, rank, want_per_sample):
        act, delta = self.act, self.delta
        if act.dtype != delta.dtype:  # autocast: float32 inputs, low-precision output grads
            dtype = torch.promote_types(act.dtype, delta.dtype)
            act, delta = act.to(dtype), delta.to(dtype)
        return kind.capture(act, delta, basis=basis, want_per_sample=want_per_sample)


@dataclass
class Dense(PerSample):
    """Per-sample gradients given densely, ``(B, m, n)``, the loss-mean factor undone."""

    grads: Tensor

    @property
    def batch(self) -> int:
        return int(self.grads.shape[0])

    def capture(self, kind, *, basis, rank, want_per_sample):
        return kind.capture_dense(self.grads, basis=basis, want_per_sample=want_per_sample)


@dataclass
class Diagonal(PerSample):
    """Per-sample gradients of a diagonal matrix: ``G_i = diag(values[i])``, values (B, d).

    Captured by the kind's :meth:`~trajlab.sketches.base.SketchKind.capture_diagonal`: a kind
    with a compact form for diagonals stores the vectors; the default sketches the dense
    ``diag`` matrices.
    """

    values: Tensor

    @property
    def batch(self) -> int:
        return int(self.values.shape[0])

    def capture(self, kind, *, basis, rank, want_per_sample):
        return kind.capture_diagonal(self.values, basis=basis, want_per_sample=want_per_sample)


@dataclass
class Rows(PerSample):
    """Row-sparse per-sample gradients ``G_i = sum_p e_{index[i, p]} values[i, p]^T``.

    ``index`` (B, P) holds row numbers (repeats allowed; negative entries are skipped),
    ``values`` (B, P, n) the gradient each position adds to its row; the matrix has ``rows``
    rows. Captured by the kind's :meth:`~trajlab.sketches.base.SketchKind.capture_rows`: a kind
    with a compact form for rows coalesces and stores them without forming the dense
    matrices; the default sketches the dense (B, rows, n) gradients.
    """

    index: Tensor
    values: Tensor
    rows: int

    @property
    def batch(self) -> int:
        return int(self.index.shape[0])

    def capture(self, kind, *, basis, rank, want_per_sample):
        return kind.capture_rows(self.index, self.values, rows=self.rows, slots=rank,
                                 basis=basis, want_per_sample=want_per_sample)

    def dense(self) -> Tensor:
        """The dense (B, rows, n) gradients."""
        return dense_from_rows(self.index, self.values, self.rows)


class LayerRule:
    """How one module type is recorded. Subclasses override what differs from a plain layer
    whose ``weight`` is the recorded matrix and whose first positional input is the layer input.
    """

    #: Display name of the module type (stored in layer metadata).
    module_type: str = ""
    #: Whether subclasses of the registered type use this rule too.
    subclasses: bool = True
    #: The rule reads the sample axis from its first input's dimension 0; the recorder moves the
    #: model's sample axis there first (sequence-first models, see ``Recorder(batch_dim=)``).
    #: Rules that know their module's layout themselves (attention's ``batch_first``) set False.
    positionwise: bool = True

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

    def parameter(self, module: nn.Module, matrix: Matrix) -> Tensor:
        """The parameter tensor itself (for optimizer look-ups and dtype checks)."""
        p = module._parameters.get(matrix.param)  # the common case, without get_parameter's
        return p if p is not None else module.get_parameter(matrix.param)  # ~5 us of checks

    def matrix_of(self, module: nn.Module, matrix: Matrix, tensor: Tensor) -> Tensor:
        """``tensor`` (shaped like the parameter: its value, ``.grad`` or any gradient of it)
        as the recorded (out, in) matrix: the parameter reshaped to (shape[0], -1), then the
        rows of ``matrix``. A view where possible."""
        t = tensor.reshape(tensor.shape[0], -1)
        return t if matrix.rows is None else t[matrix.rows[0]:matrix.rows[1]]

    def weight_matrix(self, module: nn.Module, matrix: Matrix) -> Tensor:
        """The matrix, (out, in)."""
        return self.matrix_of(module, matrix, self.parameter(module, matrix))

    def grad_matrix(self, module: nn.Module, matrix: Matrix) -> Tensor | None:
        """``.grad`` of the matrix, shaped like :meth:`weight_matrix` (None when absent)."""
        g = self.parameter(module, matrix).grad
        return None if g is None else self.matrix_of(module, matrix, g)

    def matrix_numel(self, module: nn.Module, matrix: Matrix) -> int:
        """Entries of weight-matrix parameters (``dim >= 2``) the matrix holds, for the
        coverage count (0 for vectors such as normalisation scales)."""
        p = self.parameter(module, matrix)
        if p.dim() < 2:
            return 0
        return int(p.numel() if matrix.rows is None
                   else (matrix.rows[1] - matrix.rows[0]) * (p.numel() // p.shape[0]))

    def how(self, module: nn.Module) -> str:
        """How the module is recorded, for the summary (``"Linear rule"``)."""
        return f"{self.module_type or type(self).__name__} rule"

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
                   grad_out: Tensor) -> PerSample:
        """Per-sample gradients of ``matrix`` for the micro-batch whose inputs were ``args`` and
        whose output gradient is ``grad_out`` (the loss-mean factor must be undone: multiply
        by the micro-batch size)."""
        raise NotImplementedError


def require_batched(module: nn.Module, what: str, x: Tensor, dims: int) -> None:
    """A clear error for inputs without a batch dimension (per-sample gradients need one)."""
    if x.dim() < dims:
        raise RecorderError(f"{type(module).__name__} received an unbatched {what} of shape "
                            f"{tuple(x.shape)}; per-sample gradients need a batch dimension")


def rank1_sketch(act: Tensor, delta: Tensor) -> dict[str, Tensor]:
    """Exact per-sample factors for a layer without weight sharing (kept for callers of the
    first release): ``G_i = outer(delta_i, act_i)``."""
    return {"ps_grad_out": delta, "ps_input": act.clone()}


def subspace_sketch(act: Tensor, delta: Tensor, U: Tensor, V: Tensor, *,
                    want_per_sample: bool = False):
    """Top-k subspace sketch of ``G_i = delta_i act_i^T`` (see
    :class:`trajlab.sketches.Subspace`)."""
    from trajlab.sketches import sketch_kind

    tensors, ps = sketch_kind(Subspace.name).capture(act, delta, basis=(U, V),
                                                  want_per_sample=want_per_sample)
    tensors.pop("_mean", None)
    return tensors, ps
