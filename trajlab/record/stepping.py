"""One recorded step of a :class:`~trajlab.record.recorder.Recorder`: what it gathers
(:class:`StepState`) and what the optimizer's step hooks do with it.

* :func:`check_continuity` runs before the first step after a resume;
* :func:`before` runs in the hook before ``optimizer.step()``: it checks the optimizer and the
  writer, then :func:`assemble` turns the step's captures into one record per layer (see
  :mod:`trajlab.record.assembly`), runs the first step's self-check and the probe.
* :func:`after` runs in the hook after ``optimizer.step()``: :func:`emit` hands the step's rows
  to the writer (see :mod:`trajlab.record.emission`), creating the store at the first one.

Failures follow the recorder's policy: a set-up problem (nothing recorded yet) raises, a later
one stops recording (:func:`trajlab.record.stopping.stop`) and training goes on. The Recorder
keeps the run's state (layers, counters, the writer); these functions read and update it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trajlab.errors import RecorderError, SelfCheckError, user_stacklevel
from trajlab.record import (
    assembly,
    capture,
    emission,
    failures,
    optimizer_hooks,
    stopping,
    store_policy,
)
from trajlab.record.batchnorm import batchnorm_row
from trajlab.record.layer_state import LayerState
from trajlab.record.options import PS_DTYPES
from trajlab.record.staging import PendingRecord, stage
from trajlab.record.step import Micro

if TYPE_CHECKING:
    from trajlab.record.recorder import Recorder


@dataclass
class StepState:
    """What one recorded step gathers between its first forward and the end of its
    ``optimizer.step()`` (the layers' own captures are on their
    :class:`~trajlab.record.layer_state.LayerState`). A fresh one starts every step.

    Attributes
    ----------
    micro : the step's micro-batches (model forwards, or batches an integration marked), with
        what ``log`` attached to each.
    batchnorm_before : the BatchNorm root variables, read before the update (as the weights).
    probe_grads : each layer's probe gradient matrix, on a probe step (else None).
    """

    micro: list[Micro] = field(default_factory=list)
    batchnorm_before: dict[str, Tensor] | None = None
    probe_grads: dict[str, Tensor] | None = None

    def attach(self, *, loss: float | None, indices: Tensor | None,
               batch_size: int | None, inputs: Tensor | None, targets: Tensor | None) -> None:
        """Attach what ``Recorder.log`` was given (checked) to the current micro-batch, or to
        a new one when no forward started it; ``inputs``/``targets`` None: not kept."""
        if not self.micro:
            self.micro.append(Micro())
        m = self.micro[-1]
        if loss is not None:
            m.loss = loss
        if indices is not None:
            m.indices = indices
        if batch_size is not None:
            m.batch = int(batch_size)
        if inputs is not None:
            m.inputs, m.targets = inputs, targets


# ----------------------------------------------------------------------------- before the step
def check_continuity(rec: Recorder) -> None:
    """The first step after a resume: warn when the model's weights do not continue the
    stored run (see :func:`trajlab.record.store_policy.continuity`)."""
    expected, rec._resume_check = rec._resume_check, None
    for layer in rec._layers:
        msg = store_policy.continuity(layer.name, expected[layer.name], layer.weight(),
                                      last_step=rec._step - 1)
        if msg:
            warnings.warn(f"trajlab: {msg}", RuntimeWarning, stacklevel=user_stacklevel())
            break


def drop_broadcast(rec: Recorder) -> None:
    """First step of a new store: leave out layers broadcast over the batch (see
    :func:`trajlab.record.assembly.broadcast_layers`)."""
    rec._layers = assembly.drop_broadcast(rec._layers, rec._summary,
                                          explicit=rec._explicit_layers)


def before(rec: Recorder) -> None:
    """The hook before a recorded ``optimizer.step()``: assemble the step, or stop (or raise)
    per the failure policy."""
    if optimizer_hooks.count_params(rec.optimizer) != rec._n_params:  # recorded steps only
        stopping.param_groups_changed(rec)
    stopping.check_writer(rec)
    if rec._stopped_reason is not None:
        return
    try:
        assemble(rec)
    except SelfCheckError:
        rec._reset_step()
        raise
    except RecorderError as e:
        rec._reset_step()
        if not rec._checked or rec._n_recorded == 0:
            raise
        rec._stop(e, where="step")


def assemble(rec: Recorder) -> None:
    """Turn this step's captures into one record per layer (see
    :mod:`trajlab.record.assembly` and :mod:`trajlab.record.step`)."""
    o, state = rec.options, rec._state
    assembly.check_dtype(rec._run_meta, rec._layers)
    if o.per_sample and rec._n_recorded == 0 and rec._run_meta is None:
        rec._drop_broadcast()
    first_micro = None
    state.batchnorm_before = batchnorm_row(rec.model)  # as the weights: before the update
    for layer in rec._layers:
        layer.weight_before = layer.weight().detach().clone()
        if not o.per_sample:
            if layer.meta is None:
                capture.describe_weights_only(layer)
            continue
        grad = assembly.gradient(layer, step=rec._step)
        if layer.failed or not layer.captures or grad is None:
            flag_failed(rec, layer, grad)
            continue
        asm = assembly.assemble_layer(layer, grad, step=rec._step, first=first_micro,
                                      checked=rec._checked)
        if first_micro is None:
            first_micro = asm.first_micro
        layer.captures = []
        layer.assembled = asm
    if not rec._checked:
        if o.self_check and o.per_sample:
            assembly.first_step_checks(rec._layers, state.micro, rec.model, loss_fn=o.loss_fn,
                                       isolated=lambda: isolated(rec))
        rec._checked = True
    state.probe_grads = probe_gradients(rec)


def flag_failed(rec: Recorder, layer: LayerState, grad: Tensor | None) -> None:
    """A layer whose capture failed numerically (NaN weights, an SVD that did not
    converge): its row is flagged non-finite, training goes on."""
    why = assembly.failure(layer, grad, checked=rec._checked)
    layer.assembled = None
    rec._nonfinite_seen.append((rec._step, layer.name))
    rec._warned.warn(f"failed:{layer.name}",
                     failures.layer_failed_message(layer.name, rec._step, why))


def probe_gradients(rec: Recorder) -> dict[str, Tensor] | None:
    """Each layer's probe gradient matrix on a probe step (``options.probe``), else None."""
    probe = rec.options.probe
    if probe is None or rec._step % probe.every != 0:
        return None
    params = [layer.target.param for layer in rec._layers]
    with isolated(rec), torch.enable_grad():
        grads = probe.gradient(rec.model, params)
    out = {}
    for layer, g in zip(rec._layers, grads):
        t = layer.target
        out[layer.name] = t.rule.matrix_of(t.module, t.matrix, g).detach()
    return out


@contextlib.contextmanager
def isolated(rec: Recorder) -> Iterator[None]:
    """Run extra forward passes without side effects on training: hooks off, RNG and
    buffers (e.g. BatchNorm statistics) restored afterwards."""
    buffers = {n: b.detach().clone() for n, b in rec.model.named_buffers()}
    devices = [p.device for p in rec.model.parameters() if p.device.type == "cuda"]
    rec._suspended = True
    try:
        with torch.random.fork_rng(devices=list({d.index or 0 for d in devices})):
            yield
    finally:
        rec._suspended = False
        live = dict(rec.model.named_buffers())
        for n, b in buffers.items():
            live[n].copy_(b)


# ----------------------------------------------------------------------------- after the step
def after(rec: Recorder) -> None:
    """The hook after a recorded ``optimizer.step()`` that was assembled: emit the step's rows;
    a failure raises before anything was recorded (a set-up problem), else stops recording."""
    try:
        emit(rec)
    except RecorderError as e:
        if rec._n_recorded == 0:
            raise  # a set-up problem: fail fast, nothing was recorded
        rec._stop(e, where="step")


@torch.no_grad()
def emit(rec: Recorder) -> None:
    """Hand the step's rows to the writer (see :mod:`trajlab.record.emission`); the first
    recorded step creates the store (or checks the run it appends to)."""
    writer = rec._writer
    assert writer is not None
    o, state = rec.options, rec._state
    layers, batch, micro_batches = emission.layer_rows(
        rec._layers, lr_of=rec._lrs, per_sample=o.per_sample,
        ps_dtype=PS_DTYPES.get(o.per_sample_dtype or ""), probe_grads=state.probe_grads)
    micros = [state.micro[i] for i in micro_batches if i < len(state.micro)] or state.micro
    if batch is None:
        batch = emission.logged_batch(micros)
    if rec._n_recorded == 0 and rec._run_meta is None:
        rec._run_meta = emission.run_meta(
            rec._layers, options=o, every=rec.every, metadata=rec.metadata,
            optimizer=rec.optimizer, summary=rec._summary, batch_size=max(1, batch))
        writer.create(rec._run_meta, max(1, batch))
    elif rec._n_recorded == 0:
        store_policy.check_append(rec._run_meta, [lay.meta for lay in rec._layers],
                                  dtype=rec._run_meta.dtype, every=rec.every,
                                  probe=o.probe is not None)
    root = emission.root_row(
        step=rec._step, lr=layers[rec._layers[0].name]["lr"], batch=batch,
        micros=micros, probe=state.probe_grads is not None,
        extra=state.batchnorm_before, warn=rec._warned.warn)
    writer.put(to_host(rec, root, layers))
    rec._n_recorded += 1
    if not rec._disk.done:
        stopping.check_disk(rec, rec._step)


def to_host(rec: Recorder, root: dict, layers: dict[str, dict]) -> PendingRecord:
    """Start the record's device-to-host copies (see :mod:`trajlab.record.staging`)."""
    return stage(root, layers,
                 widen_bfloat16=rec._layers[0].target.param.dtype == torch.bfloat16)


__all__ = ["StepState", "after", "assemble", "before", "check_continuity", "drop_broadcast", "emit",
           "isolated", "probe_gradients"]
