"""The contract of a sketch kind: what a layer stores about its per-sample gradients, and how
recording, reading and analysis use it.

A sketch kind owns, in one class:

* its stored variables (:meth:`SketchKind.variables`: dims and dtype of each, for the store
  layout),
* its capture from a layer's activations and output gradients, from dense per-sample
  gradients, and from diagonal or row-sparse ones (:meth:`SketchKind.capture_diagonal`,
  :meth:`SketchKind.capture_rows`: by default through the dense gradients) (torch, on the
  training device),
* the batch-mean gradient it implies, rescaling and concatenation of micro-batches,
* its reconstruction of per-sample gradients from stored arrays (numpy),
* its adaptor to the SDE kernels: per-sample directions ``G_i v1``, ``G_i^T u1``, the
  elementwise second moment ``sum_i G_i**2`` and the coverage of ``u1``, ``v1`` (torch, with any
  leading dimensions, e.g. steps),
* its capabilities, which callers ask instead of comparing kind names: :attr:`needs_basis`,
  :attr:`single_position`, :attr:`diagonal`, :attr:`exact`, :attr:`per_sample`,
  :attr:`implies_grad` and :meth:`sample_size`.

Kinds are registered by name in :mod:`trajlab.sketches` and looked up with
:func:`trajlab.sketches.sketch_kind`. Layer rules (:mod:`trajlab.record.rules`) say which kind a
layer produces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from trajlab.dims import IN, OUT, RANK

#: Storage dtype of a variable: a numpy dtype name, ``"param"`` (the run's float dtype) or
#: ``"ps"`` (the run's per-sample storage dtype, which may be reduced precision).
DType = str

#: A registered kind's name (its registry key, stored in each layer's metadata); the kind
#: itself is a :class:`SketchKind`, looked up with :func:`trajlab.sketches.sketch_kind`.
SketchName = str


@dataclass(frozen=True)
class Var:
    """One stored variable of a layer group, without the leading ``step`` dimension.

    Attributes
    ----------
    dims : dimension names after ``step`` (from :mod:`trajlab.store.names`).
    dtype : numpy dtype name, ``"param"`` or ``"ps"`` (see :data:`DType`).
    description : meaning and unit, written as the array's ``description`` attribute.
    flag_nonfinite : NaN/Inf here sets the step's ``nonfinite`` flag (gradient information).
    """

    dims: tuple[str, ...]
    dtype: DType
    description: str
    flag_nonfinite: bool = False

    @property
    def per_sample(self) -> bool:
        """Whether the variable has a sample axis (first after ``step``)."""
        return bool(self.dims) and self.dims[0] == "sample"


class SketchKind:
    """How one kind of per-sample sketch is stored, captured, read and analysed.

    Subclasses set the class attributes and implement the methods they support; the defaults
    describe a kind without per-sample information.
    """

    #: Registry key, stored in each layer's metadata.
    name: ClassVar[str] = ""
    #: One line for ``trajlab info``.
    summary: ClassVar[str] = ""
    #: The stored variables determine every per-sample gradient exactly.
    exact: ClassVar[bool] = False
    #: The kind carries per-sample information (noise terms can be computed).
    per_sample: ClassVar[bool] = True
    #: The batch-mean gradient is implied exactly by the stored variables, so ``grad`` need not
    #: be stored.
    implies_grad: ClassVar[bool] = False
    #: Variable whose sample axis gives the batch size, and that axis (negative, for leading
    #: dims).
    batch_var: ClassVar[tuple[str, int] | None] = None
    #: The capture projects onto orthonormal bases (U, V) of W's top-k singular vectors, taken
    #: by the recorder at each recorded step and stored with the step; the layer's ``rank`` is
    #: the k the recorder chooses (else the rule's).
    needs_basis: ClassVar[bool] = False
    #: The capture needs exactly one position per sample (no weight sharing): a layer whose
    #: inputs gain positions after its first step cannot continue with this kind.
    single_position: ClassVar[bool] = False
    #: The layer's matrix is diagonal, ``W = diag(gamma)`` (normalisation scales): its SDE terms
    #: have the closed form of :func:`trajlab.sde.diagonal_layer_terms` (no spectrum), and its
    #: entries are not weight-matrix parameters (K_net's coverage counts it apart).
    diagonal: ClassVar[bool] = False
    #: The stored variables are statistics in the recorder's singular basis of W, not
    #: directions: the analysis computes the noise terms with
    #: :func:`trajlab.sde.basis.basis_noise_terms` (:class:`~trajlab.sketches.Rank1Basis`).
    projected: ClassVar[bool] = False

    # ------------------------------------------------------------------ layout
    def variables(self, rank: int) -> dict[str, Var]:
        """Stored variables of a layer with this kind (``rank``: the layer's sketch rank)."""
        return {}

    def sample_size(self, shape: tuple[int, int], rank: int) -> int:
        """Numbers stored per sample of an (m, n) layer: the sum over its per-sample variables
        of their sizes after the sample axis (for chunk sizing)."""
        size = {OUT: int(shape[0]), IN: int(shape[1]), RANK: max(1, int(rank))}
        return sum(math.prod(size[d] for d in v.dims[1:])
                   for v in self.variables(rank).values() if v.per_sample)

    # ------------------------------------------------------------------ recording (torch)
    def capture(self, act: Tensor, delta: Tensor, *, basis: tuple[Tensor, Tensor] | None = None,
                want_per_sample: bool = False) -> tuple[dict[str, Tensor], Tensor | None]:
        """Sketch one micro-batch.

        Parameters
        ----------
        act : (B, n, P) layer inputs (patches), P weight-sharing positions.
        delta : (B, m, P) per-sample output gradients (the loss-mean factor undone).
        basis : (U (m, k), V (n, k)) orthonormal bases, for kinds that project.
        want_per_sample : also return the dense (B, m, n) per-sample gradients (self-check).
        """
        raise NotImplementedError(f"sketch kind {self.name!r} does not capture per-sample data")

    def capture_dense(self, G: Tensor, *, basis: tuple[Tensor, Tensor] | None = None,
                      want_per_sample: bool = False
                      ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Sketch dense per-sample gradients ``G`` (B, m, n) of one micro-batch."""
        raise NotImplementedError(f"sketch kind {self.name!r} cannot sketch dense per-sample "
                                  "gradients")

    def capture_diagonal(self, values: Tensor, *, basis: tuple[Tensor, Tensor] | None = None,
                         want_per_sample: bool = False
                         ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Sketch the per-sample gradients of a diagonal matrix, ``G_i = diag(values[i])``
        (``values`` (B, d)).

        This default has no compact form for diagonals: it sketches the dense ``diag``
        matrices with :meth:`capture_dense` (and ``basis``). A kind that stores the vectors
        themselves overrides it.
        """
        return self.capture_dense(torch.diag_embed(values), basis=basis,
                                  want_per_sample=want_per_sample)

    def capture_rows(self, index: Tensor, values: Tensor, *, rows: int, slots: int,
                     basis: tuple[Tensor, Tensor] | None = None, want_per_sample: bool = False
                     ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Sketch row-sparse per-sample gradients ``G_i = sum_p e_{index[i, p]} values[i, p]^T``
        (``index`` (B, P), negative entries skipped; ``values`` (B, P, n); ``rows`` rows m).

        This default has no compact form for rows: it sketches the dense (B, m, n) gradients
        (:func:`dense_from_rows`) with :meth:`capture_dense` (and ``basis``); ``slots`` (rows
        stored per sample) is for kinds that store the rows themselves, which override it.
        """
        return self.capture_dense(dense_from_rows(index, values, rows), basis=basis,
                                  want_per_sample=want_per_sample)

    def batch_size(self, tensors: Mapping[str, Tensor]) -> int:
        """Number of samples B the sketch holds."""
        if self.batch_var is None:
            raise ValueError(f"sketch kind {self.name!r} holds no samples")
        key, dim = self.batch_var
        _require(self, tensors, (key,))
        return int(tensors[key].shape[dim])

    def mean_gradient(self, tensors: Mapping[str, Tensor]) -> Tensor | None:
        """Batch mean of the per-sample gradients, (m, n); None when the sketch cannot give it."""
        return None

    def mean_gradient_times(self, tensors: Mapping[str, Tensor], r: Tensor) -> Tensor | None:
        """``mean_i G_i @ r`` for probe vectors ``r`` (n, p): a cheap check of ``.grad``."""
        g = self.mean_gradient(tensors)
        return None if g is None else g @ r.to(g.dtype)

    def sample_gradient(self, tensors: Mapping[str, Tensor], i: int) -> Tensor | None:
        """Sample ``i``'s gradient (m, n) if the sketch holds it exactly, else None."""
        return None

    def sample_gradients(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Every per-sample gradient (..., B, m, n), with any leading dimensions (exact kinds)."""
        raise NotImplementedError(f"sketch kind {self.name!r} does not hold the per-sample "
                                  "gradients exactly")

    def rescale(self, tensors: dict[str, Tensor], c: float) -> dict[str, Tensor]:
        """The sketch of the per-sample gradients ``c * G_i``."""
        return tensors

    def concat(self, parts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """One sketch holding the samples of several micro-batches, in order."""
        raise NotImplementedError(f"sketch kind {self.name!r} cannot join micro-batches")

    def finalize(self, tensors: Mapping[str, Tensor], weight: Tensor) -> dict[str, Tensor]:
        """The variables to store from an assembled step's ``tensors`` (after the recorder's
        checks, which read the captured tensors) and the weight before the update (m, n).
        This default stores the captured tensors as they are."""
        return dict(tensors)

    # ------------------------------------------------------------------ reading (numpy)
    def implied_grad(self, arrays: Mapping[str, np.ndarray], batch: np.ndarray) -> np.ndarray:
        """Batch-mean gradients (T, m, n) implied by stored rows (only when ``implies_grad``)."""
        raise NotImplementedError(f"sketch kind {self.name!r} does not imply the batch gradient")

    def reconstruct(self, arrays: Mapping[str, np.ndarray], b: int
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-sample gradients (b, m, n) of one stored step and the squared norm each misses."""
        raise NotImplementedError(f"sketch kind {self.name!r} holds no per-sample gradients")

    # ------------------------------------------------------------------ analysis (torch)
    def directions(self, tensors: Mapping[str, Tensor], u1: Tensor, v1: Tensor
                   ) -> tuple[Tensor, Tensor]:
        """``(G_i v1 (..., B, m), G_i^T u1 (..., B, n))`` from the sketch."""
        raise NotImplementedError(f"sketch kind {self.name!r} holds no per-sample directions")

    def second_moment(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``sum_i G_i**2`` elementwise, (..., m, n)."""
        raise NotImplementedError(f"sketch kind {self.name!r} holds no second moment")

    def coverage(self, tensors: Mapping[str, Tensor], u1: Tensor, v1: Tensor
                 ) -> tuple[Tensor, Tensor]:
        """``(||U^T u1||, ||V^T v1||)``: how much of the top pair the sketch holds (1 = exact)."""
        one = torch.ones(u1.shape[:-1], dtype=u1.dtype, device=u1.device)
        return one, one.clone()

    # ------------------------------------------------------------------ helpers
    def needs(self) -> tuple[str, ...]:
        """Names of the variables the analysis adaptor reads."""
        return tuple(self.variables(1))

    def __repr__(self) -> str:
        return f"<sketch kind {self.name!r}>"


def dense_from_rows(index: Tensor, values: Tensor, rows: int) -> Tensor:
    """The dense (B, rows, n) gradients ``G_i = sum_p e_{index[i, p]} values[i, p]^T`` of
    row-sparse ones (``index`` (B, P), negative entries skipped; ``values`` (B, P, n))."""
    B, P, n = values.shape
    keep = index >= 0
    out = values.new_zeros(B, rows, n)
    idx = torch.where(keep, index, torch.zeros_like(index))
    vals = values * keep[..., None].to(values.dtype)
    return out.scatter_add_(1, idx[..., None].expand(B, P, n), vals)


def _require(kind: SketchKind, tensors: Mapping[str, Any], keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"{kind.name!r} sketch is missing {missing}; it needs "
                         f"{list(kind.needs())}")

