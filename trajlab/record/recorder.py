"""The Recorder: hooks on a model and its optimizer that stream a training run into a run store.

Between recorded steps the recorder costs one Python call per optimizer step (the step hook
that counts steps). Just before a recorded step it installs its per-layer hooks and a root
forward pre-hook, and removes them when that step's ``optimizer.step()`` returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from trajlab.errors import RecorderError, SelfCheckError, user_stacklevel
from trajlab.record import checks, disk_space, store_policy
from trajlab.record import ddp as _ddp
from trajlab.record.basis import SubspaceTracker
from trajlab.record.batchnorm import batchnorm_row
from trajlab.record.options import PS_DTYPES, RecorderOptions, int_option
from trajlab.record.process_writer import ProcessWriter, make_writer
from trajlab.record.rules import Patches, supported_types
from trajlab.record.staging import PendingRecord, stage
from trajlab.record.step import Assembled, Capture, Micro, assemble, interleaved, probes
from trajlab.record.summary import Target, mixing_layers, mixing_message, plan
from trajlab.record.writer import BackgroundWriter
from trajlab.sketches import SketchKind, sketch_kind
from trajlab.store.layout import layer_group_name
from trajlab.store.lock import StoreLock
from trajlab.store.metadata import LayerMeta
from trajlab.store.run_store import RunStoreWriter
from trajlab.store.target import StoreLike, show

if TYPE_CHECKING:
    from typing_extensions import Self


@dataclass
class _Layer:
    """One recorded matrix and its state during the current recorded step."""

    target: Target
    meta: LayerMeta | None = None
    kind: SketchKind | None = None
    captures: list[Capture] = field(default_factory=list)
    basis: tuple[Tensor, Tensor, Tensor] | None = None
    weight_before: Tensor | None = None
    probe_r: Tensor | None = None
    failed: BaseException | None = None  # this step's capture failed (see _assemble_step)
    dropped: bool = False  # left out at the first step (broadcast over the batch), hooks silent

    @property
    def name(self) -> str:
        return self.target.name

    def weight(self) -> Tensor:
        return self.target.rule.weight_matrix(self.target.module, self.target.matrix)

    def grad(self) -> Tensor | None:
        return self.target.rule.grad_matrix(self.target.module, self.target.matrix)


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
        optimizer = _unwrap_optimizer(optimizer)  # accelerate's / Lightning's wrappers
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
        layers = opts.layers
        targets, self._summary = plan(self.model, optimizer, layers, batch_dim=opts.batch_dim)
        targets = _untie(self.model, targets, self._summary, explicit=layers is not None)
        self._layers = [_Layer(t) for t in targets]
        complex_ = [layer.name for layer in self._layers if layer.target.param.is_complex()]
        if complex_:  # σ1 of a complex matrix and its SDE are not what trajlab computes
            raise RecorderError(
                f"complex parameters are not supported (layers {', '.join(complex_[:4])}"
                f"{' and more' if len(complex_) > 4 else ''} are complex): trajlab records "
                "real weight matrices; pass layers=[...] naming the real ones, or record a "
                "real-valued model")
        self._mixing = [] if not self.options.per_sample else mixing_layers(self.model)
        if self._mixing:  # refused before any other notice about the model
            raise RecorderError(mixing_message(self._mixing))
        self._explicit_layers = layers is not None
        skipped = [m for m in self._summary["modules"] if not m["recorded"]
                   and m.get("why") != "not selected (layers=)"
                   and not m.get("why", "").startswith("its weight is tied")]  # warned above
        if skipped and layers is None:
            groups: dict[tuple[str, str], list[str]] = {}  # one line per (type, reason)
            for m in skipped:
                groups.setdefault((m["type"], m["why"]), []).append(m["name"] or "<model>")

            def names(ns: list[str]) -> str:
                return ", ".join(ns[:4]) + (f" and {len(ns) - 4} more" if len(ns) > 4 else "")

            warnings.warn(
                "trajlab: these modules with parameters are not recorded: "
                + "; ".join(f"{names(ns)} ({t}: {why})" for (t, why), ns in groups.items())
                + " (rec.summary and `trajlab info` list every module)", UserWarning,
                stacklevel=2)
        self._tracker = SubspaceTracker(opts.rank)
        self._step_handles: list[Any] = []
        self._layer_handles: list[Any] = []
        self._armed_always = False  # hooks stay installed (torch.compile)
        self._group_of: dict[int, int | None] = {}
        self._lock: StoreLock | None = None
        self._writer: BackgroundWriter | ProcessWriter | None = None
        self._store_writer: RunStoreWriter | None = None
        self._step = 0
        self._n_recorded = 0
        self._checked = False
        self._active = False
        self._suspended = False
        self._stopped_reason: str | None = None
        self._micro: list[Micro] = []
        self._probe_grads: dict[str, Tensor] | None = None
        self._nonfinite_seen: list[tuple[int, str]] = []
        self._warned: set[str] = set()
        self._n_params = _count_params(self.optimizer)  # what the optimizer steps at the start
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

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Self:
        if self._dist is not None:
            return self._enter_ddp()
        return self._enter()

    def _enter_ddp(self) -> Recorder:
        """DDP: rank 0 opens the store (lock, resume) and tells every rank the next step's
        index, or why it could not start, so that all ranks start or fail together."""
        d = self._dist
        if d.writes:
            try:
                self._enter()
            except BaseException as e:
                _ddp.broadcast(("error", f"{type(e).__name__}: {e}"), d)
                raise
            _ddp.broadcast(("ok", self._step), d)
            return self
        what, value = _ddp.broadcast(None, d)
        if what == "error":
            raise RecorderError(f"trajlab: rank 0 could not start recording: {value}")
        self._step = int(value)
        self._hook_optimizer()
        self._active = True
        if self.recording:
            self._arm()
        return self

    def _hook_optimizer(self) -> None:
        before, after = self._before_step, self._after_step
        wrap = self._wrap_closure

        def pre_hook(opt, args, kwargs):  # plain functions (see _arm)
            # args: (optimizer, closure?) as step() was called (the optimizer first)
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
            if callable(closure):  # forward and backward run inside step(closure)
                closure = wrap(closure)
                if "closure" in kwargs:
                    return args, {**kwargs, "closure": closure}
                return (args[0], closure, *args[2:]), kwargs
            before(opt, args, kwargs)
            return None

        def post_hook(opt, args, kwargs):
            after(opt, args, kwargs)

        self._step_handles.append(self.optimizer.register_step_pre_hook(pre_hook))
        self._step_handles.append(self.optimizer.register_step_post_hook(post_hook))

    def _enter(self) -> Recorder:
        self._lock = StoreLock(self.store, what="recorder")
        self._lock.acquire()
        try:
            self._store_writer = RunStoreWriter(self.store, mode=self.options.mode,
                                                storage_options=self.options.storage_options,
                                                codec_profile=self.options.compression)
            self._store_writer.fence = self._lock.fence()  # no writes once the lock is lost
            self._disk.rows_before = self._store_writer.committed
            self._prepare_resume()
            self._writer = make_writer(
                self.options.writer, self._store_writer, queue_size=self.options.queue_size,
                flush_seconds=self.options.flush_seconds,
                on_nonfinite=lambda s, n: self._nonfinite_seen.append((s, n)),
                on_tick=self._lock.refresh,
            )
            self._hook_optimizer()
        except BaseException:
            self._remove(self._step_handles)
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._lock.release()
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
        sw = self._store_writer
        last = sw.last_step
        if self.options.start_step is not None:
            if last is not None and self.options.start_step <= last:
                raise RecorderError(
                    f"start_step={self.options.start_step} but the store already holds steps up to "
                    f"{last}; resume with start_step > {last} or record into a new store"
                )
            self._step = self.options.start_step
        elif last is not None:
            self._step = last + 1
        if sw.is_created and sw.meta is not None:
            old = self._run_meta = sw.meta
            if old.every != self.every:
                raise RecorderError(
                    f"cannot append: the store was recorded with every={old.every}, this "
                    f"recorder has every={self.every} (the analysis's time step depends on it); "
                    "use the same every or record into a new store")
            dtype = store_policy.numpy_dtype(self._layers[0].target.param.dtype)
            if old.dtype != dtype:
                raise RecorderError(f"cannot append: the store holds {old.dtype} weights, the "
                                    f"model has {dtype}; record into a new store")
            stored = set(old.layer_names)
            broadcast = {e["name"]: e for e in (old.model or {}).get("modules", [])
                         if "broadcast over the batch" in str(e.get("why", ""))}
            left_out = [layer for layer in self._layers if layer.name not in stored
                        and layer.target.module_name in broadcast]
            if left_out:  # left out at the stored run's first step (see _drop_broadcast)
                for layer in left_out:
                    layer.dropped = True
                self._layers = [layer for layer in self._layers if not layer.dropped]
                for e in self._summary["modules"]:
                    if e["name"] in broadcast:
                        e.update(recorded=False, recorded_parameters=0,
                                 why=broadcast[e["name"]]["why"])
                        e.pop("how", None)
            missing = [layer.name for layer in self._layers if layer.name not in stored]
            if missing:
                raise RecorderError(f"cannot append: layers {missing} are not in the store "
                                    f"(it holds {sorted(stored)})")
            wrong = [f"{layer.name!r} is {tuple(layer.weight().shape)} in the model, "
                     f"{old.layer(layer.name).shape} in the store" for layer in self._layers
                     if tuple(layer.weight().shape) != old.layer(layer.name).shape]
            if wrong:
                raise RecorderError("cannot append: the model does not match the stored run: "
                                    + "; ".join(wrong) + ". Record into a new store instead")
            if last is not None and self._step == last + 1:
                self._resume_check = {}
                for layer in self._layers:
                    row = sw.last_row(layer.name, ("weight", "update"))
                    self._resume_check[layer.name] = row["weight"] + row["update"]

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
        if self._writer is not None:
            self._writer.close(truncated=self._stopped_reason)
            err = self._writer.error
            self._writer = None
            if err is not None and self._stopped_reason is None:
                self._stop(err, where="close")
        if self._lock is not None:
            self._lock.release()
        if not self._disk.done and self._n_recorded and self._stopped_reason is None:
            self._check_disk(self._step - 1)  # a run shorter than the writer's first commit
        self._emit_nonfinite_warning()
        follower = self._dist is not None and not self._dist.writes  # DDP: rank 0 writes
        if (self._n_recorded == 0 and self._stopped_reason is None and not follower
                and "empty" not in self._warned):
            self._warned.add("empty")
            if self._failure is not None:
                why = (f"the training loop raised {type(self._failure).__name__}: "
                       f"{self._failure}".strip())
            else:
                why = "optimizer.step() was not called while recording"
            warnings.warn(f"trajlab: no step was recorded ({why}); nothing was written to "
                          f"{show(self.store)}", RuntimeWarning,
                          stacklevel=user_stacklevel())

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
        if any(isinstance(a, Tensor) and _transformed(a) for a in args):
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
        micro.autocast = checks.autocast_state(  # type: ignore[attr-defined]
            self._device_types)
        if self.options.per_sample:
            mixing = mixing_layers(self.model)
            if mixing and "mixing" not in self._warned:
                self._warned.add("mixing")
                self._stop(RecorderError(mixing_message(mixing)), where="step")

    def _forward_callback(self, layer: _Layer) -> Callable[[tuple, dict, Any], None]:
        def on_forward(args: tuple, kwargs: dict, output: Any) -> None:
            if (not self.recording or self._suspended or not torch.is_grad_enabled()
                    or layer.dropped):
                return
            if not self.options.per_sample:
                return
            out = layer.target.rule.grad_output(output)
            if out is None or not out.requires_grad or _transformed(out):
                return
            micro = max(0, len(self._micro) - 1)
            axis = layer.target.sample_axis if layer.target.rule.positionwise else 0
            if axis and args and isinstance(args[0], Tensor):
                args = (args[0].movedim(axis, 0), *args[1:])  # samples first for the rule
            try:
                self._prepare_layer(layer, args, kwargs)
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

    def _prepare_layer(self, layer: _Layer, args: tuple, kwargs: dict) -> None:
        """Describe the layer on its first input."""
        t = layer.target
        if layer.meta is None:
            desc = t.rule.describe(t.module, t.matrix, args, kwargs)
            shape = tuple(layer.weight().shape)
            kind = sketch_kind(desc.sketch if self.options.per_sample else "none")
            rank = (self._tracker.rank_for(shape) if kind.name == "subspace"
                    else int(desc.rank) if kind.per_sample else 0)
            layer.kind = kind
            layer.meta = LayerMeta(
                name=layer.name, module=t.rule.module_type or type(t.module).__name__,
                group=layer_group_name(layer.name), sketch=kind.name,
                shape=(int(shape[0]), int(shape[1])), rank=rank, positions=desc.positions,
                geometry=desc.geometry,
                stored_grad=(not kind.implies_grad or self.options.store_grad
                             or not self.options.self_check),
                param=t.matrix.label,
            )

    def _capture(self, layer: _Layer, micro: int, args: tuple, kwargs: dict,
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
            want = self.options.self_check and not self._checked
            if layer.meta.sketch == "subspace" and layer.basis is None:
                # this step's basis, from the weight at the layer's first backward
                layer.basis = self._tracker.basis(layer.name, layer.weight().detach())
            basis = None if layer.basis is None else layer.basis[:2]
            if (layer.meta.sketch == "rank1" and isinstance(ps, Patches)
                    and ps.act.shape[-1] != 1):
                raise RecorderError(
                    f"layer {layer.name!r} was recorded with (batch, features) inputs but "
                    f"now sees {tuple(args[0].shape)}; its input shape must not change "
                    "between steps (record such a run into a new store)")
            tensors, dense = ps.capture(layer.kind, basis=basis, rank=layer.meta.rank,
                                        want_per_sample=want)
            layer.captures.append(Capture(micro, ps.batch, tensors, dense, eps,
                                          forwards_seen=len(self._micro)))
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
        loss_v = _check_loss(loss)
        idx = _check_indices(indices)
        n = self.options.dataset_size
        if idx is not None and n is not None and idx.numel() and (
                int(idx.max()) >= n or int(idx.min()) < 0):
            raise ValueError(
                f"log(indices=...) at step {self._step}: indices {int(idx.min())}.."
                f"{int(idx.max())} but dataset_size={n} (indices are positions "
                "in the dataset, 0..dataset_size-1); pass the dataset's size as dataset_size "
                "(the analysis's finite-population factor depends on it)")
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
    def _wrap_closure(self, closure: Callable[..., Any]) -> Callable[..., Any]:
        """``optimizer.step(closure)`` (Lightning's automatic optimisation, LBFGS): the forward
        and backward run inside ``step``, after its pre-hook. The step is assembled when the
        closure first returns (gradient clipping inside the closure included), before the
        optimizer reads ``.grad``; later evaluations of the closure (LBFGS) are not recorded."""
        before, optimizer = self._before_step, self.optimizer
        done = False

        def closure_then_assemble(*args: Any, **kwargs: Any) -> Any:
            nonlocal done
            loss = closure(*args, **kwargs)
            if not done:
                done = True
                before(optimizer, (), {})
            return loss

        return closure_then_assemble

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._dist is not None:
            self._before_step_ddp()
            return
        self._before_step_local()

    def _before_step_ddp(self) -> None:
        """DDP, at a recorded step (every rank): the captures go to rank 0, which joins them
        (rank order), assembles and checks the step as one batch; its verdict reaches every
        rank, so all record, stop or raise together (trajlab.record.ddp)."""
        d = self._dist
        if (not self._active or self._suspended or self._ddp_stopped
                or self._step % self.every != 0):
            return
        if self._resume_check is not None:
            self._check_continuity()
        gathered = _ddp.gather(_ddp.payload(self._layers, self._micro, self._stopped_reason), d)
        verdict, error = None, None
        if d.writes:
            try:
                if self.options.per_sample and self._n_recorded == 0 and self._run_meta is None:
                    self._drop_broadcast()  # on this rank's own batch sizes, before joining
                stopped = _ddp.merge(self._layers, self._micro, gathered)
                if stopped is not None and self._stopped_reason is None:
                    self._stop(RecorderError(f"recording stopped on {stopped}"), where="step")
                self._before_step_local()
            except BaseException as e:  # noqa: BLE001 - re-raised below, on every rank
                error = e
                verdict = ("SelfCheckError" if isinstance(e, SelfCheckError) else
                           "RecorderError", f"{type(e).__name__}: {e}")
            if verdict is None and self._stopped_reason is not None:
                verdict = ("stop", self._stopped_reason)
        verdict, kept = _ddp.broadcast((verdict, self.layer_names if d.writes else None), d)
        if verdict is not None and verdict[0] == "stop":
            self._ddp_stopped = True
        if d.writes:
            if error is not None:
                raise error
            return
        if kept != self.layer_names:  # rank 0 left layers out (broadcast over the batch)
            for layer in self._layers:
                layer.dropped = layer.name not in kept
            self._layers = [layer for layer in self._layers if not layer.dropped]
        self._reset_step()  # this rank's captures are on rank 0 now
        if verdict is None:
            return
        kind, msg = verdict
        if kind == "stop":
            self._stopped_reason = f"rank 0 stopped recording: {msg}"
            self._remove(self._layer_handles)
            return
        cls = SelfCheckError if kind == "SelfCheckError" else RecorderError
        raise cls(f"trajlab (rank 0): {msg}")

    def _before_step_local(self) -> None:
        if self._resume_check is not None:
            self._check_continuity()
        if not self.recording:
            return
        if _count_params(self.optimizer) != self._n_params:  # at recorded steps only
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
        """Turn this step's captures into one record per layer (see trajlab.record.step)."""
        dtype = store_policy.numpy_dtype(self._layers[0].target.param.dtype)
        meta = self._run_meta
        if meta is not None and meta.dtype != dtype:
            raise RecorderError(f"the model's weights are now {dtype} but the run stores "
                                f"{meta.dtype}: changing the model's dtype mid-run is not "
                                "supported; record the rest into a new store")
        if self.options.per_sample and self._n_recorded == 0 and self._run_meta is None:
            self._drop_broadcast()
        first_micro = None
        self._batchnorm_before = batchnorm_row(self.model)  # as the weights: before the update
        for layer in self._layers:
            layer.weight_before = layer.weight().detach().clone()
            if not self.options.per_sample:
                if layer.meta is None:
                    self._describe_weights_only(layer)
                continue
            if layer.meta is None:
                raise RecorderError(
                    f"layer {layer.name!r} saw no forward pass with gradients at step "
                    f"{self._step}: it was not used in the forward pass, or backward ran under "
                    "no_grad, or the model is run through torch.compile but an uncompiled "
                    "module was given to Recorder (pass the compiled one). Record only layers "
                    "used every step (layers=[...])")
            grad = layer.grad()
            if isinstance(layer.failed, RecorderError):
                raise layer.failed  # a loop the recorder cannot record (not numerical)
            if layer.failed or not layer.captures or grad is None:
                self._flag_failed(layer, grad)
                continue
            if layer.probe_r is None:
                layer.probe_r = probes(layer.meta.shape[1], grad.dtype, grad.device)
            try:
                asm = assemble(layer.kind, layer.captures, grad.detach(), layer.meta.positions,
                               layer.probe_r, first=first_micro)
            except ValueError as e:
                raise SelfCheckError(
                    f"layer {layer.name!r} was {e} (shared weights, e.g. a layer reused in a "
                    "loop): its per-sample gradients are not recorded exactly; pass "
                    "layers=[...] without it, or per_sample=False") from None
            if interleaved(layer.captures, asm.micro_batches):
                raise SelfCheckError(
                    f"layer {layer.name!r}: the model was called {len(asm.micro_batches)} times "
                    "before one shared backward (the model applied to its own output, or the "
                    "losses of several forwards summed before backward()), so the samples of "
                    "those calls are not distinct and their per-sample gradients cannot be told "
                    "apart. Call backward() once per forward (gradient accumulation), or record "
                    "with per_sample=False")
            if first_micro is None:
                first_micro = asm.first_micro
            # .grad is checked for NaN/Inf only when the check fails: isfinite(...).all() of a
            # 400k-element gradient costs ~3 ms on one CPU thread, more than a small step.
            if not asm.residual <= asm.tol and bool(torch.isfinite(grad).all()):
                msg = checks.unexplained_grad(layer.name, self._step, asm.residual, asm.tol,
                                              asm.scale)
                raise (SelfCheckError(msg) if not self._checked else RecorderError(msg))
            layer.captures = []
            layer.assembled = asm  # type: ignore[attr-defined]
        if not self._checked:
            if self.options.self_check and self.options.per_sample:
                self._first_step_checks()
            self._checked = True
        self._probe_grads = self._probe_gradients()

    def _drop_broadcast(self) -> None:
        """First step of a new store: leave out (with a warning) layers whose input has batch
        size 1 while the model's batch has more samples. Their output is broadcast over the
        batch (GPT-2's positional embedding ``wpe``, indexed with shape (1, T)), so the
        gradient reaching it is already summed over the samples: per-sample gradients cannot
        be separated. Selected explicitly with ``layers=``, such a layer is an error."""
        seen: dict[str, dict[int, int]] = {}
        full: dict[int, int] = {}
        for layer in self._layers:
            if layer.captures and layer.failed is None:
                seen[layer.name] = {c.micro: c.batch for c in layer.captures}
                for m, b in seen[layer.name].items():
                    full[m] = max(full.get(m, 0), b)
        bad = [layer for layer in self._layers if layer.name in seen and all(
            b == 1 and full[m] > 1 for m, b in seen[layer.name].items())]
        if not bad:
            return
        B = max(full.values())
        names = ", ".join(repr(layer.name) for layer in bad)
        why = (f"its input has batch size 1 while the model's batch has {B} samples: it is "
               "broadcast over the batch (e.g. positional embeddings indexed with shape "
               "(1, T)), so the gradient reaching it is already summed over the samples and its "
               "per-sample gradients cannot be separated")
        fix = ("index it per sample (e.g. pass position_ids of shape (B, T)) to record it, or "
               "record with per_sample=False")
        if self._explicit_layers or len(bad) == len(self._layers):
            raise SelfCheckError(f"layer(s) {names}: {why}. Leave it out of layers=[...], or "
                                 f"{fix}")
        for layer in bad:
            layer.dropped = True
            layer.captures = []
        self._layers = [layer for layer in self._layers if not layer.dropped]
        modules = {layer.target.module_name for layer in bad}
        for e in self._summary["modules"]:
            if e["name"] in modules and not any(layer.target.module_name == e["name"]
                                                for layer in self._layers):
                e.update(recorded=False, recorded_parameters=0, why=why)
                e.pop("how", None)
        warnings.warn(f"trajlab: layer(s) {names} not recorded: {why}. The other layers are "
                      f"recorded; {fix}", RuntimeWarning, stacklevel=user_stacklevel())

    def _describe_weights_only(self, layer: _Layer) -> None:
        shape = tuple(layer.weight().shape)
        t = layer.target
        layer.kind = sketch_kind("none")
        layer.meta = LayerMeta(name=layer.name, module=t.rule.module_type or
                               type(t.module).__name__, group=layer_group_name(layer.name),
                               sketch="none", shape=(int(shape[0]), int(shape[1])),
                               stored_grad=True, param=t.matrix.label)

    def _flag_failed(self, layer: _Layer, grad: Tensor | None) -> None:
        """A layer whose capture failed numerically (NaN weights, an SVD that did not
        converge): its row is flagged non-finite, training goes on."""
        why = (f"{type(layer.failed).__name__}: {layer.failed}" if layer.failed else
               "no .grad at optimizer.step()" if grad is None
               else "no backward pass reached it this step")
        if not self._checked and grad is None and not layer.failed:
            raise RecorderError(f"layer {layer.name!r} has no .grad at optimizer.step(): was "
                                "backward called, and is the layer trained?")
        layer.assembled = None  # type: ignore[attr-defined]
        self._nonfinite_seen.append((self._step, layer.name))
        key = f"failed:{layer.name}"
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"trajlab: layer {layer.name!r} at step {self._step}: {why}; the row "
                          "is recorded with NaN per-sample information and flagged "
                          "('nonfinite'), recording continues", RuntimeWarning,
                          stacklevel=user_stacklevel())

    def _first_step_checks(self) -> None:
        for layer in self._layers:
            asm: Assembled | None = getattr(layer, "assembled", None)
            if asm is None:
                continue
            mean = layer.kind.mean_gradient(asm.tensors)
            grad = layer.grad()
            if mean is not None and grad is not None:
                checks.check_mean(layer.name, mean, grad.detach(), asm.tol)
        if self.options.loss_fn is None:
            return
        asm0 = next((getattr(layer, "assembled", None) for layer in self._layers), None)
        if asm0 is None:
            return
        micro = self._micro[asm0.first_micro] if asm0.first_micro < len(self._micro) else None
        if micro is None or micro.inputs is None:
            return
        entries = []
        for layer in self._layers:
            asm = getattr(layer, "assembled", None)
            if asm is None:
                entries.append((layer.name, None, 1.0))
                continue
            g0 = layer.kind.sample_gradient(asm.tensors, 0)
            if g0 is None and asm.per_sample is not None:
                g0 = asm.per_sample[0]
            entries.append((layer.name, g0, asm.scale))
        tol = max(layer.assembled.tol for layer in self._layers
                  if getattr(layer, "assembled", None) is not None)
        micro_batches = len(asm0.micro_batches)

        def recompute() -> list[Tensor | None]:
            params = [layer.target.param for layer in self._layers]
            with self._isolated(), torch.enable_grad(), checks.replayed(
                    micro.rng, getattr(micro, "autocast", None)):
                out = checks.call_model(self.model, micro.inputs)
                B = checks.batch_of(micro.inputs)
                loss = checks.sample_loss(self.options.loss_fn, out, micro.targets, B)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            res = []
            for layer, g in zip(self._layers, grads):
                if g is None:
                    res.append(None)
                    continue
                t = layer.target
                res.append(t.rule.matrix_of(t.module, t.matrix, g))
            return res

        checks.check_one_sample(entries, recompute, tol=max(tol, 1e4 * checks.eps_of(
            self._layers[0].target.param.dtype)), n=asm0.n, micro_batches=micro_batches)

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
            layer.assembled = None  # type: ignore[attr-defined]
        self._micro = []
        self._probe_grads = None

    def _lr_of(self, param: Tensor) -> float:
        groups = self.optimizer.param_groups
        index = self._group_of.get(id(param))
        if index is None or index >= len(groups) or not any(
                p is param for p in groups[index]["params"]):
            index = next((i for i, g in enumerate(groups)
                          if any(p is param for p in g["params"])), None)
            self._group_of[id(param)] = index
        if index is not None:
            lr = groups[index].get("lr", float("nan"))
            return float(lr.item() if isinstance(lr, Tensor) else lr)
        raise RecorderError(
            "a recorded layer's weight is not among the optimizer's parameters; pass the "
            "optimizer that trains this model"
        )

    @torch.no_grad()
    def _emit_step(self) -> None:
        assert self._writer is not None
        ps_dtype = PS_DTYPES.get(self.options.per_sample_dtype or "")
        layers: dict[str, dict[str, Any]] = {}
        batch = None
        micro_batches: list[int] = []
        for layer in self._layers:
            asm: Assembled | None = getattr(layer, "assembled", None)
            Wnow = layer.weight().detach()
            W = layer.weight_before
            out: dict[str, Any] = {
                "lr": self._lr_of(layer.target.param),
                "weight": W,
                "weight_after": Wnow.clone(),  # the writer derives the update
                "grad_scale": float(asm.scale) if asm is not None else float("nan"),
            }
            if layer.meta.stored_grad:
                grad = layer.grad()
                out["grad"] = (torch.full_like(W, float("nan")) if grad is None
                               else grad.detach().clone())
            if self.options.per_sample:
                if asm is None:  # the capture failed (warned): its row holds NaN, flagged
                    out["nonfinite"] = True
                else:
                    b = asm.n
                    if batch is not None and b != batch:
                        hint = (" (a layer whose input has batch size 1 is broadcast over the "
                                "batch, e.g. positional embeddings indexed with shape (1, T): "
                                "leave it out with layers=[...])" if min(b, batch) == 1 else "")
                        raise RecorderError(
                            f"layer {layer.name!r} saw {b} samples this step, other layers "
                            f"{batch}; all recorded layers must see the same batch{hint}")
                    batch = b
                    micro_batches = asm.micro_batches
                    for k, per in layer.kind.variables(layer.meta.rank).items():
                        if k in asm.tensors:
                            v = asm.tensors[k]
                            if per.dtype == "ps" and ps_dtype is not None:
                                v = v.to(ps_dtype)
                            elif per.dtype in ("ps", "param") and v.dtype == torch.bfloat16:
                                v = v.float()
                            out[k] = v
                if layer.meta.sketch == "subspace" and layer.basis is not None:
                    U, V, residual = layer.basis
                    out["basis_u"], out["basis_v"] = U, V
                    out["basis_residual"] = float(residual)
            if self._probe_grads is not None:
                out["probe_grad"] = self._probe_grads[layer.name]
            layers[layer.name] = out
        micros = [self._micro[i] for i in micro_batches if i < len(self._micro)] or self._micro
        if batch is None:
            sizes = [m.batch or (m.indices.numel() if m.indices is not None else 0)
                     for m in micros]
            batch = int(sum(sizes))
        if self._n_recorded == 0 and self._run_meta is None:
            self._create_store(max(1, batch))
        elif self._n_recorded == 0:
            store_policy.check_append(self._run_meta, [lay.meta for lay in self._layers],
                                      dtype=self._run_meta.dtype, every=self.every,
                                      probe=self.options.probe is not None)
        indices = None
        if micros and all(m.indices is not None for m in micros):
            indices = torch.cat([m.indices for m in micros])
            if indices.numel() != batch:
                self._warn_once("indices", f"log(indices=...) got {indices.numel()} indices for "
                                f"a batch of {batch} samples at step {self._step}; indices not "
                                "recorded at this step")
                indices = None
        losses = [m.loss for m in micros if m.loss is not None]
        root = {
            "step": np.int64(self._step),
            "lr": np.float64(layers[self._layers[0].name]["lr"]),
            "batch_size": np.int32(batch),
            "loss": math.fsum(losses) / len(losses) if losses else float("nan"),
            "indices": indices,
            "probe": np.bool_(self._probe_grads is not None),
            **self._batchnorm_before,  # BatchNorm's gamma, running_var (record/batchnorm.py)
        }
        self._writer.put(self._to_host(root, layers))
        self._n_recorded += 1
        if not self._disk.done:
            self._check_disk(self._step)

    def _create_store(self, batch_size: int) -> None:
        metas = [layer.meta for layer in self._layers]
        param_dtype = self._layers[0].target.param.dtype
        dtype = store_policy.numpy_dtype(param_dtype)
        ps_dtype = self.options.per_sample_dtype or dtype
        chunk = self.options.chunk_steps or store_policy.chunk_steps(
            metas, batch_size, np.dtype(dtype).itemsize)
        # -- issue 23: the optimizer's SDE parameters for the analysis (optimizer_state.py)
        from trajlab.record.optimizer_state import with_optimizer_spec

        user = with_optimizer_spec(self.metadata, self.optimizer,
                                   [layer.target.param for layer in self._layers])
        # -- end issue 23
        meta = store_policy.new_meta(
            metas=metas, dtype=dtype, ps_dtype=ps_dtype, every=self.every, chunk=chunk,
            sampler=self.options.sampler, dataset_size=self.options.dataset_size, user=user,
            probe=self.options.probe is not None, model=self._summary)
        self._run_meta = meta
        self._writer.create(meta, batch_size)

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
        self._n_params = _count_params(self.optimizer)
        known = {id(layer.target.param) for layer in self._layers}
        names = {id(p): n for n, p in self.model.named_parameters()}
        added = [names.get(id(p), f"<a {tuple(p.shape)} tensor outside the model>")
                 for g in self.optimizer.param_groups for p in g["params"]
                 if id(p) not in known and p.dim() >= 2]
        if added:
            self._warn_once(
                "params_added",
                f"parameters added to the optimizer by step {self._step} are not recorded: "
                f"{', '.join(added[:4])}{f' and {len(added) - 4} more' if len(added) > 4 else ''}"
                ". The recorder plans its layers when it is created; to record them, close it "
                "and start a new Recorder into a new store (a store's layers are fixed)")

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
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"trajlab: {message}", RuntimeWarning,
                          stacklevel=user_stacklevel())

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
        kept = _committed_steps(self.store, self.options.storage_options)
        if self.options.on_error == "raise":
            raise RecorderError(f"trajlab: recording stopped at step {self._step}: "
                                f"{reason}. {kept}") from err
        warnings.warn(
            f"trajlab: recording into {show(self.store)} stopped at step {self._step} ({reason}); "
            f"training continues. {kept}; the store is marked truncated.", RuntimeWarning,
            stacklevel=user_stacklevel())

    def _emit_nonfinite_warning(self) -> None:
        if self._nonfinite_seen and "nonfinite" not in self._warned:
            s, n = self._nonfinite_seen[0]
            self._warned.add("nonfinite")
            warnings.warn(
                f"trajlab: NaN or Inf in the gradient of layer {n!r} at step {s}; recorded and "
                "flagged (variable 'nonfinite'), recording continues", RuntimeWarning,
                stacklevel=user_stacklevel())


def _count_params(optimizer: torch.optim.Optimizer) -> int:
    """How many parameters the optimizer steps (cheap: one length per group)."""
    return sum(len(g["params"]) for g in optimizer.param_groups)


def _committed_steps(store: Any, storage_options: dict | None) -> str:
    """What a stopped recording kept, read from the store itself (the writer that committed
    may be another process, and rows may have been waiting when it failed)."""
    try:
        from trajlab.store.reader import open_run

        run = open_run(store, storage_options=storage_options)
        if run.n_steps == 0:
            return "No step was committed"
        first = int(run.rows.root_rows(["step"], (0, 1))["step"][0])
        last = int(run.rows.root_rows(["step"], (run.n_steps - 1, run.n_steps))["step"][0])
        return f"Steps {first} to {last} ({run.n_steps} recorded) are committed and kept"
    except Exception:  # noqa: BLE001 - the store may be unreadable (e.g. its disk is gone)
        return "Steps committed before are kept"


# ----------------------------------------------------------------------------- validation
def _transformed(t: Tensor) -> bool:
    """Whether ``t`` lives inside a torch.func transform (vmap/grad of the user's own): such
    forwards are not training steps and are left alone."""
    if torch.compiler.is_compiling():
        return False  # being traced by torch.compile: a training forward
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except (AttributeError, RuntimeError):  # pragma: no cover - other torch builds
        return False


def _untie(model: nn.Module, targets: list[Target], summary: dict[str, Any], *,
           explicit: bool) -> list[Target]:
    """Leave out weights tied to another module (GPT-2's ``wte``/``lm_head``), with a warning
    naming the tie: a tied weight's gradient is the sum of both uses' contributions, and each
    rule sees only its own module's use, so the captured per-sample gradients would not explain
    ``.grad`` (combining both uses is not implemented). The summary entries say why."""
    names: dict[int, list[str]] = {}
    owners: dict[int, set[int]] = {}  # distinct modules holding each Parameter (one module
    for mname, m in model.named_modules(remove_duplicate=False):  # reached twice is no tie)
        for pname, p in m._parameters.items():
            if p is not None and id(m) not in owners.setdefault(id(p), set()):
                owners[id(p)].add(id(m))
                names.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    tied = {t.name: names[id(t.param)] for t in targets if len(owners.get(id(t.param), ())) > 1}
    if not tied:
        return targets
    def why(uses: list[str]) -> str:
        return (f"its weight is tied: one Parameter used as {' and '.join(uses)}; per-sample "
                "gradients of a tied weight need both uses' contributions, which trajlab does "
                "not combine, so it is not recorded")
    if explicit:
        name, uses = next(iter(tied.items()))
        raise ValueError(f"layer {name!r} cannot be recorded: {why(uses)}; leave it out of "
                         "layers=[...] (or untie the weights)")
    keep = [t for t in targets if t.name not in tied]
    left_out = {t.module_name: tied[t.name] for t in targets if t.name in tied}
    for e in summary["modules"]:
        if e["name"] in left_out and not any(t.module_name == e["name"] for t in keep):
            e.update(recorded=False, recorded_parameters=0, why=why(left_out[e["name"]]))
            e.pop("how", None)
    if not keep:
        raise RecorderError("every recordable layer of this model has a tied weight ("
                            + "; ".join(f"{k}: {' = '.join(v)}" for k, v in tied.items())
                            + "); trajlab does not record tied weights yet")
    ties = sorted({" = ".join(v) for v in tied.values()})
    warnings.warn(f"trajlab: tied weights are not recorded: {'; '.join(ties)} (one Parameter "
                  "used by several modules: its gradient sums both uses, which the per-module "
                  "rules do not combine). The other layers are recorded; rec.summary says why",
                  UserWarning, stacklevel=3)
    return keep


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a wrapper that does not run torch's step hooks itself:
    accelerate's ``AcceleratedOptimizer`` (a torch Optimizer subclass that never calls its
    ``__init__``: no ``_optimizer_step_pre_hooks``) and Lightning's ``LightningOptimizer``
    hold it as ``.optimizer`` / ``._optimizer``; their ``step()`` calls its ``step()``, so the
    hooks on it see every step they apply (and none they skip)."""
    seen = 0
    while (not hasattr(optimizer, "_optimizer_step_pre_hooks") and seen < 8):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def _check_loss_type(loss: Any) -> None:
    """The checks of :func:`_check_loss` that need no value (no device synchronisation)."""
    if loss is None or isinstance(loss, numbers.Real):
        return
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"log(loss=...) needs the batch's mean loss as a scalar; got a "
                             f"tensor of shape {tuple(loss.shape)} (pass loss.mean() or "
                             "loss.item())")
        return
    raise TypeError(f"log(loss=...) needs a number or a one-element tensor, got "
                    f"{type(loss).__name__}")


def _check_indices_type(indices: Any) -> None:
    """The checks of :func:`_check_indices` that need no copy, for tensors."""
    if isinstance(indices, Tensor) and (indices.dim() != 1 or indices.is_floating_point()
                                        or indices.is_complex()
                                        or indices.dtype == torch.bool):
        raise ValueError(f"log(indices=...) needs a 1-D sequence of integer dataset indices, "
                         f"got a {indices.dtype} tensor of shape {tuple(indices.shape)}")


def _check_loss(loss: Any) -> float | None:
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"log(loss=...) needs the batch's mean loss as a scalar; got a "
                             f"tensor of shape {tuple(loss.shape)} (pass loss.mean() or "
                             "loss.item())")
        return float(loss.detach().double().item())  # a float64 loss stays exact
    if isinstance(loss, numbers.Real):
        return float(loss)
    raise TypeError(f"log(loss=...) needs a number or a one-element tensor, got "
                    f"{type(loss).__name__}")


def _check_indices(indices: Any) -> Tensor | None:
    if indices is None:
        return None
    try:
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor)
                              else indices).detach()
    except (TypeError, ValueError) as e:
        raise TypeError(f"log(indices=...) needs a 1-D sequence of integer dataset indices: "
                        f"{e}") from None
    if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"log(indices=...) needs a 1-D sequence of integer dataset indices, "
                         f"got a {idx.dtype} tensor of shape {tuple(idx.shape)}")
    return idx.to("cpu", torch.int64)


__all__ = ["Recorder", "RecorderError", "SelfCheckError", "supported_types"]
