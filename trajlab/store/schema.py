"""Names, shapes and metadata of the run store (format version 1).

Everything the writer and the readers agree on is defined here once: dimension names, variable
names, which variables each sketch kind has, and the frozen metadata classes read from and written
to the root group's attributes. docs/format.md describes the same layout for readers without
trajlab.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FORMAT_VERSION: Literal[1] = 1
#: Key of the root group's attribute that holds :class:`RunMeta`.
ATTR_KEY = "trajlab"
#: Key of the root attribute holding the number of committed rows (the commit marker).
COMMIT_KEY = "trajlab_committed"
LAYERS_GROUP = "layers"

# Dimension names (shared by every reader).
STEP = "step"
SAMPLE = "sample"
OUT = "out"
IN = "in"
RANK = "rank"

SketchKind = Literal["rank1", "subspace"]
Sampler = Literal["with_replacement", "reshuffle", "unknown"]

#: Root-level variables: name -> (dims after `step`, dtype or None for the model's float dtype).
ROOT_VARS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "step": ((), "int64"),
    "lr": ((), "float64"),
    "batch_size": ((), "int32"),
    "loss": ((), "float64"),
    "indices": ((SAMPLE,), "int64"),
    "probe": ((), "bool"),
}

#: Variables every layer group has.
LAYER_VARS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "step": ((), "int64"),
    "lr": ((), "float64"),
    "weight": ((OUT, IN), None),
    "grad": ((OUT, IN), None),
    "update": ((OUT, IN), None),
    "update_stored": ((), "bool"),
    "nonfinite": ((), "bool"),
}

#: Layer variables that exist only in some stores.
OPTIONAL_LAYER_VARS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "probe_grad": ((OUT, IN), None),  # only when the run was recorded with a probe
}

#: Per-sample variables, by sketch kind.
SKETCH_VARS: dict[str, dict[str, tuple[tuple[str, ...], str | None]]] = {
    # G_i = outer(ps_grad_out[i], ps_input[i]) exactly.
    "rank1": {
        "ps_grad_out": ((SAMPLE, OUT), None),
        "ps_input": ((SAMPLE, IN), None),
    },
    # Projections of G_i onto the top-k singular subspaces (U, V) of the weight at that step.
    "subspace": {
        "basis_u": ((OUT, RANK), None),
        "basis_v": ((IN, RANK), None),
        "basis_residual": ((), "float64"),
        "ps_proj_out": ((SAMPLE, OUT, RANK), None),  # G_i V
        "ps_proj_in": ((SAMPLE, IN, RANK), None),  # G_i^T U
        "ps_sqnorm": ((SAMPLE,), None),  # ||G_i||_F^2
        "grad_sq_sum": ((OUT, IN), None),  # sum_i G_i**2 (elementwise)
    },
}

#: Meanings, written as each array's ``description`` attribute.
DESCRIPTIONS: dict[str, str] = {
    "step": "optimizer step index (number of optimizer.step() calls before this one)",
    "lr": "learning rate read from the optimizer's param group at this step",
    "batch_size": "number of samples in the batch",
    "loss": "training loss passed to Recorder.log (NaN when not given)",
    "indices": "dataset indices of the batch's samples (-1 = padding or not given)",
    "probe": "whether a full-data gradient probe was computed at this step",
    "weight": "weight matrix W before the update (Conv2d: kernel reshaped to out x in*kh*kw)",
    "update_stored": "the update row is stored; elsewhere update = weight(next row) - weight "
    "(the next row is the next optimizer step and starts from exactly the weights this step "
    "left, checked by the writer; trajlab.open_run derives it)",
    "grad": "batch-mean gradient of the loss w.r.t. W (.grad at optimizer.step); not stored "
    "for rank-1 layers (stored_grad false), where it is the mean of outer(ps_grad_out, ps_input)",
    "update": "update actually applied by the optimizer: W(after step) - W; stored where "
    "update_stored is true, else derived from the next row's weight",
    "probe_grad": "full-data gradient (NaN where no probe ran)",
    "nonfinite": "the gradient or per-sample information held NaN or Inf",
    "ps_grad_out": "per-sample output gradient (scaled by batch size): G_i = outer(ps_grad_out, ps_input)",
    "ps_input": "per-sample layer input",
    "basis_u": "orthonormal top-k left singular vectors U of W used for the sketch",
    "basis_v": "orthonormal top-k right singular vectors V of W used for the sketch",
    "basis_residual": "max_j ||W v_j - s_j u_j|| / s_1 of the basis (0 = exact singular vectors)",
    "ps_proj_out": "per-sample gradient times V: G_i V",
    "ps_proj_in": "per-sample gradient transposed times U: G_i^T U",
    "ps_sqnorm": "squared Frobenius norm of each per-sample gradient",
    "grad_sq_sum": "sum over samples of the elementwise square of the per-sample gradients",
}


@dataclass(frozen=True)
class LayerMeta:
    """What the store holds for one layer.

    Attributes
    ----------
    name : module name in ``model.named_modules()``.
    module : layer type (``"Linear"``, ``"Conv2d"``).
    group : name of the layer's group under ``layers/`` (the module name, or ``"_root"``).
    sketch : ``"rank1"`` (exact per-sample factors) or ``"subspace"`` (top-k projections).
    shape : (out, in) of the weight matrix.
    rank : k of the subspace sketch (0 for rank1).
    positions : number of weight-sharing positions per sample seen at the first step.
    conv : Conv2d geometry (kernel_size, stride, padding, dilation, padding_mode, input_size), else {}.
    stored_grad : whether ``grad`` is stored; rank-1 layers imply it exactly through their
        per-sample factors (checked on the first step), so by default it is not stored there.
    """

    name: str
    module: str
    group: str
    sketch: SketchKind
    shape: tuple[int, int]
    rank: int = 0
    positions: int = 1
    conv: dict[str, Any] = field(default_factory=dict)
    stored_grad: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerMeta:
        return cls(
            name=d["name"],
            module=d["module"],
            group=d["group"],
            sketch=d["sketch"],
            shape=(int(d["shape"][0]), int(d["shape"][1])),
            rank=int(d.get("rank", 0)),
            positions=int(d.get("positions", 1)),
            conv=dict(d.get("conv", {})),
            stored_grad=bool(d.get("stored_grad", True)),
        )


@dataclass(frozen=True)
class RunMeta:
    """Run-level metadata stored in the root attributes under ``"trajlab"``.

    ``probe``: the layer groups have ``probe_grad`` (a full-data gradient probe was set up).
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [lm.to_dict() for lm in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunMeta:
        return cls(
            format_version=int(d["format_version"]),
            dtype=d["dtype"],
            every=int(d["every"]),
            chunk_steps=int(d["chunk_steps"]),
            sampler=d.get("sampler", "unknown"),
            dataset_size=d.get("dataset_size"),
            layers=tuple(LayerMeta.from_dict(x) for x in d["layers"]),
            created=d.get("created", ""),
            trajlab_version=d.get("trajlab_version", ""),
            torch_version=d.get("torch_version", ""),
            user=dict(d.get("user", {})),
            truncated=d.get("truncated"),
            probe=bool(d.get("probe", True)),
        )


def layer_group_name(module_name: str) -> str:
    """Group name for a module: its dotted name, ``"_root"`` for the model itself."""
    return module_name if module_name else "_root"


def layer_vars(
    sketch: str, stored_grad: bool = True, probe: bool = True
) -> dict[str, tuple[tuple[str, ...], str | None]]:
    """All variables of a layer group with the given sketch kind (as created now)."""
    out = {**LAYER_VARS, **SKETCH_VARS[sketch]}
    if not stored_grad:
        del out["grad"]
    if probe:
        out.update(OPTIONAL_LAYER_VARS)
    return out
