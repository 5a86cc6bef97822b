"""The recorded layers: which are recorded (:func:`plan_layers`), and each one's typed state
during a recorded step (:class:`LayerState`).

:class:`LayerState` is what the recorder knows of one recorded matrix: its target (module,
rule, parameter), its metadata once described, and the current step's captures, basis, weight
before the update and assembled record. The recorder resets the per-step fields after every
recorded step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trajlab.errors import RecorderError, user_stacklevel
from trajlab.record.options import RecorderOptions
from trajlab.record.step import Assembled, Capture
from trajlab.record.summary import Target, mixing_layers, mixing_message, plan
from trajlab.sketches import SketchKind
from trajlab.store.metadata import LayerMeta


@dataclass(slots=True)
class LayerState:
    """One recorded matrix and its state during the current recorded step (slotted: a field
    not declared here cannot be set on it)."""

    target: Target
    meta: LayerMeta | None = None
    kind: SketchKind | None = None
    captures: list[Capture] = field(default_factory=list)
    basis: tuple[Tensor, Tensor, Tensor] | None = None
    weight_before: Tensor | None = None
    probe_r: Tensor | None = None
    assembled: Assembled | None = None  # this step's record once assembled (None: failed)
    failed: BaseException | None = None  # this step's capture failed (see assembly.py)
    dropped: bool = False  # left out at the first step (broadcast over the batch), hooks silent

    @property
    def name(self) -> str:
        return self.target.name

    def weight(self) -> Tensor:
        return self.target.rule.weight_matrix(self.target.module, self.target.matrix)

    def grad(self) -> Tensor | None:
        return self.target.rule.grad_matrix(self.target.module, self.target.matrix)


def untie(model: nn.Module, targets: list[Target], summary: dict[str, Any], *,
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
                  UserWarning, stacklevel=user_stacklevel())
    return keep


def plan_layers(model: nn.Module, optimizer: torch.optim.Optimizer, options: RecorderOptions
                ) -> tuple[list[LayerState], dict[str, Any]]:
    """The layers to record and the model summary (every module with parameters, recorded
    how or not why). Refuses complex parameters and, recording per sample, layers that mix
    the samples of a batch; warns (once per type and reason) about modules with parameters
    that are not recorded although no ``layers=`` selection left them out."""
    layers = options.layers
    targets, summary = plan(model, optimizer, layers, batch_dim=options.batch_dim)
    targets = untie(model, targets, summary, explicit=layers is not None)
    states = [LayerState(t) for t in targets]
    complex_ = [layer.name for layer in states if layer.target.param.is_complex()]
    if complex_:  # σ1 of a complex matrix and its SDE are not what trajlab computes
        raise RecorderError(
            f"complex parameters are not supported (layers {', '.join(complex_[:4])}"
            f"{' and more' if len(complex_) > 4 else ''} are complex): trajlab records "
            "real weight matrices; pass layers=[...] naming the real ones, or record a "
            "real-valued model")
    mixing = [] if not options.per_sample else mixing_layers(model)
    if mixing:  # refused before any other notice about the model
        raise RecorderError(mixing_message(mixing))
    skipped = [m for m in summary["modules"] if not m["recorded"]
               and m.get("why") != "not selected (layers=)"
               and not m.get("why", "").startswith("its weight is tied")]  # warned in untie
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
            stacklevel=user_stacklevel())
    return states, summary


__all__ = ["LayerState", "plan_layers", "untie"]
