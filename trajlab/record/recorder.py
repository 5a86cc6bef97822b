"""The Recorder: hooks on a model and its optimizer that stream a training run into a run store.

Between recorded steps the recorder costs one Python call per optimizer step (the step hook
that counts steps). Just before a recorded step it installs its per-layer hooks and a root
forward pre-hook, and removes them when that step's ``optimizer.step()`` returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from trajlab.errors import RecorderError, SelfCheckError
from trajlab.record import (
    callbacks,
    disk_space,
    emission,
    failures,
    log_checks,
    optimizer_hooks,
    resume,
    stepping,
    stopping,
)
from trajlab.record import ddp as _ddp
from trajlab.record.basis import SubspaceTracker
from trajlab.record.layer_state import LayerState, plan_layers
from trajlab.record.log_checks import _check_indices_type, _check_loss_type
from trajlab.record.options import RecorderOptions, int_option
from trajlab.record.process_writer import ProcessWriter, make_writer
from trajlab.record.rules import supported_types
from trajlab.record.session import Session
from trajlab.record.step import Micro
from trajlab.record.stepping import StepState
from trajlab.record.writer import BackgroundWriter
from trajlab.store.run_store import RunStoreWriter
from trajlab.store.target import StoreLike, show

if TYPE_CHECKING:
    from typing_extensions import Self


#: Option names readable as Recorder attributes (``rec.per_sample``), for code written before
#: :class:`RecorderOptions`.
_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(RecorderOptions))


class Recorder:
    """Record a training run into a Zarr run store.

    A context manager: on entry it checks the model, takes the store's lock and hooks the
    optimizer's ``step``; on exit (also after an exception) it removes every hook, flushes the
    background writer and commits what was recorded. Nothing is written onto the user's modules.

    Parameters
    ----------
    model : nn.Module
        The model being trained (also a ``torch.compile``'d module: the recorder attaches to
        the module it wraps and keeps its hooks installed; or a ``DistributedDataParallel``
        model, on every rank: rank 0 writes one store with every rank's samples, see
        docs/integrations.md).
    store : str, path or zarr store
        Where to write (path, ``file://`` or fsspec URL, or a ``zarr.storage.LocalStore``).
    optimizer : torch.optim.Optimizer
        The optimizer whose ``step()`` defines a training step. The update it applies is
        recorded as is (any optimizer: momentum, weight decay, Adam, per-group learning rates).
        Accelerate's ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer`` are
        unwrapped to the torch optimizer they hold; ``step(closure)`` is recorded when the
        closure returns.
    options : RecorderOptions, optional
        Every option at once; keywords given beside it replace its fields.
    **kwargs
        Any field of :class:`trajlab.RecorderOptions`, grouped there as selection (``every``,
        ``layers``, ``rank``, ``per_sample``, ``per_sample_dtype``, ``batch_dim``), run info
        (``sampler``, ``dataset_size``, ``steps``, ``start_step``, ``metadata``), checks
        (``self_check``, ``loss_fn``, ``probe``, ``on_error``), storage (``mode``,
        ``chunk_steps``, ``compression``, ``store_grad``, ``storage_options``) and writer
        (``writer``, ``queue_size``, ``flush_seconds``); docs/recorder.md has the table. An
        unknown name is a ``TypeError`` naming the closest option.

    Examples
    --------
    >>> with trajlab.Recorder(model, "run.zarr", optimizer=opt) as rec:  # doctest: +SKIP
    ...     for x, y, idx in loader:
    ...         opt.zero_grad()
    ...         loss = F.cross_entropy(model(x), y)
    ...         loss.backward()
    ...         rec.log(loss=loss, indices=idx)
    ...         opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        store: StoreLike,
        *,
        optimizer: torch.optim.Optimizer,
        options: RecorderOptions | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizer = optimizer_hooks.unwrap(optimizer)  # accelerate's / Lightning's wrappers
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        opts = self.options = RecorderOptions.build(options, **kwargs)
        model, self._dist = _ddp.detect(model)  # DistributedDataParallel: its module
        self._ddp_stopped = False  # every rank agreed to stop recording (see ddp.before_step)
        self._compiled = type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod")
        self.model = model._orig_mod if self._compiled else model
        self.optimizer = optimizer
        self.store = store
        self.every = opts.every  # read on every step (``recording``): a plain attribute
        self.metadata = dict(opts.metadata or {})
        self._layers, self._summary = plan_layers(self.model, optimizer, opts)
        self._explicit_layers = opts.layers is not None
        self._tracker = SubspaceTracker(opts.rank)
        self._step_handles: list[Any] = []
        self._layer_handles: list[Any] = []
        self._armed_always = False  # hooks stay installed (torch.compile)
        self._lrs = emission.LearningRates(optimizer)
        self._session = Session(store, opts)  # the store's lock, its writers
        self._step = 0
        self._n_recorded = 0
        self._checked = False
        self._active = False
        self._suspended = False
        self._stopped_reason: str | None = None
        self._state = StepState()  # the recorded step's micro-batches, probe, BatchNorm row
        self._nonfinite_seen: list[tuple[int, str]] = []
        self._warned = failures.OnceWarnings()
        self._n_params = optimizer_hooks.count_params(self.optimizer)  # stepped at the start
        self._resume_check: dict[str, np.ndarray] | None = None
        self._run_meta = None  # the metadata this recording writes (set when the store is made)
        self._failure: BaseException | None = None
        self._disk = disk_space.DiskSpaceCheck(store, steps=opts.steps, every=opts.every)
        self._device_types = sorted({layer.target.param.device.type for layer in self._layers})

    # ------------------------------------------------------------------ properties
    @property
    def layer_names(self) -> list[str]:
        """Names of the matrices being recorded."""
        return [layer.name for layer in self._layers]

    @property
    def summary(self) -> dict[str, Any]:
        """What is recorded of the model: every module with parameters, recorded (how) or not
        (why), and why the product of the recorded norms may not bound the network."""
        return self._summary

    def __getattr__(self, name: str) -> Any:
        """The options read as attributes, as before they were grouped (``rec.loss_fn``)."""
        if name in _OPTION_NAMES and "options" in self.__dict__:
            return getattr(self.__dict__["options"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def step(self) -> int:
        """Index of the next optimizer step."""
        return self._step

    @property
    def recording(self) -> bool:
        """Whether the next optimizer step will be recorded."""
        return (self._active and not self._suspended and self._stopped_reason is None
                and self._step % self.every == 0)

    @property
    def _micro(self) -> list[Micro]:
        """The recorded step's micro-batches (:attr:`StepState.micro`)."""
        return self._state.micro

    @property
    def _writer(self) -> BackgroundWriter | ProcessWriter | None:
        """The background writer while recording (None before entry and after close)."""
        return self._session.writer

    @property
    def _store_writer(self) -> RunStoreWriter | None:
        return self._session.store_writer

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Self:
        if self._dist is not None:
            return _ddp.enter(self)  # rank 0 enters as below, and tells the other ranks
        return self._enter()

    def _enter(self) -> Recorder:
        sw = self._session.open_store()
        try:
            self._disk.rows_before = sw.committed
            self._prepare_resume()
            self._session.start_writer(
                make_writer, on_nonfinite=lambda s, n: self._nonfinite_seen.append((s, n)))
            self._step_handles.extend(optimizer_hooks.hook(
                self.optimizer, before=self._before_step, after=self._after_step))
        except BaseException:
            self._remove(self._step_handles)
            self._session.abort()
            raise
        self._active = True
        if self._compiled:
            self._arm(always=True)
            with contextlib.suppress(Exception):
                torch.compiler.reset()  # recompile the wrapped module with the hooks traced
        elif self.recording:
            self._arm()
        return self

    def _prepare_resume(self) -> None:
        """Where this recording starts: a new store at ``start_step`` (or 0), or the run it
        appends to, checked against the model (see :mod:`trajlab.record.resume`)."""
        r = resume.plan(self._store_writer, self._layers, self._summary,
                        start_step=self.options.start_step, every=self.every)
        self._step, self._layers = (self._step if r.step is None else r.step), r.layers
        if r.meta is not None:
            self._run_meta = r.meta
        self._resume_check = r.expected

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self._failure is None:
            self._failure = exc
        self.close()

    def close(self) -> None:
        """Remove all hooks, flush and commit. Called by ``__exit__``; idempotent."""
        self._active = False
        self._remove(self._layer_handles)
        self._remove(self._step_handles)
        self._reset_step()
        err = self._session.close_writer(self._stopped_reason)
        if err is not None and self._stopped_reason is None:
            self._stop(err, where="close")
        self._session.release()
        if not self._disk.done and self._n_recorded and self._stopped_reason is None:
            stopping.check_disk(self, self._step - 1)  # a run shorter than the first commit
        stopping.nonfinite_warning(self)
        follower = self._dist is not None and not self._dist.writes  # DDP: rank 0 writes
        if self._n_recorded == 0 and self._stopped_reason is None and not follower:
            self._warned.warn("empty", failures.nothing_recorded_message(self._failure,
                                                                         show(self.store)))

    # ------------------------------------------------------------------ hooks
    @staticmethod
    def _remove(handles: list[Any]) -> None:
        for h in handles:
            h.remove()
        handles.clear()

    def _arm(self, *, always: bool = False) -> None:
        """Install the per-layer hooks and the root pre-hook (for the coming recorded step)."""
        if self._layer_handles:
            return
        on_forward = self._on_model_forward

        def root_hook(module: nn.Module, args: tuple) -> None:  # a plain function: copy.deepcopy
            on_forward(module, args)  # of the model copies the hook, not the recorder

        self._layer_handles.append(self.model.register_forward_pre_hook(root_hook))
        for layer in self._layers:
            t = layer.target
            self._layer_handles.extend(
                t.rule.install(t.module, self._forward_callback(layer)))
        self._armed_always = always

    def _disarm(self) -> None:
        if not self._armed_always:
            self._remove(self._layer_handles)

    def _on_model_forward(self, module: nn.Module, args: tuple) -> None:
        callbacks.on_model_forward(self, args)

    def _mark_batch(self) -> None:
        """An integration says a micro-batch starts (Lightning's ``on_train_batch_start``):
        for training steps that call submodules rather than the recorded model itself, whose
        root pre-hook then never fires. A model forward right after the mark belongs to it."""
        if self.recording and not self._suspended:
            callbacks.new_micro(self, marked=True)

    def _forward_callback(self, layer: LayerState) -> Callable[[tuple, dict, Any], None]:
        return callbacks.forward_callback(self, layer)

    def _capture(self, layer: LayerState, micro: int, args: tuple, kwargs: dict,
                 grad_out: Tensor, eps: float) -> None:
        callbacks.capture(self, layer, micro, args, kwargs, grad_out, eps)

    # ------------------------------------------------------------------ user calls
    def log(
        self,
        *,
        loss: Tensor | float | None = None,
        indices: Tensor | np.ndarray | Sequence[int] | None = None,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
        batch_size: int | None = None,
    ) -> None:
        """Attach information to the current micro-batch (call after its ``backward()`` and
        before ``optimizer.step()``; with gradient accumulation, once per micro-batch).

        Parameters
        ----------
        loss : the micro-batch's mean loss (a scalar); the step's loss is the mean of those
            logged.
        indices : dataset indices of the micro-batch's samples, in batch order (1-D integers).
        inputs, targets : the micro-batch; used only by the first step's self-check with
            ``loss_fn``.
        batch_size : samples in the micro-batch, when neither indices nor per-sample
            recording tell it (``per_sample=False``).

        Raises
        ------
        TypeError, ValueError
            An argument of the wrong kind (named in the message); nothing is recorded from it.
        """
        _check_loss_type(loss)
        _check_indices_type(indices)
        if batch_size is not None:
            int_option("batch_size", batch_size, 1)
        if (inputs is None) != (targets is None):
            raise ValueError("log(): pass inputs and targets together (or neither)")
        if not self._active:
            raise RecorderError(
                "Recorder.log() outside the recorder's `with` block: nothing is recorded there. "
                "Train inside `with trajlab.Recorder(model, store, optimizer=opt) as rec:` (or "
                "call rec.__enter__() first and rec.close() at the end)")
        if not self.recording:
            return  # no .item() or device-to-host copy on unrecorded steps
        keep = not self._checked  # the inputs, for the first step's self-check
        self._state.attach(loss=log_checks.loss_value(loss), batch_size=batch_size,
                           indices=log_checks.indices_value(
                               indices, dataset_size=self.options.dataset_size, step=self._step),
                           inputs=inputs if keep else None, targets=targets if keep else None)

    # ------------------------------------------------------------------ steps
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._dist is not None:
            _ddp.before_step(self)  # the ranks' captures joined on rank 0, its verdict on all
            return
        self._before_step_local()

    def _before_step_local(self) -> None:
        if self._resume_check is not None:
            self._check_continuity()
        if self.recording:
            stepping.before(self)  # assemble the step (see trajlab.record.stepping)

    def _check_continuity(self) -> None:
        stepping.check_continuity(self)

    def _drop_broadcast(self) -> None:
        stepping.drop_broadcast(self)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            if (self.recording and self._layers[0].weight_before is not None
                    and self._stopped_reason is None):
                stepping.after(self)  # emit the step's rows (see trajlab.record.stepping)
        finally:
            self._reset_step()
            self._step += 1
            if self._active and self.recording:
                self._arm()
            elif not self.recording:
                self._disarm()

    def _reset_step(self) -> None:
        for layer in self._layers:
            layer.captures = []
            layer.basis = None
            layer.weight_before = None
            layer.failed = None
            layer.assembled = None
        self._state = StepState()

    # ------------------------------------------------------------------ failures
    def _stop(self, err: BaseException, *, where: str) -> None:
        """Stop recording (training goes on) or raise, per ``on_error``."""
        stopping.stop(self, err, where=where)


__all__ = ["Recorder", "RecorderError", "SelfCheckError", "supported_types"]
