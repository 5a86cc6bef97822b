"""The Recorder's options: one frozen, self-validating object (like ``AnalysisOptions``).

``Recorder(model, store, optimizer=opt, every=10, per_sample=False)`` builds a
:class:`RecorderOptions` from its keywords; ``Recorder(..., options=RecorderOptions(...))`` takes
one whole (keywords given beside it replace its fields). A new option is one field here, its check
in ``__post_init__`` and the code that reads it; integrations pass options through unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from trajlab.record.probe import FullGradientProbe
from trajlab.store.metadata import SAMPLERS

#: ``per_sample_dtype`` names and the torch dtypes they store.
PS_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class RecorderOptions:
    """What and how a :class:`trajlab.Recorder` records; checked when made.

    Attributes
    ----------
    **Selection** (what is recorded)

    every : record the steps whose index is a multiple of ``every`` (int >= 1).
    layers : names to record (module names, or ``module:part`` for modules with several
        matrices); None: every layer a rule covers (``trajlab info`` lists them).
    rank : k of the top-k singular-subspace sketch for weight-shared layers (convolutions,
        sequences).
    per_sample : record per-sample gradient sketches (default). False records weights, batch
        gradients and updates only: for models whose layers mix samples (BatchNorm in train
        mode) or to save bytes; the analysis then has no noise terms.
    per_sample_dtype : None (the weights' dtype), "float16", "float32" or "float64": storage
        precision of the per-sample information (docs/format.md lists each term's error).
    batch_dim : axis of the layers' inputs that indexes the samples (one int for every layer,
        or a dict per layer name); None: 1 inside PyTorch Transformer modules built with
        ``batch_first=False``, else 0.

    **Run info** (stored for the analysis)

    sampler : "with_replacement", "reshuffle" or "unknown": how batches are drawn (MATH.md
        §1, §4a).
    dataset_size : number of training samples N (finite-population corrections).
    steps : optimizer steps the whole run is expected to take (None: unknown). Used to warn,
        once and early, when the projected store does not fit the free space of its disk.
    start_step : index of the next optimizer step; None: 0, or last recorded step + 1 when
        appending.
    metadata : JSON-serialisable user metadata stored in the root attributes (scalars become
        coordinates of :func:`trajlab.open_analyses`).

    **Checks**

    self_check : check the first recorded step thoroughly (:class:`SelfCheckError`); every
        later step is checked cheaply against ``.grad`` whatever this says.
    loss_fn : ``loss_fn(model(x), y)`` as used in training (mean over the batch); with
        ``log(inputs=..., targets=...)`` the first recorded step recomputes one sample's
        gradient independently (replaying dropout and autocast).
    probe : a :class:`trajlab.FullGradientProbe`: the full-data gradient every ``probe.every``
        steps.
    on_error : when a later step cannot be recorded (the store cannot be written, the model's
        dtype changed, ``.grad`` was edited in a way no scale explains): "stop" warns, stops
        recording, keeps training and marks the store truncated; "raise" raises
        :class:`RecorderError` in the training loop. Problems found at the first recorded step
        always raise (nothing has been recorded yet).

    **Storage**

    mode : "w-" (fail if a run store exists), "w" (replace a run store, never anything else)
        or "a" (append: resume a run the model continues).
    chunk_steps : rows per Zarr chunk along ``step`` (1..4096); None: chosen for ~16 MB chunks.
    compression : codecs of the stored arrays: "fast" (LZ4 with bit or byte shuffle per
        variable, weights stored step-fastest) keeps up with training; "small" (zstd) stores
        15-25% fewer bytes for 2-3x the writer's CPU. Both are lossless and readable by plain
        Zarr.
    store_grad : also store ``.grad`` for layers whose sketch implies it exactly (rank-one
        factors).
    storage_options : fsspec options for URL stores.

    **Writer**

    writer : where compression and writes run: "thread" (a background thread) or "process" (a
        forked process fed through shared memory; local stores only; measured no faster on 2
        cores, see benchmarks/README.md).
    queue_size : steps that may wait for the writer before training blocks (int >= 1).
    flush_seconds : commit at least this often (a crash loses at most this much); 0 commits
        every row.
    """

    # selection
    every: int = 1
    layers: Sequence[str] | None = None
    rank: int = 2
    per_sample: bool = True
    per_sample_dtype: str | None = None
    batch_dim: int | dict[str, int] | None = None
    # run info
    sampler: Literal["with_replacement", "reshuffle", "unknown"] = "unknown"
    dataset_size: int | None = None
    steps: int | None = None
    start_step: int | None = None
    metadata: Mapping[str, Any] | None = None
    # checks
    self_check: bool = True
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    probe: FullGradientProbe | None = None
    on_error: Literal["stop", "raise"] = "stop"
    # storage
    mode: Literal["w-", "w", "a"] = "w-"
    chunk_steps: int | None = None
    compression: Literal["fast", "small"] = "fast"
    store_grad: bool = False
    storage_options: dict | None = None
    # writer
    writer: Literal["thread", "process"] = "thread"
    queue_size: int = 8
    flush_seconds: float = 5.0

    def __post_init__(self) -> None:
        int_option("every", self.every, 1)
        int_option("rank", self.rank, 1)
        int_option("queue_size", self.queue_size, 1)
        if self.chunk_steps is not None:
            int_option("chunk_steps", self.chunk_steps, 1, 4096)
        if self.start_step is not None:
            int_option("start_step", self.start_step, 0)
        if self.dataset_size is not None:
            int_option("dataset_size", self.dataset_size, 1)
        if self.steps is not None:
            int_option("steps", self.steps, 1)
        f = self.flush_seconds
        if not (isinstance(f, numbers.Real) and f >= 0 and math.isfinite(f)):
            raise ValueError(f"flush_seconds must be a number >= 0 (0: commit every row), got "
                             f"{f!r}")
        _one_of("mode", self.mode, ("w-", "w", "a"))
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(map(repr, SAMPLERS))}, got "
                             f"{self.sampler!r}")
        _one_of("on_error", self.on_error, ("stop", "raise"))
        if self.per_sample_dtype is not None and self.per_sample_dtype not in PS_DTYPES:
            raise ValueError(f"per_sample_dtype must be None or one of {sorted(PS_DTYPES)}, "
                             f"got {self.per_sample_dtype!r}")
        _one_of("compression", self.compression, ("fast", "small"))
        _one_of("writer", self.writer, ("thread", "process"))
        if self.probe is not None and not isinstance(self.probe, FullGradientProbe):
            raise TypeError(f"probe must be a trajlab.FullGradientProbe, got "
                            f"{type(self.probe).__name__}")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(model(x), y) -> mean loss")
        if self.metadata is not None and not isinstance(self.metadata, Mapping):
            raise TypeError(f"metadata must be a dict of JSON-serialisable values, got "
                            f"{type(self.metadata).__name__}")
        if self.batch_dim is not None and not isinstance(self.batch_dim, dict):
            int_option("batch_dim", self.batch_dim, 0)

    @classmethod
    def build(cls, options: RecorderOptions | None = None, /,
              **changes: Any) -> RecorderOptions:
        """``options`` (default: all defaults) with ``changes`` applied; an unknown name is a
        ``TypeError`` naming it, the closest option and the groups of options."""
        if options is not None and not isinstance(options, RecorderOptions):
            raise TypeError(f"options must be a trajlab.RecorderOptions, got "
                            f"{type(options).__name__} (or pass the options as keywords)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            near = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            groups = "; ".join(f"{g}: {', '.join(names)}" for g, names in GROUPS.items())
            raise TypeError(f"Recorder got an unknown option {unknown[0]!r}: {hint}the options "
                            f"are ({groups}); see trajlab.RecorderOptions")
        base = options if options is not None else cls()
        return dataclasses.replace(base, **changes) if changes else base

    def group(self, name: str) -> dict[str, Any]:
        """The options of one group (``"selection"``, ``"run info"``, ``"checks"``,
        ``"storage"``, ``"writer"``) as a dict."""
        return {n: getattr(self, n) for n in GROUPS[name]}


#: The option groups, in the order of the fields (docs/recorder.md lists them so).
GROUPS: dict[str, tuple[str, ...]] = {
    "selection": ("every", "layers", "rank", "per_sample", "per_sample_dtype", "batch_dim"),
    "run info": ("sampler", "dataset_size", "steps", "start_step", "metadata"),
    "checks": ("self_check", "loss_fn", "probe", "on_error"),
    "storage": ("mode", "chunk_steps", "compression", "store_grad", "storage_options"),
    "writer": ("writer", "queue_size", "flush_seconds"),
}


def int_option(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    """Refuse ``value`` unless it is an integer in ``lo..hi`` (a ``TypeError`` or ``ValueError``
    naming ``name`` and the range)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be {rng}, got {value}")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        said = ", ".join(map(repr, allowed[:-1])) + f" or {allowed[-1]!r}"
        raise ValueError(f"{name} must be {said}, got {value!r}")


__all__ = ["GROUPS", "PS_DTYPES", "RecorderOptions", "int_option"]
