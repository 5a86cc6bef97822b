"""The Recorder: hooks on a model and its optimizer that stream a training run into a run store.

Between recorded steps the recorder costs one Python call per optimizer step (the step hook
that counts steps). Just before a recorded step it installs its per-layer hooks and a root
forward pre-hook, and removes them when that step's ``optimizer.step()`` returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from trajlab.errors import RecorderError, SelfCheckError, user_stacklevel
from trajlab.record import (
    assembly,
    capture,
    checks,
    disk_space,
    emission,
    failures,
    log_checks,
    optimizer_hooks,
    resume,
    store_policy,
)
from trajlab.record import ddp as _ddp
from trajlab.record.basis import SubspaceTracker
from trajlab.record.batchnorm import batchnorm_row
from trajlab.record.layer_state import LayerState, plan_layers
from trajlab.record.log_checks import _check_indices_type, _check_loss_type
from trajlab.record.options import PS_DTYPES, RecorderOptions, int_option
from trajlab.record.process_writer import ProcessWriter, make_writer
from trajlab.record.rules import supported_types
from trajlab.record.session import Session
from trajlab.record.staging import PendingRecord, stage
from trajlab.record.step import Micro
from trajlab.record.summary import mixing_layers, mixing_message
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
        self._ddp_stopped = False  # every rank agreed to stop recording (see _before_step_ddp)
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
        self._micro: list[Micro] = []
        self._probe_grads: dict[str, Tensor] | None = None
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
            self._check_disk(self._step - 1)  # a run shorter than the writer's first commit
        self._emit_nonfinite_warning()
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
        if not (self.recording and torch.is_grad_enabled()):
            return
        if any(isinstance(a, Tensor) and capture.transformed(a) for a in args):
            return  # a torch.func transform of the user's own, not a training forward
        self._new_micro(marked=False)

    def _mark_batch(self) -> None:
        """An integration says a micro-batch starts (Lightning's ``on_train_batch_start``):
        for training steps that call submodules rather than the recorded model itself, whose
        root pre-hook then never fires. A model forward right after the mark belongs to it."""
        if self.recording and not self._suspended:
            self._new_micro(marked=True)

    def _new_micro(self, *, marked: bool) -> None:
        last = self._micro[-1] if self._micro else None
        if not marked and last is not None and last.marked_only:
            micro = last  # the forward of the batch an integration marked
            micro.marked_only = False
        else:
            micro = Micro(marked_only=marked)
            self._micro.append(micro)
        if not self._checked and self.options.self_check and self.options.loss_fn is not None:
            micro.rng = checks.rng_state()
        micro.autocast = checks.autocast_state(self._device_types)
        if self.options.per_sample:
            mixing = mixing_layers(self.model)
            if mixing and "mixing" not in self._warned:
                self._warned.add("mixing")
                self._stop(RecorderError(mixing_message(mixing)), where="step")

    def _forward_callback(self, layer: LayerState) -> Callable[[tuple, dict, Any], None]:
        def on_forward(args: tuple, kwargs: dict, output: Any) -> None:
            if (not self.recording or self._suspended or not torch.is_grad_enabled()
                    or layer.dropped):
                return
            if not self.options.per_sample:
                return
            out = layer.target.rule.grad_output(output)
            if out is None or not out.requires_grad or capture.transformed(out):
                return
            micro = max(0, len(self._micro) - 1)
            axis = layer.target.sample_axis if layer.target.rule.positionwise else 0
            if axis and args and isinstance(args[0], Tensor):
                args = (args[0].movedim(axis, 0), *args[1:])  # samples first for the rule
            try:
                if layer.meta is None:  # described on its first input
                    o = self.options
                    capture.describe(layer, args, kwargs, per_sample=o.per_sample,
                                     tracker=self._tracker, store_grad=o.store_grad,
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
                self._capture(layer, micro, args, kwargs, grad_out, eps)

            out.register_hook(on_grad)

        return on_forward

    def _capture(self, layer: LayerState, micro: int, args: tuple, kwargs: dict,
                 grad_out: Tensor, eps: float) -> None:
        if self._suspended or not self._active:
            return
        t = layer.target
        try:
            self._suspended = True  # a rule may re-run forwards (attention, torch.func)
            try:
                ps = t.rule.per_sample(t.module, t.matrix, args, kwargs, grad_out.detach())
            finally:
                self._suspended = False
            capture.record(layer, ps, args, micro=micro, eps=eps,
                           forwards_seen=len(self._micro), tracker=self._tracker,
                           want_per_sample=self.options.self_check and not self._checked)
        except Exception as e:  # noqa: BLE001 - never raise inside the user's backward
            layer.failed = e

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
        loss_v = log_checks.loss_value(loss)
        idx = log_checks.indices_value(indices, dataset_size=self.options.dataset_size,
                                       step=self._step)
        if not self._micro:
            self._micro.append(Micro())
        m = self._micro[-1]
        if loss_v is not None:
            m.loss = loss_v
        if idx is not None:
            m.indices = idx
        if batch_size is not None:
            m.batch = int(batch_size)
        if inputs is not None and not self._checked:
            m.inputs, m.targets = inputs, targets

    # ------------------------------------------------------------------ steps
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._dist is not None:
            _ddp.before_step(self)  # the ranks' captures joined on rank 0, its verdict on all
            return
        self._before_step_local()

    def _before_step_local(self) -> None:
        if self._resume_check is not None:
            self._check_continuity()
        if not self.recording:
            return
        if optimizer_hooks.count_params(self.optimizer) != self._n_params:  # recorded steps only
            self._param_groups_changed()
        self._raise_if_writer_failed()
        if self._stopped_reason is not None:
            return
        try:
            self._assemble_step()
        except SelfCheckError:
            self._reset_step()
            raise
        except RecorderError as e:
            self._reset_step()
            if not self._checked or self._n_recorded == 0:
                raise
            self._stop(e, where="step")

    def _check_continuity(self) -> None:
        expected, self._resume_check = self._resume_check, None
        for layer in self._layers:
            msg = store_policy.continuity(layer.name, expected[layer.name], layer.weight(),
                                          last_step=self._step - 1)
            if msg:
                warnings.warn(f"trajlab: {msg}", RuntimeWarning, stacklevel=user_stacklevel())
                break

    def _assemble_step(self) -> None:
        """Turn this step's captures into one record per layer (see
        :mod:`trajlab.record.assembly` and :mod:`trajlab.record.step`)."""
        assembly.check_dtype(self._run_meta, self._layers)
        if self.options.per_sample and self._n_recorded == 0 and self._run_meta is None:
            self._drop_broadcast()
        first_micro = None
        self._batchnorm_before = batchnorm_row(self.model)  # as the weights: before the update
        for layer in self._layers:
            layer.weight_before = layer.weight().detach().clone()
            if not self.options.per_sample:
                if layer.meta is None:
                    capture.describe_weights_only(layer)
                continue
            grad = assembly.gradient(layer, step=self._step)
            if layer.failed or not layer.captures or grad is None:
                self._flag_failed(layer, grad)
                continue
            asm = assembly.assemble_layer(layer, grad, step=self._step, first=first_micro,
                                          checked=self._checked)
            if first_micro is None:
                first_micro = asm.first_micro
            layer.captures = []
            layer.assembled = asm
        if not self._checked:
            if self.options.self_check and self.options.per_sample:
                assembly.first_step_checks(self._layers, self._micro, self.model,
                                           loss_fn=self.options.loss_fn, isolated=self._isolated)
            self._checked = True
        self._probe_grads = self._probe_gradients()

    def _drop_broadcast(self) -> None:
        """First step of a new store: leave out layers broadcast over the batch (see
        :func:`trajlab.record.assembly.broadcast_layers`)."""
        self._layers = assembly.drop_broadcast(self._layers, self._summary,
                                               explicit=self._explicit_layers)

    def _flag_failed(self, layer: LayerState, grad: Tensor | None) -> None:
        """A layer whose capture failed numerically (NaN weights, an SVD that did not
        converge): its row is flagged non-finite, training goes on."""
        why = assembly.failure(layer, grad, checked=self._checked)
        layer.assembled = None
        self._nonfinite_seen.append((self._step, layer.name))
        self._warned.warn(f"failed:{layer.name}",
                          failures.layer_failed_message(layer.name, self._step, why))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            if (self.recording and self._layers[0].weight_before is not None
                    and self._stopped_reason is None):
                try:
                    self._emit_step()
                except RecorderError as e:
                    if self._n_recorded == 0:
                        raise  # a set-up problem: fail fast, nothing was recorded
                    self._stop(e, where="step")
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
        self._micro = []
        self._probe_grads = None

    @torch.no_grad()
    def _emit_step(self) -> None:
        """Hand the step's rows to the writer (see :mod:`trajlab.record.emission`)."""
        assert self._writer is not None
        o = self.options
        layers, batch, micro_batches = emission.layer_rows(
            self._layers, lr_of=self._lrs, per_sample=o.per_sample,
            ps_dtype=PS_DTYPES.get(o.per_sample_dtype or ""), probe_grads=self._probe_grads)
        micros = [self._micro[i] for i in micro_batches if i < len(self._micro)] or self._micro
        if batch is None:
            batch = emission.logged_batch(micros)
        if self._n_recorded == 0 and self._run_meta is None:
            self._run_meta = emission.run_meta(
                self._layers, options=o, every=self.every, metadata=self.metadata,
                optimizer=self.optimizer, summary=self._summary, batch_size=max(1, batch))
            self._writer.create(self._run_meta, max(1, batch))
        elif self._n_recorded == 0:
            store_policy.check_append(self._run_meta, [lay.meta for lay in self._layers],
                                      dtype=self._run_meta.dtype, every=self.every,
                                      probe=o.probe is not None)
        root = emission.root_row(
            step=self._step, lr=layers[self._layers[0].name]["lr"], batch=batch,
            micros=micros, probe=self._probe_grads is not None,
            extra=self._batchnorm_before, warn=self._warn_once)
        self._writer.put(self._to_host(root, layers))
        self._n_recorded += 1
        if not self._disk.done:
            self._check_disk(self._step)

    def _to_host(self, root: dict[str, Any], layers: dict[str, dict[str, Any]]) -> PendingRecord:
        """Start the record's device-to-host copies (see :mod:`trajlab.record.staging`)."""
        return stage(root, layers,
                     widen_bfloat16=self._layers[0].target.param.dtype == torch.bfloat16)

    def _probe_gradients(self) -> dict[str, Tensor] | None:
        if self.options.probe is None or self._step % self.options.probe.every != 0:
            return None
        params = [layer.target.param for layer in self._layers]
        with self._isolated(), torch.enable_grad():
            grads = self.options.probe.gradient(self.model, params)
        out = {}
        for layer, g in zip(self._layers, grads):
            t = layer.target
            out[layer.name] = t.rule.matrix_of(t.module, t.matrix, g).detach()
        return out

    @contextlib.contextmanager
    def _isolated(self):
        """Run extra forward passes without side effects on training: hooks off, RNG and
        buffers (e.g. BatchNorm statistics) restored afterwards."""
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        devices = [p.device for p in self.model.parameters() if p.device.type == "cuda"]
        self._suspended = True
        try:
            with torch.random.fork_rng(devices=list({d.index or 0 for d in devices})):
                yield
        finally:
            self._suspended = False
            live = dict(self.model.named_buffers())
            for n, b in buffers.items():
                live[n].copy_(b)

    # ------------------------------------------------------------------ failures
    def _param_groups_changed(self) -> None:
        """The optimizer's parameters changed since the recorder was made (add_param_group, a
        group edited): those added are not recorded (layers are planned once); say so, once."""
        self._n_params = optimizer_hooks.count_params(self.optimizer)
        added = failures.added_params(self.optimizer,
                                      (id(layer.target.param) for layer in self._layers),
                                      self.model)
        if added:
            self._warned.warn("params_added", failures.added_message(added, self._step))

    def _check_disk(self, step: int) -> None:
        """Warn once when the rest of the run will not fit the target's free space."""
        try:
            short = self._disk.check(step=step, rows_put=self._n_recorded)
        except OSError:  # the disk cannot be measured: recording goes on unchecked
            self._disk.done = True
            return
        if short is not None:
            self._warn_once("disk", disk_space.message(
                short, where=show(self.store), steps=self.options.steps, every=self.every))

    def _warn_once(self, key: str, message: str) -> None:
        self._warned.warn(key, message)

    def _raise_if_writer_failed(self) -> None:
        w = self._writer
        if w is not None and w.error is not None and self._stopped_reason is None:
            self._stop(w.error, where="writer")
        self._emit_nonfinite_warning()

    def _stop(self, err: BaseException, *, where: str) -> None:
        """Stop recording (training goes on) or raise, per ``on_error``."""
        reason = f"{type(err).__name__}: {err}"
        self._stopped_reason = reason
        self._remove(self._layer_handles)
        if self._writer is None or self._writer.error is not None:
            # no live writer thread: mark it here (else the writer marks it when it closes)
            with contextlib.suppress(Exception):
                self._store_writer.set_truncated(reason)
        kept = failures.committed_steps(self.store, self.options.storage_options)
        if self.options.on_error == "raise":
            raise RecorderError(failures.stopped_error_message(self._step, reason, kept)) from err
        warnings.warn("trajlab: " + failures.stopped_message(show(self.store), self._step,
                                                             reason, kept),
                      RuntimeWarning, stacklevel=user_stacklevel())

    def _emit_nonfinite_warning(self) -> None:
        if self._nonfinite_seen:
            self._warned.warn("nonfinite", failures.nonfinite_message(*self._nonfinite_seen[0]))


__all__ = ["Recorder", "RecorderError", "SelfCheckError", "supported_types"]
