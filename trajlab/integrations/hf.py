"""The recorder in Hugging Face's ``Trainer``: ``RecorderCallback(store, **recorder_options)``.

>>> trainer = Trainer(model=model, args=args, train_dataset=ds,  # doctest: +SKIP
...                   callbacks=[RecorderCallback("run.zarr", every=10)])

What it does (docs/integrations.md):

* at ``on_train_begin`` it enters a :class:`trajlab.Recorder` on the Trainer's model and the
  torch optimizer inside accelerate's ``AcceleratedOptimizer``, with ``dataset_size`` the
  train dataset's length when it has one and ``sampler="reshuffle"`` (the Trainer reshuffles
  each epoch) unless given; at ``on_train_end`` it closes it (``close()`` does it by hand when
  training raised);
* one recorded step per optimizer step: the Trainer's micro-batches of gradient accumulation
  are the step's batch, ``max_grad_norm`` clipping is the scale applied to ``.grad`` and the
  learning rate is the one the step used, as in a plain loop;
* the step's loss: the model output's ``loss`` of each micro-batch, combined as the Trainer
  does (summed when the model normalised it over the accumulated batch with
  ``num_items_in_batch``, else averaged), logged just before ``optimizer.step()``.

Importing this module does not import ``transformers``; the callback class is built (as a
``transformers.TrainerCallback``) on first access of ``RecorderCallback``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["RecorderCallback", "causal_lm_loss"]  # noqa: F822 (built lazily, __getattr__)


def causal_lm_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """The causal LM loss from a model's output and its ``labels`` (next-token cross-entropy,
    mean over tokens, ``-100`` ignored): a ``loss_fn`` for the recorder's self-check of Hugging
    Face causal LMs (``Recorder(..., loss_fn=causal_lm_loss)`` with
    ``rec.log(inputs={"input_ids": x}, targets=x)``)."""
    logits = output["logits"] if isinstance(output, Mapping) else getattr(output, "logits",
                                                                          output)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100)


def _build() -> type:
    from transformers import TrainerCallback

    from trajlab.record import Recorder
    from trajlab.record import ddp as _ddp

    class RecorderCallback(TrainerCallback):
        """Record a ``transformers.Trainer`` run into a trajlab run store.

        Parameters
        ----------
        store : where to write (as :class:`trajlab.Recorder`).
        **recorder_options : any :class:`trajlab.Recorder` option (``every``, ``layers``,
            ``mode``, ``per_sample``, ``metadata``, ...); ``optimizer`` is the Trainer's.
        """

        def __init__(self, store: Any, **recorder_options: Any) -> None:
            if "optimizer" in recorder_options:
                raise TypeError("RecorderCallback records the Trainer's own optimizer; do not "
                                "pass optimizer=")
            self.store = store
            self.options = dict(recorder_options)
            self.recorder: Recorder | None = None
            self._losses: list[tuple[float, bool]] = []
            self._hook = None

        # -------------------------------------------------------------- lifecycle
        def on_train_begin(self, args, state, control, model=None, optimizer=None,
                           train_dataloader=None, **kwargs):
            if self.recorder is not None:
                return
            if model is None or optimizer is None:
                raise RuntimeError("RecorderCallback: the Trainer passed no model or optimizer "
                                   "to on_train_begin")
            opts = dict(self.options)
            dataset = getattr(train_dataloader, "dataset", None)
            if "dataset_size" not in opts:
                try:
                    opts["dataset_size"] = len(dataset) if dataset is not None else None
                except TypeError:  # an IterableDataset without a length
                    opts["dataset_size"] = None
                if not opts["dataset_size"]:
                    opts.pop("dataset_size")
            opts.setdefault("sampler", "reshuffle")
            if "steps" not in opts and int(getattr(state, "max_steps", 0) or 0) > 0:
                opts["steps"] = int(state.max_steps)  # for the early disk-space warning
            meta = dict(opts.pop("metadata", None) or {})
            meta.setdefault("trainer", {
                "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
                "max_grad_norm": float(args.max_grad_norm or 0.0),
                "per_device_train_batch_size": int(args.per_device_train_batch_size),
                "learning_rate": float(args.learning_rate),
                "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value",
                                                 args.lr_scheduler_type)),
                "seed": int(args.seed)})
            rec = Recorder(model, self.store, optimizer=optimizer, metadata=meta,
                                   **opts)
            # several processes (torchrun): the Trainer's model is wrapped in DDP, callbacks
            # see the module; record as the ranks of the default group (rank 0 writes)
            _ddp.attach(rec, _ddp.current())
            rec.__enter__()
            self.recorder = rec
            self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)

        def on_train_end(self, args, state, control, **kwargs):
            self.close()

        def close(self) -> None:
            """Remove the hooks, flush and commit (called at the end of training; call it
            yourself when ``trainer.train()`` raised)."""
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self.recorder is not None:
                rec, self.recorder = self.recorder, None
                rec.close()

        # -------------------------------------------------------------- the step's loss
        def _on_forward(self, module, args, kwargs, output):
            rec = self.recorder
            if rec is None or not rec.recording or not torch.is_grad_enabled():
                return
            loss = (output.get("loss") if isinstance(output, Mapping) else
                    output[0] if isinstance(output, (tuple, list)) and output
                    and isinstance(output[0], torch.Tensor) and output[0].numel() == 1
                    else None)
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                self._losses.append((float(loss.detach().float()),
                                     kwargs.get("num_items_in_batch") is not None))

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            rec, losses, self._losses = self.recorder, self._losses, []
            if rec is None or not rec.recording or not losses:
                return
            values = [v for v, _ in losses]
            # normalised over the whole accumulated batch (num_items_in_batch): the step's
            # loss is their sum; else each is its micro-batch's mean
            if all(s for _, s in losses):
                total = math.fsum(values)
                if getattr(args, "average_tokens_across_devices", False):
                    # the token count is every process's: this rank's sum is its share of
                    # the global mean; the recorder averages the ranks' losses
                    total *= max(1, int(getattr(args, "world_size", 1) or 1))
            else:
                total = math.fsum(values) / len(values)
            rec.log(loss=total)

        def on_step_end(self, args, state, control, **kwargs):
            self._losses = []

    RecorderCallback.__module__ = __name__
    return RecorderCallback


_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name == "RecorderCallback":
        if name not in _BUILT:
            try:
                _BUILT[name] = _build()
            except ImportError as e:
                raise ImportError("trajlab.integrations.hf.RecorderCallback needs transformers: "
                                  "pip install trajlab[hf]") from e
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
