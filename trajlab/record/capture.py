"""Capture: what a recorded layer's hooks keep of one forward and backward.

The recorder's hooks call these at a recorded step: :func:`describe` fixes a layer's metadata
and sketch kind on its first input, :func:`record` turns the rule's per-sample form of one
micro-batch into the sketch kind's tensors (a :class:`~trajlab.record.step.Capture`), and
:func:`transformed` tells a forward of the user's own ``torch.func`` transform (not a training
step) apart. Nothing here installs hooks or touches the store.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from trajlab.errors import RecorderError
from trajlab.record.basis import SubspaceTracker
from trajlab.record.layer_state import LayerState
from trajlab.record.rules import Patches, PerSample
from trajlab.record.step import Capture
from trajlab.sketches import SketchKind, sketch_kind, weights_only_kind
from trajlab.store.layout import layer_group_name
from trajlab.store.metadata import LayerMeta


def describe(layer: LayerState, args: tuple, kwargs: dict, *, per_sample: bool,
             tracker: SubspaceTracker, store_grad: bool, self_check: bool) -> None:
    """Set ``layer.meta`` and ``layer.kind`` from the rule's description of its first input
    (samples first)."""
    t = layer.target
    desc = t.rule.describe(t.module, t.matrix, args, kwargs)
    shape = tuple(layer.weight().shape)
    kind = sketch_kind(desc.sketch) if per_sample else weights_only_kind()
    rank = (tracker.rank_for(shape) if kind.needs_basis
            else int(desc.rank) if kind.per_sample else 0)
    layer.kind = kind
    layer.meta = LayerMeta(
        name=layer.name, module=t.rule.module_type or type(t.module).__name__,
        group=layer_group_name(layer.name), sketch=kind.name,
        shape=(int(shape[0]), int(shape[1])), rank=rank, positions=desc.positions,
        geometry=desc.geometry,
        stored_grad=not (kind.implies_grad or kind.projected) or store_grad or not self_check,
        param=t.matrix.label,
    )


def describe_weights_only(layer: LayerState) -> None:
    """Set the metadata of a layer recorded without per-sample information."""
    shape = tuple(layer.weight().shape)
    t = layer.target
    layer.kind = weights_only_kind()
    layer.meta = LayerMeta(name=layer.name, module=t.rule.module_type or
                           type(t.module).__name__, group=layer_group_name(layer.name),
                           sketch=layer.kind.name, shape=(int(shape[0]), int(shape[1])),
                           stored_grad=True, param=t.matrix.label)


def record(layer: LayerState, ps: PerSample, args: tuple, *, micro: int, eps: float,
           forwards_seen: int, tracker: SubspaceTracker, want_per_sample: bool) -> None:
    """Append one micro-batch's capture to ``layer.captures``.

    Parameters
    ----------
    ps : the rule's per-sample form of the micro-batch (layer input and output gradient).
    args : the layer's inputs (samples first), for the message of a changed input shape.
    micro : index of the micro-batch in the step.  eps : the rounding unit of its dtypes.
    forwards_seen : model forwards seen so far in the step (tells interleaved forwards).
    tracker : the subspace tracker (the step's basis for ``subspace`` layers).
    want_per_sample : the first step's self-check follows: keep sample 0's dense gradient
        (1, m, n) when the kind cannot give it from its tensors (:func:`gives_sample_gradient`,
        :func:`sample_zero_dense`); no kind builds all B dense per-sample gradients.
    """
    if layer.kind.needs_basis and layer.basis is None:
        # this step's basis, from the weight at the layer's first backward
        layer.basis = tracker.basis(layer.name, layer.weight().detach())
    basis = None if layer.basis is None else layer.basis[:2]
    if (layer.kind.single_position and isinstance(ps, Patches)
            and ps.act.shape[-1] != 1):
        raise RecorderError(
            f"layer {layer.name!r} was recorded with (batch, features) inputs but "
            f"now sees {tuple(args[0].shape)}; its input shape must not change "
            "between steps (record such a run into a new store)")
    tensors, _ = ps.capture(layer.kind, basis=basis, rank=layer.meta.rank,
                            want_per_sample=False)
    dense = None
    if want_per_sample and not gives_sample_gradient(layer.kind):
        dense = sample_zero_dense(ps, layer.kind, basis=basis, rank=layer.meta.rank)
    layer.captures.append(Capture(micro, ps.batch, tensors, dense, eps,
                                  forwards_seen=forwards_seen))


def sample_zero_dense(ps: PerSample, kind: SketchKind, *, basis: tuple[Tensor, Tensor] | None,
                      rank: int) -> Tensor | None:
    """Sample 0's dense gradient (1, m, n), for the first step's self-check of a kind that
    cannot give it from its tensors.

    The kind captures ``ps`` cut to its first sample (every tensor field of the rule's
    per-sample form has the samples first): one (m, n) matrix instead of B. A form that cannot
    be cut so (not a dataclass, or a tensor field without the batch first) is captured whole
    and sample 0's gradient kept.
    """
    one = _first_sample(ps)
    if one is None:
        _, dense = ps.capture(kind, basis=basis, rank=rank, want_per_sample=True)
    else:
        _, dense = one.capture(kind, basis=basis, rank=rank, want_per_sample=True)
    return None if dense is None else dense[:1].clone()


def _first_sample(ps: PerSample) -> PerSample | None:
    """``ps`` with every tensor field cut to its first sample; None when that is not possible."""
    if not dataclasses.is_dataclass(ps):
        return None
    B = ps.batch
    cut = {}
    for f in dataclasses.fields(ps):
        v = getattr(ps, f.name)
        if isinstance(v, Tensor):
            if v.dim() == 0 or v.shape[0] != B:
                return None
            cut[f.name] = v[:1]
    return dataclasses.replace(ps, **cut)


def gives_sample_gradient(kind: SketchKind) -> bool:
    """Whether ``kind`` gives any sample's gradient from its own tensors
    (:meth:`~trajlab.sketches.base.SketchKind.sample_gradient`): an exact kind that implements
    it. The first step's self-check then reads sample 0's gradient there, and the capture
    builds no dense gradient for it."""
    return kind.exact and type(kind).sample_gradient is not SketchKind.sample_gradient


def transformed(t: Tensor) -> bool:
    """Whether ``t`` lives inside a torch.func transform (vmap/grad of the user's own): such
    forwards are not training steps and are left alone."""
    if torch.compiler.is_compiling():
        return False  # being traced by torch.compile: a training forward
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except (AttributeError, RuntimeError):  # pragma: no cover - other torch builds
        return False


__all__ = ["describe", "describe_weights_only", "gives_sample_gradient", "record",
           "sample_zero_dense", "transformed"]
