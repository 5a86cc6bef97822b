"""Frozen, versioned metadata of run stores and analysis stores (read from / written to Zarr
attributes with ``from_dict`` / ``to_dict``).

* Run stores: format 2 is written; format 1 (the first release) is read. Format-1 stores come in
  two variants, told apart once, in :mod:`trajlab.store.layout`.
* Analysis stores: format 3 is written; format 2 is read (its variants are told apart in
  :class:`trajlab.store.layout.AnalysisLayout`); an analysis written by format 1 is refused with
  a message to recompute it (its layout cannot be resumed).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal

from trajlab.errors import StoreCorruptError, StoreError

FORMAT_VERSION: Literal[4] = 4
READABLE_FORMATS = (1, 2, 3, 4)
ANALYSIS_FORMAT_VERSION: Literal[3] = 3
READABLE_ANALYSIS_FORMATS = (2, 3)

Sampler = Literal["with_replacement", "reshuffle", "unknown"]
SAMPLERS = ("with_replacement", "reshuffle", "unknown")


def new_run_id() -> str:
    """A fresh identity for a run store (written once, at creation)."""
    return uuid.uuid4().hex


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """What a layer's linear map needs beyond its weight matrix (subclasses: one per kind)."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        names = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kw)


@dataclass(frozen=True)
class ConvGeometry(Geometry):
    """A convolution (1-D or 2-D, or transposed) on a fixed input size.

    ``kernel_shape`` is the parameter's shape as PyTorch stores it; the recorded matrix is it
    reshaped to (out, in * prod(kernel_size)) (transposed convolutions: (C_out, C_in * k) after
    swapping the first two axes).
    """

    kind: ClassVar[str] = "conv"
    kernel_shape: tuple[int, ...] = ()
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    padding_mode: str = "zeros"
    input_size: tuple[int, ...] = ()
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    @property
    def spatial_dims(self) -> int:
        return len(self.kernel_shape) - 2


_GEOMETRIES: dict[str, type[Geometry]] = {"conv": ConvGeometry}


def register_geometry(cls: type[Geometry]) -> type[Geometry]:
    """Make a geometry class readable from stored metadata by its ``kind``."""
    if not cls.kind:
        raise ValueError("a geometry class needs a non-empty `kind`")
    _GEOMETRIES[cls.kind] = cls
    return cls


def geometry_from_dict(d: dict[str, Any] | None) -> Geometry | None:
    if not d:
        return None
    kind = d.get("kind", "conv")  # format 1 stored conv geometry without a kind
    try:
        return _GEOMETRIES[kind].from_dict(d)
    except KeyError:
        raise StoreError(f"unknown layer geometry kind {kind!r} in the store's metadata; "
                         "upgrade trajlab") from None


# ----------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class LayerMeta:
    """What the store holds for one recorded weight matrix.

    Attributes
    ----------
    name : recorded name (the module name, or ``module:part`` when a module has several
        matrices, e.g. ``attn:q``).
    module : layer type (``"Linear"``, ``"Conv2d"``, ...).
    group : name of the layer's group under ``layers/``.
    sketch : sketch kind name (:mod:`trajlab.sketches`).
    shape : (out, in) of the weight matrix.
    rank : k of a subspace sketch (0 otherwise).
    positions : weight-sharing positions per sample seen at the first step.
    geometry : the layer's linear-map geometry (convolutions), or None.
    stored_grad : whether ``grad`` is stored (kinds that imply it exactly do not store it).
    param : the parameter (and slice) the matrix is read from, e.g. ``"weight"``.
    """

    name: str
    module: str
    group: str
    sketch: str
    shape: tuple[int, int]
    rank: int = 0
    positions: int = 1
    geometry: Geometry | None = None
    stored_grad: bool = True
    param: str = "weight"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["geometry"] = self.geometry.to_dict() if self.geometry is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerMeta:
        try:
            geo = d.get("geometry", d.get("conv"))  # format 1: "conv" dict
            return cls(
                name=str(d["name"]),
                module=str(d["module"]),
                group=str(d["group"]),
                sketch=str(d["sketch"]),
                shape=(int(d["shape"][0]), int(d["shape"][1])),
                rank=int(d.get("rank", 0)),
                positions=int(d.get("positions", 1)),
                geometry=geometry_from_dict(geo),
                stored_grad=bool(d.get("stored_grad", True)),
                param=str(d.get("param", "weight")),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise StoreCorruptError(f"a layer's metadata is malformed ({type(e).__name__}: {e}): "
                                    f"{d!r}") from e


# ----------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunMeta:
    """Run-level metadata stored in the root attributes under ``"trajlab"``.

    Attributes
    ----------
    format_version : 4 for stores written now with a layer that needs it (``rank1_basis``),
        else 3 (:func:`trajlab.store.layout.written_format`); 1 to 4 readable.
    run_id : identity of this recording, new at every creation (analyses are keyed to it).
    dtype : float dtype of weights and gradients as stored.
    ps_dtype : dtype of the per-sample variables (``dtype`` unless reduced precision was asked).
    every : optimizer steps per recorded row.
    chunk_steps : rows per chunk along ``step``.
    sampler, dataset_size : how batches were drawn, and N.
    layers : the recorded matrices.
    probe : the layer groups have ``probe_grad``.
    truncated : None, or why recording stopped early.
    model : what the recorder saw of the model: ``parameters`` and ``weight_parameters``
        (counts), ``modules`` (every module with parameters: name, type, parameters, and how it
        is recorded or why not) and ``not_a_bound`` (reasons the product of the recorded
        layers' norms does not bound the network, e.g. residual blocks or normalisation).
    """

    format_version: int
    dtype: str
    every: int
    chunk_steps: int
    sampler: str
    dataset_size: int | None
    layers: tuple[LayerMeta, ...]
    created: str
    trajlab_version: str
    torch_version: str
    user: dict[str, Any] = field(default_factory=dict)
    truncated: str | None = None
    probe: bool = True
    run_id: str = ""
    ps_dtype: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    kind: str = "run"

    def __post_init__(self) -> None:
        if not self.ps_dtype:
            object.__setattr__(self, "ps_dtype", self.dtype)

    def layer(self, name: str) -> LayerMeta:
        for lm in self.layers:
            if lm.name == name:
                return lm
        raise KeyError(
            f"unknown layer {name!r}; this run recorded: {', '.join(self.layer_names)}"
        )

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(lm.name for lm in self.layers)

    @property
    def identity(self) -> str:
        """What an analysis is keyed to: the run id (format 2) or the creation stamp (format 1)."""
        return self.run_id or f"created:{self.created}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [lm.to_dict() for lm in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "this store") -> RunMeta:
        if not isinstance(d, dict):
            raise StoreCorruptError(f"{where}: the 'trajlab' attribute is not a mapping ({d!r})")
        kind = d.get("kind", "run")
        if kind != "run":
            hint = ("; open it with trajlab.open_analysis, draw it with `trajlab plot`"
                    if kind == "analysis" else "")
            raise StoreError(f"{where} is a trajlab {kind} store, not a run store{hint}")
        version = d.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise StoreCorruptError(f"{where} has an invalid format version {version!r}")
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{where} has run-store format version {version}, newer than this trajlab reads "
                f"(up to {FORMAT_VERSION}); upgrade trajlab (pip install -U trajlab)"
            )
        if version not in READABLE_FORMATS:
            raise StoreCorruptError(f"{where} has an invalid format version {version!r}")
        try:
            return cls(
                format_version=version,
                dtype=str(d["dtype"]),
                every=int(d["every"]),
                chunk_steps=int(d["chunk_steps"]),
                sampler=d.get("sampler", "unknown"),
                dataset_size=d.get("dataset_size"),
                layers=tuple(LayerMeta.from_dict(x) for x in d["layers"]),
                created=d.get("created", ""),
                trajlab_version=d.get("trajlab_version", ""),
                torch_version=d.get("torch_version", ""),
                user=dict(d.get("user") or {}),
                truncated=d.get("truncated"),
                probe=bool(d.get("probe", True)),
                run_id=str(d.get("run_id") or ""),
                ps_dtype=str(d.get("ps_dtype") or d["dtype"]),
                model=dict(d.get("model") or {}),
            )._validated(where)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreCorruptError(f"{where}: the run metadata is malformed "
                                    f"({type(e).__name__}: {e})") from e

    def _validated(self, where: str) -> RunMeta:
        """Self, after checking every field against the format (types, ranges, consistency);
        :class:`~trajlab.errors.StoreCorruptError` naming the field otherwise."""
        import numpy as np

        def bad(name: str, value: Any, want: str) -> StoreCorruptError:
            return StoreCorruptError(
                f"{where}: the run metadata field {name!r} is {value!r}, but must be {want}; the "
                "store's root metadata (zarr.json) was edited or is damaged: restore it from a "
                "copy")

        for name in ("every", "chunk_steps"):
            if getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "a positive integer")
        for name in ("dtype", "ps_dtype"):
            value = getattr(self, name)
            try:
                ok = np.dtype(value).kind == "f"
            except TypeError:
                ok = False
            if not ok:
                raise bad(name, value, "a floating-point dtype name (float32, float64, ...)")
        ds = self.dataset_size
        if ds is not None and (isinstance(ds, bool) or not isinstance(ds, int) or ds < 1):
            raise bad("dataset_size", ds, "null or a positive integer")
        from trajlab.sketches import sketch_kinds

        known = sketch_kinds()
        for field_name in ("name", "group"):
            values = [getattr(lm, field_name) for lm in self.layers]
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise bad(f"layers[].{field_name}", dup[0],
                          "unique (two layers have it, and would read the same data)")
        for i, lm in enumerate(self.layers):
            if lm.shape[0] < 1 or lm.shape[1] < 1:
                raise bad(f"layers[{i}].shape", list(lm.shape), "two positive integers")
            if lm.rank < 0:
                raise bad(f"layers[{i}].rank", lm.rank, "a non-negative integer")
            if lm.positions < 1:
                raise bad(f"layers[{i}].positions", lm.positions, "a positive integer")
            if lm.sketch not in known:
                raise bad(f"layers[{i}].sketch", lm.sketch, f"one of {sorted(known)}")
        return self


# ----------------------------------------------------------------------------- analyses
@dataclass(frozen=True)
class AnalysisMeta:
    """Metadata of an analysis store (root attribute ``"trajlab"``).

    Attributes
    ----------
    run : where the analysed run store was (str).
    run_id : the run's identity (:attr:`RunMeta.identity`); a resumed analysis must match it.
    rows : (first, stop) rows of the run analysed.  steps : (first, last) step indices.
    layers : analysed layer names.  chunk_rows : rows per graph node.
    options : the analysis options (a dict of :class:`trajlab.analysis.AnalysisOptions`).
    variables : names of the stored variables.
    run_info : what the run's metadata says about the run (sampler, every, dataset size, user
        metadata such as hyper-parameters): coordinates of :func:`trajlab.open_analyses`.
    state : "layout" while being laid out, "ready" once every array exists, "complete" at the end.
    """

    run: str
    run_id: str
    rows: tuple[int, int]
    steps: tuple[int, int]
    layers: tuple[str, ...]
    chunk_rows: int
    options: dict[str, Any]
    variables: tuple[str, ...] = ()
    run_info: dict[str, Any] = field(default_factory=dict)
    state: Literal["layout", "ready", "complete"] = "layout"
    created: str = ""
    trajlab_version: str = ""
    format_version: int = ANALYSIS_FORMAT_VERSION
    kind: str = "analysis"

    @property
    def complete(self) -> bool:
        return self.state == "complete"

    def signature(self) -> dict[str, Any]:
        """What must match for a stored analysis to be resumed or reused."""
        return {"run_id": self.run_id, "rows": list(self.rows), "steps": list(self.steps),
                "layers": list(self.layers), "chunk_rows": self.chunk_rows,
                "options": dict(self.options)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"], d["steps"], d["layers"] = list(self.rows), list(self.steps), list(self.layers)
        d["variables"] = list(self.variables)
        return d

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "this store") -> AnalysisMeta:
        if not isinstance(d, dict) or d.get("kind") != "analysis":
            raise StoreError(f"{where} is not a trajlab analysis store")
        version = d.get("format_version", 0)
        if not isinstance(version, int) or version > ANALYSIS_FORMAT_VERSION:
            raise StoreError(f"{where} has analysis format {version!r}, newer than this trajlab "
                             "reads; upgrade trajlab")
        if version < READABLE_ANALYSIS_FORMATS[0]:
            raise StoreError(
                f"{where} was written by an older trajlab (analysis format {version}) and cannot "
                "be resumed or read by this one; recompute it with overwrite=True "
                "(`trajlab analyze RUN --out OUT --overwrite`)"
            )
        try:
            return cls(
                run=str(d["run"]), run_id=str(d["run_id"]),
                rows=(int(d["rows"][0]), int(d["rows"][1])),
                steps=(int(d["steps"][0]), int(d["steps"][1])),
                layers=tuple(d["layers"]), chunk_rows=int(d["chunk_rows"]),
                options=dict(d["options"]), variables=tuple(d.get("variables", ())),
                run_info=dict(d.get("run_info") or {}),
                state=d.get("state", "layout"), created=d.get("created", ""),
                trajlab_version=d.get("trajlab_version", ""), format_version=version,
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise StoreCorruptError(f"{where}: the analysis metadata is malformed "
                                    f"({type(e).__name__}: {e})") from e
