"""Sketch kinds: how a layer's per-sample gradients are stored, captured, read and analysed.

Each kind is one class (:class:`~trajlab.sketches.base.SketchKind`) registered here by name;
the store layout, the recorder, the reader and the analysis all dispatch through
:func:`sketch_kind` and ask the kind's capabilities (never its name). Register a new kind with
:func:`register_sketch_kind`; every registered kind must pass the conformance class of
tests/sketches/test_sketch_conformance.py.
"""

from __future__ import annotations

from trajlab.sketches.base import SketchKind, SketchName, Var
from trajlab.sketches.diagonal import DiagonalSketch
from trajlab.sketches.none import NoSketch
from trajlab.sketches.rank1 import Rank1
from trajlab.sketches.rank1_basis import Rank1Basis
from trajlab.sketches.rows import RowsSketch
from trajlab.sketches.subspace import Subspace, reconstruct_subspace

_KINDS: dict[str, SketchKind] = {}


def register_sketch_kind(kind: SketchKind, *, overwrite: bool = False) -> SketchKind:
    """Make ``kind`` available by its ``name`` (stored in layer metadata)."""
    if not isinstance(kind, SketchKind) or not kind.name:
        raise TypeError("register_sketch_kind needs a SketchKind instance with a name")
    if kind.name in _KINDS and not overwrite:
        raise ValueError(f"sketch kind {kind.name!r} is already registered; pass overwrite=True")
    _KINDS[kind.name] = kind
    return kind


def sketch_kind(name: SketchName) -> SketchKind:
    """The registered sketch kind called ``name``; ValueError naming the known kinds."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown sketch kind {name!r}; known kinds: "
                         f"{', '.join(sorted(_KINDS))}") from None


def sketch_kinds() -> dict[str, SketchKind]:
    """All registered kinds by name."""
    return dict(_KINDS)


def weights_only_kind() -> SketchKind:
    """The kind of a layer recorded without per-sample information (``per_sample=False``, or a
    layer whose capture is given up): weights, batch gradient and updates only."""
    return sketch_kind(NoSketch.name)


for _k in (Rank1(), Subspace(), NoSketch(), DiagonalSketch(), RowsSketch(), Rank1Basis()):
    register_sketch_kind(_k)

__all__ = [
    "DiagonalSketch",
    "NoSketch",
    "Rank1",
    "Rank1Basis",
    "RowsSketch",
    "SketchKind",
    "SketchName",
    "Subspace",
    "Var",
    "reconstruct_subspace",
    "register_sketch_kind",
    "sketch_kind",
    "sketch_kinds",
    "weights_only_kind",
]
