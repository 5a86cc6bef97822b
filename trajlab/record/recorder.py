"""The Recorder: hooks on a model and its optimizer that stream a training run into a run store."""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from trajlab.errors import RecorderError, SelfCheckError
from trajlab.record.basis import SubspaceTracker
from trajlab.record.probe import FullGradientProbe
from trajlab.record.rules import Capture, LayerRule, rule_for
from trajlab.record.rules.base import rank1_sketch, subspace_sketch
from trajlab.record.writer import BackgroundWriter, PendingRecord
from trajlab.store.layout import layer_group_name
from trajlab.store.lock import StoreLock
from trajlab.store.metadata import (
    FORMAT_VERSION,
    ConvGeometry,
    LayerMeta,
    RunMeta,
    new_run_id,
)
from trajlab.store.run_store import RunStoreWriter
from trajlab.store.target import StoreLike


@dataclass
class _Layer:
    name: str
    module: nn.Module
    rule: LayerRule
    meta: LayerMeta | None = None
    captures: list[Capture] = field(default_factory=list)
    basis: tuple[Tensor, Tensor, Tensor] | None = None
    weight_before: Tensor | None = None


class Recorder:
    """Record a training run into a Zarr run store.

    A context manager: on entry it registers forward hooks on the recorded layers and step hooks
    on the optimizer; on exit (also after an exception) it removes every hook, flushes the
    background writer and commits what was recorded. Nothing is written onto the user's modules.

    Parameters
    ----------
    model : nn.Module
        The model being trained. Its loss must be a *mean* over the batch's samples.
    store : str or zarr store
        Where to write (path or fsspec URL).
    optimizer : torch.optim.Optimizer
        The optimizer whose ``step()`` defines a training step. The update it applies is
        recorded as is (any optimizer: momentum, weight decay, Adam).
    every : int
        Record steps whose index is a multiple of ``every``.
    layers : sequence of str, optional
        Module names to record; default every supported layer (Linear, Conv2d).
    mode : {"w-", "w", "a"}
        ``"w-"`` (default) fails if a store exists, ``"w"`` overwrites, ``"a"`` appends to an
        existing run (resume); the model's layers must match it.
    rank : int
        k of the top-k singular-subspace sketch for weight-shared layers (Conv2d, sequences).
    sampler : {"with_replacement", "reshuffle", "unknown"}
        How batches are drawn; stored for the analysis (MATH.md §1, §4a).
    dataset_size : int, optional
        Number of training samples N (for finite-population corrections).
    loss_fn : callable, optional
        ``loss_fn(model(x), y)`` as used in training. With ``log(inputs=..., targets=...)`` the
        first recorded step checks one sample's gradient independently (catches sum-reduced
        losses).
    probe : FullGradientProbe, optional
        Full-data gradient every ``probe.every`` steps.
    start_step : int, optional
        Index of the next optimizer step; default 0, or last recorded step + 1 when appending.
    chunk_steps : int, optional
        Rows per Zarr chunk along ``step``; default chosen for ~16 MB chunks of the largest
        array (1..256).
    queue_size : int
        Steps that may wait for the writer before training blocks.
    flush_seconds : float
        Commit at least this often (a crash loses at most this much).
    self_check : bool
        Check the first recorded step (see :class:`SelfCheckError`).
    store_grad : bool
        Also store ``.grad`` for Linear layers on (batch, features) inputs, where the exact
        per-sample factors imply it (their batch mean, checked by the self-check). Off by
        default: it would add one dense matrix per step. Always stored when ``self_check`` is
        off or the layer is sketched.
    on_error : {"stop", "raise"}
        When writing fails (disk full, ...): ``"stop"`` warns, stops recording, keeps training
        and marks the store truncated; ``"raise"`` raises in the training loop.
    metadata : dict, optional
        JSON-serialisable user metadata stored in the root attributes (seeds, hyper-parameters).
    storage_options : dict, optional
        fsspec options for URL stores.

    Examples
    --------
    >>> with trajlab.Recorder(model, "run.zarr", optimizer=opt) as rec:  # doctest: +SKIP
    ...     for x, y, idx in batches:
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
        every: int = 1,
        layers: Sequence[str] | None = None,
        mode: Literal["w-", "w", "a"] = "w-",
        rank: int = 4,
        sampler: Literal["with_replacement", "reshuffle", "unknown"] = "unknown",
        dataset_size: int | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        probe: FullGradientProbe | None = None,
        start_step: int | None = None,
        chunk_steps: int | None = None,
        queue_size: int = 8,
        flush_seconds: float = 5.0,
        self_check: bool = True,
        store_grad: bool = False,
        on_error: Literal["stop", "raise"] = "stop",
        metadata: dict[str, Any] | None = None,
        storage_options: dict | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if sampler not in ("with_replacement", "reshuffle", "unknown"):
            raise ValueError(
                f"sampler must be 'with_replacement', 'reshuffle' or 'unknown', got {sampler!r}"
            )
        if on_error not in ("stop", "raise"):
            raise ValueError(f"on_error must be 'stop' or 'raise', got {on_error!r}")
        self.model = model
        self.optimizer = optimizer
        self.store = store
        self.every = every
        self.mode = mode
        self.sampler = sampler
        self.dataset_size = dataset_size
        self.loss_fn = loss_fn
        self.probe = probe
        self.chunk_steps = chunk_steps
        self.queue_size = queue_size
        self.flush_seconds = flush_seconds
        self.self_check = self_check
        self.store_grad = store_grad
        self.on_error = on_error
        self.metadata = dict(metadata or {})
        self.storage_options = storage_options
        self._start_step = start_step
        self._layers = self._select_layers(layers)
        self._tracker = SubspaceTracker(rank)
        self._handles: list[Any] = []
        self._group_of: dict[int, int | None] = {}
        self._lock: StoreLock | None = None
        self._writer: BackgroundWriter | None = None
        self._store_writer: RunStoreWriter | None = None
        self._step = 0
        self._n_recorded = 0
        self._checked = False
        self._active = False
        self._suspended = False
        self._stopped_reason: str | None = None
        self._log: dict[str, Any] = {}
        self._probe_grads: dict[str, Tensor] | None = None
        self._nonfinite_seen: list[tuple[int, str]] = []
        self._warned_nonfinite = False
        self._warned_empty = False

    # ------------------------------------------------------------------ set-up
    def _select_layers(self, names: Sequence[str] | None) -> list[_Layer]:
        modules = dict(self.model.named_modules())
        if names is not None:
            names = list(names)
            if not names:
                raise ValueError("layers=[] selects nothing; pass None to record every layer")
            unknown = [n for n in names if n not in modules]
            if unknown:
                supported = [n for n, m in modules.items() if rule_for(m) is not None]
                raise ValueError(
                    f"unknown layer name(s) {unknown}; recordable layers of this model: "
                    f"{supported}"
                )
            chosen: list[_Layer] = []
            for n in names:
                rule = rule_for(modules[n])
                if rule is None:
                    raise ValueError(
                        f"layer {n!r} is a {type(modules[n]).__name__}, which trajlab cannot "
                        "record (supported: Linear, Conv2d)"
                    )
                chosen.append(_Layer(n, modules[n], rule))
            return chosen
        chosen, unsupported = [], []
        for n, m in modules.items():
            rule = rule_for(m)
            if rule is not None:
                chosen.append(_Layer(n, m, rule))
            elif any(True for _ in m.parameters(recurse=False)):
                unsupported.append(f"{n or '<model>'} ({type(m).__name__})")
        if unsupported:
            warnings.warn(
                "trajlab records Linear and Conv2d layers; these layers with parameters are not "
                f"recorded: {', '.join(unsupported)}",
                stacklevel=3,
            )
        if not chosen:
            raise RecorderError(
                f"{type(self.model).__name__} has no layer trajlab can record (Linear, Conv2d)"
            )
        return chosen

    @property
    def layer_names(self) -> list[str]:
        """Names of the layers being recorded."""
        return [layer.name for layer in self._layers]

    @property
    def step(self) -> int:
        """Index of the next optimizer step."""
        return self._step

    @property
    def recording(self) -> bool:
        """Whether the next optimizer step will be recorded."""
        return (
            self._active
            and not self._suspended
            and self._stopped_reason is None
            and self._step % self.every == 0
        )

    def __enter__(self) -> Recorder:
        self._lock = StoreLock(self.store, what="recorder")
        self._lock.acquire()
        try:
            self._store_writer = RunStoreWriter(
                self.store, mode=self.mode, storage_options=self.storage_options
            )
        except BaseException:
            self._lock.release()
            raise
        last = self._store_writer.last_step
        if self._start_step is not None:
            if last is not None and self._start_step <= last:
                self._lock.release()
                raise RecorderError(
                    f"start_step={self._start_step} but the store already holds steps up to "
                    f"{last}; resume with start_step > {last} or record into a new store"
                )
            self._step = self._start_step
        elif last is not None:
            self._step = last + 1
        self._writer = BackgroundWriter(
            self._store_writer,
            queue_size=self.queue_size,
            flush_seconds=self.flush_seconds,
            on_nonfinite=lambda s, n: self._nonfinite_seen.append((s, n)),
            on_tick=self._lock.refresh,
        )
        try:
            for layer in self._layers:
                self._handles.append(
                    layer.module.register_forward_hook(self._make_forward_hook(layer))
                )
            self._handles.append(self.optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._after_step))
        except BaseException:
            self._remove_hooks()
            self._writer.close()
            self._lock.release()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def close(self) -> None:
        """Remove all hooks, flush and commit. Called by ``__exit__``; idempotent."""
        self._active = False
        self._remove_hooks()
        for layer in self._layers:
            layer.captures.clear()
            layer.weight_before = None
        if self._writer is not None:
            self._writer.close(truncated=self._stopped_reason)
            err = self._writer.error
            self._writer = None
            if err is not None and self._stopped_reason is None:
                self._fail(err)
        if self._lock is not None:
            self._lock.release()
        self._emit_nonfinite_warning()
        if self._n_recorded == 0 and self._stopped_reason is None and not self._warned_empty:
            self._warned_empty = True
            warnings.warn(
                "trajlab: no step was recorded (optimizer.step() was not called while recording"
                f"); nothing was written to {self.store!r}",
                RuntimeWarning,
                stacklevel=3,
            )

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ user calls
    def log(
        self,
        *,
        loss: Tensor | float | None = None,
        indices: Tensor | np.ndarray | Sequence[int] | None = None,
        inputs: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> None:
        """Attach step-level information to the current step (call before ``optimizer.step()``).

        Parameters
        ----------
        loss : the batch's (mean) loss.
        indices : dataset indices of the batch's samples, in batch order.
        inputs, targets : the batch; used only by the first-step self-check with ``loss_fn``.
        """
        if not self.recording:
            return
        if loss is not None:
            self._log["loss"] = loss.detach() if isinstance(loss, Tensor) else float(loss)
        if indices is not None:
            idx = torch.as_tensor(indices).detach().reshape(-1).to("cpu", torch.int64)
            self._log["indices"] = idx
        if inputs is not None and targets is not None and not self._checked:
            self._log["batch"] = (inputs, targets)

    # ------------------------------------------------------------------ hooks
    def _make_forward_hook(self, layer: _Layer) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if not self.recording or not torch.is_grad_enabled():
                return
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            inp = args[0]
            if layer.meta is None:
                self._describe(layer, inp)
            if layer.meta.sketch == "subspace" and layer.basis is None:
                layer.basis = self._tracker.basis(layer.name, layer.rule.weight_matrix(module).detach())

            def on_grad(grad_out: Tensor) -> None:
                self._capture(layer, inp, grad_out)

            output.register_hook(on_grad)

        return hook

    def _describe(self, layer: _Layer, inp: Tensor) -> None:
        geo = layer.rule.geometry(layer.module, inp)
        shape = tuple(layer.rule.weight_matrix(layer.module).shape)
        rank = self._tracker.rank_for(shape) if geo["sketch"] == "subspace" else 0
        layer.meta = LayerMeta(
            name=layer.name,
            module=layer.rule.module_type,
            group=layer_group_name(layer.name),
            sketch=geo["sketch"],
            shape=(int(shape[0]), int(shape[1])),
            rank=rank,
            positions=int(geo["positions"]),
            geometry=ConvGeometry.from_dict(geo["conv"]) if geo["conv"] else None,
            stored_grad=geo["sketch"] != "rank1" or self.store_grad or not self.self_check,
        )

    def _capture(self, layer: _Layer, inp: Tensor, grad_out: Tensor) -> None:
        if self._suspended:
            return
        act, delta = layer.rule.patches(layer.module, inp, grad_out.detach())
        want_ps = self.self_check and not self._checked
        if layer.meta.sketch == "rank1":
            if act.shape[-1] != 1:
                raise RecorderError(
                    f"layer {layer.name!r} was recorded with (batch, features) inputs but now "
                    f"sees {tuple(inp.shape)}; its input shape must not change between steps"
                )
            tensors = rank1_sketch(act[..., 0], delta[..., 0])
            cap = Capture("rank1", tensors)
        else:
            U, V, _ = layer.basis
            tensors, ps = subspace_sketch(act, delta, U, V, want_per_sample=want_ps)
            cap = Capture("subspace", tensors, per_sample=ps)
        layer.captures.append(cap)

    # ------------------------------------------------------------------ steps
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.recording:
            return
        self._raise_if_writer_failed()
        if self._stopped_reason is not None:
            return
        for layer in self._layers:
            n = len(layer.captures)
            if n != 1:
                self._reset_step()
                if n == 0:
                    raise RecorderError(
                        f"layer {layer.name!r} saw no backward pass at step {self._step}: it was "
                        "not used in the forward pass, or backward ran under no_grad; record only "
                        "layers used every step (layers=[...])"
                    )
                raise SelfCheckError(
                    f"layer {layer.name!r} was applied {n} times in step {self._step} (a layer "
                    "reused within one forward, or several forward/backward passes per optimizer "
                    "step as in gradient accumulation); per-sample gradients are undefined for "
                    "such a loop, so trajlab cannot record it"
                )
        if not self._checked:
            if self.self_check:
                self._run_self_check()
            self._checked = True
        for layer in self._layers:
            layer.weight_before = layer.rule.weight_matrix(layer.module).detach().clone()
        self._probe_grads = self._probe_gradients()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            if self.recording and self._layers[0].weight_before is not None:
                self._emit_step()
        finally:
            self._reset_step()
            self._step += 1

    def _reset_step(self) -> None:
        for layer in self._layers:
            layer.captures.clear()
            layer.basis = None
            layer.weight_before = None
        self._log = {}
        self._probe_grads = None

    def _lr_of(self, param: Tensor) -> float:
        groups = self.optimizer.param_groups
        index = self._group_of.get(id(param))
        if index is None or index >= len(groups):
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
        probe_grads = self._probe_grads
        batch_size = None
        layers: dict[str, dict[str, Tensor]] = {}
        for layer in self._layers:
            cap = layer.captures[0]
            W = layer.weight_before
            Wnow = layer.rule.weight_matrix(layer.module).detach()
            b = next(iter(cap.tensors.values())).shape[0]
            if batch_size is not None and b != batch_size:
                raise RecorderError(
                    f"layer {layer.name!r} saw batch size {b}, other layers {batch_size}; all "
                    "recorded layers must see the same batch"
                )
            batch_size = b
            out = {
                "lr": torch.tensor(self._lr_of(layer.module.weight), dtype=torch.float64),
                "weight": W,
                "weight_after": Wnow.clone(),  # the writer derives the update (store.updates)
                "grad_scale": torch.tensor(1.0, dtype=torch.float64),
                **cap.tensors,
            }
            if layer.meta.stored_grad:
                grad = layer.rule.weight_grad_matrix(layer.module)
                out["grad"] = (torch.full_like(W, float("nan")) if grad is None
                               else grad.detach().clone())
            if layer.meta.sketch == "subspace":
                U, V, residual = layer.basis
                out["basis_u"], out["basis_v"] = U, V
                out["basis_residual"] = residual.to(torch.float64).reshape(())
            if probe_grads is not None:
                out["probe_grad"] = probe_grads[layer.name]
            layers[layer.name] = out
        if self._n_recorded == 0:
            self._create_or_validate_store(int(batch_size))
        indices = self._log.get("indices")
        if indices is not None and indices.numel() != batch_size:
            warnings.warn(
                f"log(indices=...) got {indices.numel()} indices for a batch of {batch_size}; "
                "indices not recorded at this step",
                stacklevel=4,
            )
            indices = None
        loss = self._log.get("loss", float("nan"))
        root = {
            "step": np.int64(self._step),
            "lr": np.float64(out["lr"].item()),
            "batch_size": np.int32(batch_size),
            "loss": loss,
            "indices": indices,
            "probe": np.bool_(probe_grads is not None),
        }
        self._writer.put(self._to_host(root, layers))
        self._n_recorded += 1

    def _to_host(self, root: dict[str, Any], layers: dict[str, dict[str, Tensor]]) -> PendingRecord:
        device = self._layers[0].module.weight.device
        if device.type == "cuda":
            def move(t: Tensor) -> Tensor:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                return host

            host_layers = {n: {k: move(v) for k, v in d.items()} for n, d in layers.items()}
            if isinstance(root["loss"], Tensor):
                root["loss"] = move(root["loss"].to(torch.float64))
            event = torch.cuda.Event()
            event.record()
            return PendingRecord(root, host_layers, event)
        host_layers = {n: {k: v.detach().cpu() for k, v in d.items()} for n, d in layers.items()}
        if isinstance(root["loss"], Tensor):
            root["loss"] = root["loss"].to(torch.float64).cpu()
        return PendingRecord(root, host_layers)

    def _probe_gradients(self) -> dict[str, Tensor] | None:
        if self.probe is None or self._step % self.probe.every != 0:
            return None
        params = [layer.module.weight for layer in self._layers]
        with self._isolated(), torch.enable_grad():
            grads = self.probe.gradient(self.model, params)
        return {
            layer.name: g.reshape(layer.weight_before.shape).detach()
            for layer, g in zip(self._layers, grads)
        }

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

    # ------------------------------------------------------------------ store
    def _chunk_steps(self, metas: list[LayerMeta], batch_size: int, itemsize: int) -> int:
        """Rows per chunk so that the largest array's chunk holds about 16 MB (1..256).

        Rows are committed a chunk at a time (or every ``flush_seconds``), and each flush costs
        a few milliseconds per array whatever its size: long chunks keep that off small models.
        """
        if self.chunk_steps is not None:
            return int(self.chunk_steps)
        biggest = 0
        for m in metas:
            o, i = m.shape
            per_sample = batch_size * (o + i) if m.sketch == "rank1" else batch_size * i * m.rank
            biggest = max(biggest, o * i, per_sample)
        rows = (16 << 20) // max(1, biggest * itemsize)
        return int(min(256, max(1, 2 ** int(math.log2(max(1, rows))))))

    def _create_or_validate_store(self, batch_size: int) -> None:
        metas = [layer.meta for layer in self._layers]
        sw = self._store_writer
        dtype = self._layers[0].module.weight.dtype
        np_dtype = str(torch.empty((), dtype=dtype).numpy().dtype)
        if sw.is_created:
            old = sw.meta
            old_layers = {lm.name: lm for lm in old.layers}
            problems = []
            for m in metas:
                o = old_layers.get(m.name)
                if o is None:
                    problems.append(f"layer {m.name!r} is not in the store")
                elif (o.shape, o.sketch, o.rank) != (m.shape, m.sketch, m.rank):
                    problems.append(
                        f"layer {m.name!r}: store has {o.shape} {o.sketch} rank {o.rank}, model "
                        f"has {m.shape} {m.sketch} rank {m.rank}"
                    )
            if set(old_layers) != {m.name for m in metas}:
                problems.append(f"store layers {sorted(old_layers)} != recorded {[m.name for m in metas]}")
            if old.dtype != np_dtype:
                problems.append(f"store dtype {old.dtype} != model dtype {np_dtype}")
            if self.probe is not None and not old.probe:
                problems.append("the store was recorded without a probe (no probe_grad arrays)")
            if problems:
                raise RecorderError(
                    "cannot append: the model does not match the stored run: " + "; ".join(problems)
                )
            return
        from trajlab import __version__

        meta = RunMeta(
            format_version=FORMAT_VERSION,
            dtype=np_dtype,
            every=self.every,
            chunk_steps=self._chunk_steps(metas, batch_size, torch.finfo(dtype).bits // 8),
            sampler=self.sampler,
            dataset_size=self.dataset_size,
            layers=tuple(metas),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            trajlab_version=__version__,
            torch_version=torch.__version__,
            user=_jsonable(self.metadata),
            probe=self.probe is not None,
            run_id=new_run_id(),
        )
        self._writer.create(meta, batch_size)

    # ------------------------------------------------------------------ checks
    def _run_self_check(self) -> None:
        dtype = self._layers[0].module.weight.dtype
        eps = torch.finfo(dtype).eps
        for layer in self._layers:
            cap = layer.captures[0]
            grad = layer.rule.weight_grad_matrix(layer.module)
            if grad is None:
                raise SelfCheckError(f"layer {layer.name!r} has no .grad at optimizer.step()")
            mean = cap.mean_gradient()
            b = mean.new_tensor(float(next(iter(cap.tensors.values())).shape[0]))
            scale = torch.linalg.vector_norm(grad).clamp_min(torch.finfo(dtype).tiny)
            err = float(torch.linalg.vector_norm(mean - grad) / scale)
            tol = max(1e3 * eps * math.sqrt(float(b) * layer.meta.positions), 10 * eps)
            if not (err <= tol) and torch.isfinite(grad).all():
                raise SelfCheckError(
                    f"self-check failed for layer {layer.name!r}: the batch mean of the recorded "
                    f"per-sample gradients differs from .grad by {err:.2e} (relative, tolerance "
                    f"{tol:.1e}). Likely causes: .grad not zeroed before backward, gradients "
                    "clipped or rescaled before optimizer.step() (AMP GradScaler, clip_grad_norm_), "
                    "or a layer used outside its forward hook. Pass self_check=False to record "
                    "anyway."
                )
        batch = self._log.get("batch")
        if batch is not None and self.loss_fn is not None:
            self._check_one_sample(*batch)

    def _check_one_sample(self, inputs: Tensor, targets: Tensor) -> None:
        """Recompute sample 0's gradient independently and compare with the recorded one."""
        params = [layer.module.weight for layer in self._layers]
        with self._isolated(), torch.enable_grad():
            loss = self.loss_fn(self.model(inputs[:1]), targets[:1])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        eps = torch.finfo(params[0].dtype).eps
        for layer, g in zip(self._layers, grads):
            if g is None:
                continue
            g = g.reshape(layer.rule.weight_matrix(layer.module).shape)
            cap = layer.captures[0]
            if cap.sketch == "rank1":
                mine = torch.outer(cap.tensors["ps_grad_out"][0], cap.tensors["ps_input"][0])
            else:
                mine = cap.per_sample[0]
            ng = float(torch.linalg.vector_norm(g))
            nm = float(torch.linalg.vector_norm(mine))
            if ng == 0.0 and nm == 0.0:
                continue
            err = float(torch.linalg.vector_norm(mine - g)) / max(ng, nm)
            if err > max(1e4 * eps, 1e-9):
                ratio = nm / ng if ng > 0 else float("inf")
                b = cap.tensors[next(iter(cap.tensors))].shape[0]
                hint = ""
                if abs(ratio - b) < 1e-3 * b:
                    hint = (
                        f" The recorded gradient is {ratio:.3g}x (= batch size) too large: the "
                        "loss is summed over samples; use a mean-reduced loss (reduction='mean')."
                    )
                elif ratio > 0 and abs(1 / ratio - b) < 1e-3 * b:
                    hint = " The recorded gradient is batch-size times too small."
                raise SelfCheckError(
                    f"self-check failed for layer {layer.name!r}: sample 0's gradient recomputed "
                    f"with loss_fn differs from the recorded one by {err:.2e} (relative).{hint} "
                    "trajlab needs a loss that is the mean over the batch of per-sample losses, "
                    "and no layer (e.g. BatchNorm in train mode) that mixes samples."
                )

    # ------------------------------------------------------------------ failures
    def _raise_if_writer_failed(self) -> None:
        w = self._writer
        if w is not None and w.error is not None and self._stopped_reason is None:
            self._fail(w.error)
        self._emit_nonfinite_warning()

    def _fail(self, err: BaseException) -> None:
        reason = f"{type(err).__name__}: {err}"
        self._stopped_reason = reason
        with contextlib.suppress(Exception):
            self._store_writer.set_truncated(reason)
        if self.on_error == "raise":
            raise RecorderError(f"trajlab: writing the run store failed: {reason}") from err
        warnings.warn(
            f"trajlab: writing the run store {self.store!r} failed ({reason}); recording stopped "
            f"at step {self._step}, training continues. Steps committed before the failure are "
            "kept; the store is marked truncated.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _emit_nonfinite_warning(self) -> None:
        if self._nonfinite_seen and not self._warned_nonfinite:
            s, n = self._nonfinite_seen[0]
            warnings.warn(
                f"trajlab: NaN or Inf in the gradient of layer {n!r} at step {s}; recorded and "
                "flagged (variable 'nonfinite'), recording continues",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned_nonfinite = True


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(d, default=str))
