"""The recorder in Lightning: ``RecorderCallback(store, **recorder_options)``.

>>> trainer = L.Trainer(max_epochs=1,  # doctest: +SKIP
...                     callbacks=[RecorderCallback("run.zarr", every=10)])

Works with the default automatic optimisation, where Lightning runs ``training_step`` and
``backward`` inside ``optimizer.step(closure)``: the recorder assembles the step when the
closure returns (after ``gradient_clip_val`` clipping, which Lightning applies inside it) and
before the optimizer reads ``.grad``. ``accumulate_grad_batches`` gives one recorded step with
every micro-batch in it; ``precision="bf16-mixed"`` is recorded like autocast in a plain loop.
The class is a ``Callback`` of both ``lightning.pytorch`` and ``pytorch_lightning`` (whichever
are installed), so either Trainer accepts it. Importing this module imports neither; the class
is built on first access of ``RecorderCallback``.

What the callback does (docs/integrations.md):

* ``on_train_start``: enters a :class:`trajlab.Recorder` on the LightningModule and the
  Trainer's (only) optimizer, with ``dataset_size`` the train dataloader's dataset length when
  it has one; ``on_train_end`` (and ``on_exception``) closes it;
* ``on_train_batch_start`` marks a micro-batch (for training steps that call submodules rather
  than ``self(x)``);
* ``on_before_backward`` logs the micro-batch's loss (times ``accumulate_grad_batches``: Lightning
  divides it before backward); with ``loss_fn=`` among the options and batches ``(x, y)``, it
  also logs them for the first step's self-check (``loss_fn(module(x), y)``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["RecorderCallback"]  # noqa: F822 (built lazily, __getattr__)


def _bases() -> tuple[type, ...]:
    bases = []
    try:
        from lightning.pytorch import Callback as LCallback
        bases.append(LCallback)
    except ImportError:
        pass
    try:
        from pytorch_lightning import Callback as PLCallback
        bases.append(PLCallback)
    except ImportError:
        pass
    if not bases:
        raise ImportError("trajlab.integrations.lightning.RecorderCallback needs Lightning: "
                          "pip install trajlab[lightning]")
    return tuple(bases)


def _max_steps(trainer: Any) -> int | None:
    """The optimizer steps a Trainer will take: ``max_steps``, else its estimate from the epochs
    and the data (None where neither is known or finite)."""
    steps = getattr(trainer, "max_steps", -1)
    if isinstance(steps, int) and steps > 0:
        return steps
    try:
        est = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - no length, no max_epochs: not known
        return None
    return int(est) if isinstance(est, (int, float)) and 0 < est < float("inf") else None


def _build() -> type:
    from trajlab.record import Recorder
    from trajlab.record import ddp as _ddp

    class RecorderCallback(*_bases()):
        """Record a Lightning training run into a trajlab run store.

        Parameters
        ----------
        store : where to write (as :class:`trajlab.Recorder`).
        **recorder_options : any :class:`trajlab.Recorder` option (``every``, ``layers``,
            ``loss_fn``, ``metadata``, ...); the optimizer is the Trainer's.
        """

        def __init__(self, store: Any, **recorder_options: Any) -> None:
            if "optimizer" in recorder_options:
                raise TypeError("RecorderCallback records the Trainer's own optimizer; do not "
                                "pass optimizer=")
            self.store = store
            self.options = dict(recorder_options)
            self.recorder: Recorder | None = None
            self._accumulate = 1
            self._batch: Any = None

        def on_train_start(self, trainer, pl_module) -> None:
            if self.recorder is not None:
                return
            optimizers = list(trainer.optimizers)
            if len(optimizers) != 1:
                raise RuntimeError(f"RecorderCallback records a module trained by one optimizer; "
                                   f"this Trainer has {len(optimizers)}")
            opts = dict(self.options)
            if "dataset_size" not in opts:
                loader = trainer.train_dataloader
                try:
                    opts["dataset_size"] = len(loader.dataset)
                except (AttributeError, TypeError):
                    pass
            if "steps" not in opts:  # for the early disk-space warning, where it is known
                steps = _max_steps(trainer)
                if steps is not None:
                    opts["steps"] = steps
            meta = dict(opts.pop("metadata", None) or {})
            meta.setdefault("trainer", {
                "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
                "gradient_clip_val": float(trainer.gradient_clip_val or 0.0),
                "precision": str(trainer.precision)})
            self._accumulate = int(trainer.accumulate_grad_batches)
            rec = Recorder(pl_module, self.store, optimizer=optimizers[0],
                                   metadata=meta, **opts)
            # strategy="ddp": callbacks see the unwrapped module; record as the ranks of the
            # default group (rank 0 writes)
            _ddp.attach(rec, _ddp.current())
            rec.__enter__()
            self.recorder = rec

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.recorder is not None:
                self.recorder._mark_batch()
                self._batch = batch

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            rec = self.recorder
            if rec is None or not rec.recording:
                return
            kw: dict[str, Any] = {}
            batch, self._batch = self._batch, None
            if (rec.options.loss_fn is not None and isinstance(batch, (tuple, list))
                    and len(batch) == 2
                    and isinstance(batch[1], torch.Tensor)):
                kw = {"inputs": batch[0], "targets": batch[1]}
            rec.log(loss=loss.detach() * self._accumulate, **kw)

        def on_train_end(self, trainer, pl_module) -> None:
            self.close()

        def on_exception(self, trainer, pl_module, exception) -> None:
            if self.recorder is not None:
                self.recorder._failure = exception
            self.close()

        def close(self) -> None:
            """Remove the hooks, flush and commit (called at the end of training)."""
            if self.recorder is not None:
                rec, self.recorder = self.recorder, None
                rec.close()

    RecorderCallback.__module__ = __name__
    return RecorderCallback


_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name == "RecorderCallback":
        if name not in _BUILT:
            _BUILT[name] = _build()
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
