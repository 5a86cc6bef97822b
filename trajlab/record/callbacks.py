"""The forward and backward callbacks of a recorded step of a
:class:`~trajlab.record.recorder.Recorder`.

* :func:`new_micro` starts a micro-batch (:func:`on_model_forward`, the model's root forward
  pre-hook, or an integration's mark);
* :func:`forward_callback` makes a layer's forward hook: on a recorded, grad-enabled forward it
  describes the layer on its first input and registers a gradient hook on its output;
* that gradient hook calls ``Recorder._capture`` (:func:`capture`): the layer rule's
  per-sample gradients of the micro-batch, sketched and kept on the layer
  (:func:`trajlab.record.capture.record`).

Nothing here raises inside the user's forward or backward: a failure is kept on the layer
(``layer.failed``) and reported when the step is assembled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from trajlab.errors import RecorderError
from trajlab.record import capture as _capture
from trajlab.record import checks
from trajlab.record.layer_state import LayerState
from trajlab.record.step import Micro
from trajlab.record.summary import mixing_layers, mixing_message

if TYPE_CHECKING:
    from trajlab.record.recorder import Recorder


def on_model_forward(rec: Recorder, args: tuple) -> None:
    """The model's root forward pre-hook: a recorded, grad-enabled forward starts a
    micro-batch (not a forward inside a torch.func transform of the user's own)."""
    if not (rec.recording and torch.is_grad_enabled()):
        return
    if any(isinstance(a, Tensor) and _capture.transformed(a) for a in args):
        return  # a torch.func transform of the user's own, not a training forward
    new_micro(rec, marked=False)


def new_micro(rec: Recorder, *, marked: bool) -> None:
    """Start the step's next micro-batch: a model forward (``marked=False``; it joins the
    batch an integration just marked, if any) or an integration's mark (``marked=True``)."""
    micros = rec._state.micro
    last = micros[-1] if micros else None
    if not marked and last is not None and last.marked_only:
        micro = last  # the forward of the batch an integration marked
        micro.marked_only = False
    else:
        micro = Micro(marked_only=marked)
        micros.append(micro)
    o = rec.options
    if not rec._checked and o.self_check and o.loss_fn is not None:
        micro.rng = checks.rng_state()
    micro.autocast = checks.autocast_state(rec._device_types)
    if o.per_sample:
        mixing = mixing_layers(rec.model)
        if mixing and "mixing" not in rec._warned:
            rec._warned.add("mixing")
            rec._stop(RecorderError(mixing_message(mixing)), where="step")


def forward_callback(rec: Recorder, layer: LayerState) -> Callable[[tuple, dict, Any], None]:
    """The forward hook of ``layer`` (installed by its rule): on a recorded forward it hooks
    the gradient of the layer's output, which calls ``rec._capture`` in the backward."""
    def on_forward(args: tuple, kwargs: dict, output: Any) -> None:
        if (not rec.recording or rec._suspended or not torch.is_grad_enabled()
                or layer.dropped):
            return
        o = rec.options
        if not o.per_sample:
            return
        out = layer.target.rule.grad_output(output)
        if out is None or not out.requires_grad or _capture.transformed(out):
            return
        micro = max(0, len(rec._state.micro) - 1)
        axis = layer.target.sample_axis if layer.target.rule.positionwise else 0
        if axis and args and isinstance(args[0], Tensor):
            args = (args[0].movedim(axis, 0), *args[1:])  # samples first for the rule
        try:
            if layer.meta is None:  # described on its first input
                _capture.describe(layer, args, kwargs, per_sample=o.per_sample,
                                  tracker=rec._tracker, store_grad=o.store_grad,
                                  self_check=o.self_check)
        except Exception as e:  # noqa: BLE001 - never raise inside the user's forward
            layer.failed = e
            return
        dtypes = [a.dtype for a in args if isinstance(a, Tensor)] + [out.dtype,
                                                                    layer.target.param.dtype]
        amp = [d for _, d in checks.autocast_state([out.device.type])]
        eps = checks.eps_of(*dtypes, *amp)

        def on_grad(grad_out: Tensor) -> None:
            if axis:
                grad_out = grad_out.movedim(axis, 0)
            rec._capture(layer, micro, args, kwargs, grad_out, eps)

        out.register_hook(on_grad)

    return on_forward


def capture(rec: Recorder, layer: LayerState, micro: int, args: tuple, kwargs: dict,
            grad_out: Tensor, eps: float) -> None:
    """The backward of ``layer`` in micro-batch ``micro``: its rule's per-sample gradients,
    sketched and kept on the layer (a failure is kept as ``layer.failed``)."""
    if rec._suspended or not rec._active:
        return
    t = layer.target
    try:
        rec._suspended = True  # a rule may re-run forwards (attention, torch.func)
        try:
            ps = t.rule.per_sample(t.module, t.matrix, args, kwargs, grad_out.detach())
        finally:
            rec._suspended = False
        _capture.record(layer, ps, args, micro=micro, eps=eps,
                        forwards_seen=len(rec._state.micro), tracker=rec._tracker,
                        want_per_sample=rec.options.self_check and not rec._checked)
    except Exception as e:  # noqa: BLE001 - never raise inside the user's backward
        layer.failed = e


__all__ = ["capture", "forward_callback", "new_micro", "on_model_forward"]
