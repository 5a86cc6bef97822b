"""The run-store layout, derived from the metadata: every variable's dims, dtype and codecs, and
which variables are derived on read rather than stored.

This is the one place that knows the variants of the format:

* format 1, first release ("v1"): every update and every batch gradient stored;
* format 1 as written by trajlab 0.1.0 after derived updates ("v1-derived"): ``update_stored``
  flags, updates derived from consecutive weights, rank-1 layers without ``grad``; told apart
  from "v1" by the presence of ``update_stored`` (the only check of its kind);
* format 2 ("v2"): as v1-derived, plus CRC32C checksums on every chunk, every chunk written
  (so a missing chunk is an error), ``grad_scale`` per layer, ``run_id`` and ``ps_dtype``;
* format 3 ("v3"): as v2, plus the chunk manifest ``trajlab_chunks`` that binds each chunk's
  checksum to its array and position (:mod:`trajlab.store.manifest`): a swapped or misplaced
  chunk file is an error. Told apart from v2 by the format version only; a v2 store holding a
  manifest (a version edited down) is refused;
* format 4 ("v4"): as v3, plus layers with the ``rank1_basis`` sketch (per-sample statistics in
  W's singular basis, :class:`~trajlab.sketches.Rank1Basis`). Only stores holding such a layer
  are written as format 4 (:func:`written_format`): every other store stays format 3, readable
  by the trajlab versions before it. A store below format 4 holding such a layer is refused.

Analysis stores have their own format versions (:class:`AnalysisLayout`):

* analysis format 2 ("a2"): CRC32C checksums on every chunk; every chunk of a step chunk marked
  done is written (a missing one is an error);
* analysis format 3 ("a3"): as a2, plus the chunk manifest ``trajlab_chunks`` (the same
  mechanism as run-store format 3) binding each chunk's checksum to its array and step chunk.
  Told apart from a2 by the format version only; an a2 store holding a manifest is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from trajlab.dims import BN_CHANNEL
from trajlab.errors import StoreCorruptError
from trajlab.sketches import Var, sketch_kind
from trajlab.store.metadata import AnalysisMeta, LayerMeta, RunMeta
from trajlab.store.names import CHUNKS_ARRAY, IN, LAYERS_GROUP, OUT, SAMPLE

Variant = Literal["v1", "v1-derived", "v2", "v3", "v4"]
AnalysisVariant = Literal["a2", "a3"]

#: Sketch kinds that only format-4 run stores hold.
FORMAT4_SKETCHES = frozenset({"rank1_basis"})

#: Root-level variables (dims after ``step``).
ROOT_VARS: dict[str, Var] = {
    "step": Var((), "int64", "optimizer step index (number of optimizer.step() calls before "
                "this one)"),
    "lr": Var((), "float64", "learning rate of the first recorded layer's param group at this "
          "step (each layer group stores its own)"),
    "batch_size": Var((), "int32", "number of samples in the step's batch (all micro-batches)"),
    "loss": Var((), "float64", "training loss passed to Recorder.log (NaN when not given)"),
    "indices": Var((SAMPLE,), "int64", "dataset indices of the batch's samples (-1 = padding "
                   "or not given)"),
    "probe": Var((), "bool", "whether a full-data gradient probe was computed at this step"),
}

#: Root-level variables of runs whose model has BatchNorm layers (``model["batchnorm"]`` in the
#: metadata lists them: name, channels, eps), for their eval-mode factor in K_net
#: (:mod:`trajlab.record.batchnorm`).
BATCHNORM_VARS: dict[str, Var] = {
    "bn_weight": Var((BN_CHANNEL,), "float64", "gamma of every BatchNorm layer before the update "
                     "(1 without an affine weight), channels concatenated in module order"),
    "bn_running_var": Var((BN_CHANNEL,), "float64", "running_var of every BatchNorm layer at "
                          "the step (NaN without running statistics), channels concatenated in "
                          "module order"),
}

#: Variables every layer group has (format 2).
LAYER_VARS: dict[str, Var] = {
    "step": ROOT_VARS["step"],
    "lr": Var((), "float64", "learning rate of the layer's param group at this step"),
    "weight": Var((OUT, IN), "param", "weight matrix W before the update (convolutions: the "
                  "kernel reshaped to out x in*prod(kernel_size))"),
    "grad": Var((OUT, IN), "param", "gradient the optimizer applied (.grad at optimizer.step, "
                "after any clipping or unscaling); not stored where the sketch implies it",
                True),
    "update": Var((OUT, IN), "param", "update actually applied by the optimizer: W(after step) "
                  "- W; stored where update_stored is true, else derived from the next row's "
                  "weight"),
    "update_stored": Var((), "bool", "the update row is stored; elsewhere update = "
                         "weight(next row) - weight (checked bit for bit by the writer)"),
    "nonfinite": Var((), "bool", "the gradient or per-sample information held NaN or Inf"),
    "grad_scale": Var((), "float64", "factor c with .grad = c x (mean of the captured per-sample "
                      "gradients): 1 normally, 1/S under a GradScaler with scale S, the clip "
                      "coefficient under gradient clipping; the stored per-sample information "
                      "is already multiplied by c"),
}

#: Layer variables present only in runs recorded with a probe.
PROBE_VARS: dict[str, Var] = {
    "probe_grad": Var((OUT, IN), "param", "full-data gradient (NaN where no probe ran)"),
}

#: Variables that format-2 stores always have but older variants may lack, with the value a
#: reader gives them there.
DEFAULTS: dict[str, float] = {"grad_scale": 1.0}


@dataclass(frozen=True)
class RunLayout:
    """Which variables a run store holds, and how each is stored.

    Obtain with :meth:`for_meta` (writing) or :meth:`of_group` (reading an existing store).
    """

    meta: RunMeta
    variant: Variant

    @classmethod
    def for_meta(cls, meta: RunMeta) -> RunLayout:
        return cls(meta, _VARIANTS.get(meta.format_version, "v1-derived"))

    @classmethod
    def of_group(cls, group, meta: RunMeta) -> RunLayout:
        """The layout of an existing store (the format-1 variants are told apart here)."""
        if meta.format_version < 3 and CHUNKS_ARRAY in group:
            raise StoreCorruptError(
                f"this store says format version {meta.format_version}, but it holds the "
                f"chunk manifest {CHUNKS_ARRAY!r} that only format 3 writes: the root "
                "zarr.json was edited or is damaged (restore it from a copy)")
        newer = sorted({lm.sketch for lm in meta.layers} & FORMAT4_SKETCHES)
        if meta.format_version < 4 and newer:
            raise StoreCorruptError(
                f"this store says format version {meta.format_version}, but it holds layers "
                f"with the {newer[0]!r} sketch that only format 4 writes: the root zarr.json "
                "was edited or is damaged (restore it from a copy)")
        if meta.format_version >= 2:
            return cls(meta, _VARIANTS[meta.format_version])
        for lm in meta.layers:
            try:
                lg = group[f"{LAYERS_GROUP}/{lm.group}"]
            except KeyError:
                continue
            return cls(meta, "v1-derived" if "update_stored" in lg else "v1")
        return cls(meta, "v1-derived")

    # ------------------------------------------------------------------ variables
    @property
    def root_vars(self) -> dict[str, Var]:
        out = dict(ROOT_VARS)
        if self.bn_channels:
            out.update(BATCHNORM_VARS)
        return out

    @property
    def bn_channels(self) -> int:
        """Length of the ``bn_channel`` dimension: the channels of the model's BatchNorm
        layers (0 without any)."""
        bn = (self.meta.model or {}).get("batchnorm") or []
        return int(sum(int(b.get("channels") or 0) for b in bn))

    def sizes(self, sample_capacity: int) -> dict[str, int]:
        """Length of every root dimension after ``step``."""
        return {SAMPLE: sample_capacity, BN_CHANNEL: self.bn_channels}

    def layer_vars(self, lm: LayerMeta) -> dict[str, Var]:
        """Stored variables of one layer group."""
        out = dict(LAYER_VARS)
        if self.variant in ("v1", "v1-derived"):
            del out["grad_scale"]
        if self.variant == "v1":
            del out["update_stored"]
        if not lm.stored_grad:
            del out["grad"]
        out.update(sketch_kind(lm.sketch).variables(lm.rank))
        if self.meta.probe:
            out.update(PROBE_VARS)
        return out

    def derived_vars(self, lm: LayerMeta) -> tuple[str, ...]:
        """Variables a reader provides although they are not (all) stored."""
        stored = self.layer_vars(lm)
        derived = []
        if "update_stored" in stored:
            derived.append("update")
        if "grad" not in stored and sketch_kind(lm.sketch).implies_grad:
            derived.append("grad")
        derived += [k for k in DEFAULTS if k not in stored]
        return tuple(derived)

    def dtype(self, var: Var) -> np.dtype:
        """Storage dtype of a variable in this run."""
        if var.dtype == "param":
            return np.dtype(self.meta.dtype)
        if var.dtype == "ps":
            return np.dtype(self.meta.ps_dtype)
        return np.dtype(var.dtype)

    @property
    def checksummed(self) -> bool:
        """Every chunk carries a CRC32C checksum and every chunk inside the committed rows is
        written (a missing one is an error)."""
        return self.variant in ("v2", "v3", "v4")

    @property
    def position_bound(self) -> bool:
        """Each chunk's checksum is recorded for its array and position in the chunk manifest
        (a swapped or misplaced chunk file is an error)."""
        return self.variant in ("v3", "v4")

    @property
    def unchecked(self) -> str | None:
        """What a verification of this variant cannot check (None: everything is checked)."""
        if self.variant == "v2":
            return ("chunk positions are not checked (a format-2 store has no chunk manifest: "
                    "two swapped chunk files of one array would read as wrong values)")
        if self.variant in ("v1", "v1-derived"):
            return ("chunks carry no checksums (format 1): damaged or swapped chunk files "
                    "would read as wrong values")
        return None

    def array_paths(self) -> list[str]:
        """Path of every stored array, root variables first, then each layer's in order (the
        order of the chunk manifest's ``array`` axis)."""
        paths = list(self.root_vars)
        for lm in self.meta.layers:
            base = self.group_path(lm)
            paths += [f"{base}/{n}" for n in self.layer_vars(lm)]
        return paths

    def group_path(self, lm: LayerMeta) -> str:
        return f"{LAYERS_GROUP}/{lm.group}"


_VARIANTS: dict[int, Variant] = {2: "v2", 3: "v3", 4: "v4"}


def written_format(sketches: Iterable[str], newest: int) -> int:
    """The format version a new run store is written with: ``newest`` when a layer's sketch
    kind needs format 4 (:data:`FORMAT4_SKETCHES`), else at most 3 (readable by older
    trajlab)."""
    return newest if set(sketches) & FORMAT4_SKETCHES else min(newest, 3)


@dataclass(frozen=True)
class AnalysisLayout:
    """What an analysis store's format guarantees, and so what a reader can check.

    Obtain with :meth:`of_group` (an existing store) or :meth:`for_meta` (a new one).
    """

    meta: AnalysisMeta
    variant: AnalysisVariant

    @classmethod
    def for_meta(cls, meta: AnalysisMeta) -> AnalysisLayout:
        return cls(meta, _ANALYSIS_VARIANTS[meta.format_version])

    @classmethod
    def of_group(cls, group, meta: AnalysisMeta, where: str = "this store") -> AnalysisLayout:
        """The layout of an existing store; an a2 store holding a manifest is refused."""
        out = cls.for_meta(meta)
        if not out.position_bound and CHUNKS_ARRAY in group:
            raise StoreCorruptError(
                f"{where}: this analysis store says format version {meta.format_version}, but "
                f"it holds the chunk manifest {CHUNKS_ARRAY!r} that only analysis format 3 "
                "writes: its root zarr.json was edited or is damaged; recompute it with "
                "overwrite=True (`trajlab analyze RUN --out OUT --overwrite`)")
        return out

    @property
    def position_bound(self) -> bool:
        """Each chunk's checksum is recorded for its array and step chunk in the chunk
        manifest (a swapped or misplaced chunk file is an error)."""
        return self.variant == "a3"

    @property
    def unchecked(self) -> str | None:
        """What a verification of this variant cannot check (None: everything is checked)."""
        if self.variant == "a2":
            return ("chunk positions are not checked (an analysis store of format 2 has no "
                    "chunk manifest: two swapped chunk files of one array would read as wrong "
                    "values); recompute it with --overwrite to get a format-3 store")
        return None

    def array_paths(self) -> list[str]:
        """The arrays the manifest covers, in the order of its ``array`` axis: the stored
        variables (``step`` first), not the done-markers."""
        return list(self.meta.variables)


_ANALYSIS_VARIANTS: dict[int, AnalysisVariant] = {2: "a2", 3: "a3"}


def layer_group_name(name: str) -> str:
    """Group name for a recorded layer: its name with ``/`` and ``:`` made safe, ``"_root"`` for
    the model itself."""
    if not name:
        return "_root"
    return name.replace("/", "_").replace(":", "__")


__all__ = ["BATCHNORM_VARS", "DEFAULTS", "FORMAT4_SKETCHES", "LAYER_VARS", "PROBE_VARS",
           "ROOT_VARS", "AnalysisLayout", "AnalysisVariant", "RunLayout", "Variant",
           "layer_group_name", "written_format"]
