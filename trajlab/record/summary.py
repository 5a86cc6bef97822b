"""What the recorder will record of a model: every parametrised module, recorded (how) or not
(why), layers that mix samples, and why the product of the recorded norms may not bound the
network. Pure inspection of the model: nothing is changed or installed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trajlab.errors import RecorderError
from trajlab.record.batchnorm import BATCHNORM, batchnorm_meta
from trajlab.record.rules import LayerRule, Matrix, rule_for, supported_types

#: Module types whose train mode mixes the samples of a batch.
SAMPLE_MIXING: tuple[type[nn.Module], ...] = BATCHNORM
#: Normalisation layers that no factor of K_net bounds (BatchNorm's eval-mode factor is in K_net).
_NORMS = (nn.LayerNorm, nn.GroupNorm,
          nn.modules.instancenorm._InstanceNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm")
                                                   else ()))
_ATTENTION = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_RESIDUAL_NAMES = ("BasicBlock", "Bottleneck", "ResidualBlock", "ResBlock",
                   "TransformerEncoderLayer", "TransformerDecoderLayer")


@dataclass
class Target:
    """One recorded weight matrix."""

    name: str
    module_name: str
    module: nn.Module
    rule: LayerRule
    matrix: Matrix
    sample_axis: int = 0  # where the samples are in the module's first input and output

    @property
    def param(self) -> torch.Tensor:
        return self.rule.parameter(self.module, self.matrix)


class ModelSummary(dict):
    """What the recorder records of a model (``rec.summary``): a dict, as stored in the run's
    metadata (``parameters``, ``weight_parameters``, ``modules``, ``not_a_bound``), that prints
    as a readable table: recorded modules (how), modules not recorded (why), and why the
    product of the recorded norms may not bound the network. Long lists are cut to
    :attr:`SHOWN` rows each (``summary["modules"]`` holds all)."""

    SHOWN = 12

    def __repr__(self) -> str:
        mods = list(self.get("modules") or [])
        rec = [m for m in mods if m.get("recorded")]
        skipped = [m for m in mods if not m.get("recorded")]
        total = int(self.get("weight_parameters") or 0)
        covered = sum(int(m.get("recorded_parameters") or 0) for m in rec)
        share = f" ({100 * covered / total:.0f}%)" if total else ""
        lines = [(f"trajlab model summary: {len(rec)} of {len(mods)} modules with parameters "
                  f"recorded; {covered:,} of {total:,} weight-matrix parameters{share}")]
        width = min(32, max((len(m.get("name") or "<model>") for m in mods), default=7))
        kind = min(18, max((len(str(m.get("type", ""))) for m in mods), default=4))

        def row(m: dict[str, Any], text: str) -> str:
            name = _shorten(m.get("name") or "<model>", width)
            return (f"    {name:<{width}}  {_shorten(str(m.get('type', '')), kind):<{kind}}  "
                    f"{int(m.get('parameters') or 0):>10,} params  {text}")

        for title, group, text in (("recorded", rec, lambda m: _shorten(m.get("how", ""), 90)),
                                   ("not recorded", skipped, lambda m: m.get("why", ""))):
            if not group:
                continue
            lines.append(f"  {title} ({len(group)}):")
            lines += [row(m, text(m)) for m in group[:self.SHOWN]]
            if len(group) > self.SHOWN:
                lines.append(f"    ... and {len(group) - self.SHOWN} more "
                             "(summary['modules'] lists every module)")
        for why in self.get("not_a_bound") or []:
            lines.append(f"  K_net is not a Lipschitz bound: {why}")
        bn = self.get("batchnorm") or []
        if bn:
            lines.append(f"  BatchNorm ({len(bn)} layers): gamma and running_var recorded; K_net "
                         + ("leaves out their eval-mode factor (not a chain)"
                            if self.get("not_a_bound") else "includes their eval-mode factor "
                            "max|gamma|/sqrt(running_var+eps)"))
        return "\n".join(lines)

    __str__ = __repr__

    def _repr_pretty_(self, p, cycle: bool) -> None:  # IPython / Jupyter
        p.text("ModelSummary(...)" if cycle else repr(self))


def _shorten(text: str, n: int) -> str:
    """``text`` cut in the middle to ``n`` characters ("…" marks the cut)."""
    text = str(text)
    if len(text) <= n:
        return text
    head = (n - 1) // 2
    return text[:head] + "…" + text[len(text) - (n - 1 - head):]


def _name(matrix_part: str, module_name: str) -> str:
    return f"{module_name}:{matrix_part}" if matrix_part else module_name


_SEQ_FIRST_FAMILY = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                     nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


def sample_axis(modules: dict[str, nn.Module], name: str,
                batch_dim: int | dict[str, int] | None) -> int:
    """The axis of a module's input that indexes samples: ``batch_dim`` when given (one int for
    every layer, or per layer name), else 1 inside PyTorch's Transformer modules built with
    ``batch_first=False`` (their default), else 0."""
    if isinstance(batch_dim, dict):
        if name in batch_dim:
            return int(batch_dim[name])
    elif batch_dim is not None:
        return int(batch_dim)
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        anc = modules.get(".".join(parts[:i]))
        if isinstance(anc, _SEQ_FIRST_FAMILY):
            first = _batch_first(anc)
            return 0 if first is None or first else 1
    return 0


def _batch_first(module: nn.Module) -> bool | None:
    """``batch_first`` of a PyTorch Transformer module (stored on its attention layers)."""
    if hasattr(module, "batch_first"):
        return bool(module.batch_first)
    attn = getattr(module, "self_attn", None)
    if attn is not None and hasattr(attn, "batch_first"):
        return bool(attn.batch_first)
    layers = getattr(module, "layers", None)
    if layers is not None and len(layers):
        return _batch_first(layers[0])
    return None


def plan(model: nn.Module, optimizer: torch.optim.Optimizer, names: Sequence[str] | None,
         *, batch_dim: int | dict[str, int] | None = None
         ) -> tuple[list[Target], dict[str, Any]]:
    """The matrices to record and the model summary stored in the run's metadata.

    Parameters
    ----------
    model, optimizer : as given to the Recorder.
    names : recorded names to select (module names, or ``module:part``), None for all.

    Returns
    -------
    targets : the recorded matrices, in module order.
    summary : a :class:`ModelSummary` (a dict that prints as a table): ``parameters``,
        ``weight_parameters``, ``modules`` (name, type, parameters, recorded,
        recorded_parameters, how or why), ``not_a_bound`` (reasons).
    """
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    modules = dict(model.named_modules())
    claimed: set[str] = set()
    inside: dict[str, str] = {}  # child -> parent whose forward uses the child's weight directly
    for mname, m in modules.items():
        rule = rule_for(m)
        if rule is not None:
            claimed.update(f"{mname}.{c}" if mname else c for c in rule.claims(m))
        elif isinstance(m, nn.MultiheadAttention):
            for c, _ in m.named_children():
                inside[f"{mname}.{c}" if mname else c] = f"{mname} (MultiheadAttention)"
    candidates: list[Target] = []
    entries: list[dict[str, Any]] = []
    for mname, m in modules.items():
        own = list(m.parameters(recurse=False))
        if mname in claimed:
            continue
        rule = rule_for(m)
        n_params = sum(p.numel() for p in own)
        if rule is not None:  # children a rule records as part of its module (attention's
            for c in rule.claims(m):  # out_proj) count with it
                child = modules.get(f"{mname}.{c}" if mname else c)
                if child is not None:
                    n_params += sum(p.numel() for p in child.parameters())
        if mname in inside:
            entries.append({"name": mname, "type": type(m).__name__, "parameters": n_params,
                            "recorded": False, "why": f"its weight is used directly by "
                            f"{inside[mname]}, which no rule covers (its forward is never "
                            "called)"})
            continue
        if rule is None and isinstance(m, BATCHNORM) and own:
            entries.append({"name": mname, "type": type(m).__name__, "parameters": n_params,
                            "recorded": False, "why": _batchnorm_why(m)})
            continue
        if rule is None:
            if own:
                entries.append({"name": mname, "type": type(m).__name__, "parameters": n_params,
                                "recorded": False, "why": "no rule for this module type "
                                f"(trajlab records {supported_types()}; add one with "
                                "trajlab.register_rule)"})
            continue
        why = rule.refuse(m)
        matrices = [] if why else rule.matrices(m)
        if not why:
            params = [rule.parameter(m, mx) for mx in matrices]
            if all(not p.requires_grad for p in params):
                why = "frozen (requires_grad=False)"
            elif all(id(p) not in in_opt for p in params):
                why = "its weight is not among the optimizer's parameters"
        if why:
            entries.append({"name": mname, "type": type(m).__name__, "parameters": n_params,
                            "recorded": False, "why": why})
            continue
        rec = 0
        for mx in matrices:
            candidates.append(Target(_name(mx.part, mname), mname, m, rule, mx,
                                     sample_axis(modules, mname, batch_dim)))
            rec += rule.matrix_numel(m, mx)
        entries.append({"name": mname, "type": type(m).__name__, "parameters": n_params,
                        "recorded": True, "recorded_parameters": rec,
                        "how": f"{rule.how(m)}: "
                        + ", ".join(_name(mx.part, mname) for mx in matrices)})
    if names is not None:
        names = [names] if isinstance(names, str) else list(names)  # a name, not its letters
        if not names:
            raise ValueError("layers=[] selects nothing; pass None to record every layer")
        by_name = {t.name: t for t in candidates}
        by_module: dict[str, list[Target]] = {}
        for t in candidates:
            by_module.setdefault(t.module_name, []).append(t)
        chosen: list[Target] = []
        for n in names:
            if n in by_name:
                chosen.append(by_name[n])
            elif n in by_module:
                chosen.extend(by_module[n])
            elif n in modules:
                entry = next((e for e in entries if e["name"] == n), None)
                why = entry["why"] if entry else "it has no parameters"
                raise ValueError(f"layer {n!r} ({type(modules[n]).__name__}) cannot be "
                                 f"recorded: {why}")
            else:
                raise ValueError(f"unknown layer name(s) [{n!r}]; recordable layers of this "
                                 f"model: {[t.name for t in candidates]}")
        keep = {t.name for t in chosen}
        for e in entries:
            if e.get("recorded") and not any(t.module_name == e["name"] and t.name in keep
                                             for t in candidates):
                e.update(recorded=False, recorded_parameters=0, why="not selected (layers=)")
        candidates = [t for t in candidates if t.name in keep]
    if not candidates and entries and all(
            e["why"] == "its weight is not among the optimizer's parameters"
            for e in entries if not e["recorded"] and rule_for_name(modules, e["name"])):
        raise RecorderError("none of the model's layers is among the optimizer's parameters: "
                            "pass the optimizer that trains this model")
    if not candidates:
        raise RecorderError(f"{type(model).__name__} has no layer trajlab can record (trajlab "
                            f"records {supported_types()}): "
                            + "; ".join(f"{e['name'] or '<model>'}: {e['why']}"
                                        for e in entries if not e["recorded"])[:500])
    total = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    summary = ModelSummary(
        parameters=int(sum(p.numel() for p in model.parameters())),
        weight_parameters=int(total),
        modules=entries,
        not_a_bound=not_a_bound(model),
    )
    bn = batchnorm_meta(model)
    if bn:  # the recorder stores their gamma and running_var (trajlab.record.batchnorm)
        summary["batchnorm"] = bn
    return candidates, summary


def _batchnorm_why(m: nn.Module) -> str:
    """Why a BatchNorm layer is not a recorded layer, and what of it enters K_net."""
    mode = "train" if m.training else "eval"
    if m.running_var is None:
        return (f"BatchNorm in {mode} mode without running statistics "
                "(track_running_stats=False): no eval-mode factor bounds it")
    return (f"BatchNorm in {mode} mode: its eval-mode factor max|gamma|/sqrt(running_var+eps) is "
            "recorded at each recorded step and enters K_net where the network is a chain; "
            "gamma has no SDE terms")


def rule_for_name(modules: dict[str, nn.Module], name: str) -> bool:
    return rule_for(modules[name]) is not None


def not_a_bound(model: nn.Module) -> list[str]:
    """Reasons the product of the layers' sigma_1 is not a Lipschitz bound of ``model``
    (detected from known module types; residual connections in custom code are not
    detectable and are stated as a condition in the analysis instead)."""
    out = []
    kinds = {type(m) for m in model.modules()}
    if any(issubclass(k, _ATTENTION) for k in kinds):
        out.append("it contains attention, whose Lipschitz constant is not bounded by its "
                   "weight norms")
    if any(issubclass(k, _NORMS) for k in kinds):
        out.append("it contains normalisation layers, which are not 1-Lipschitz in general")
    free = [n or "<model>" for n, m in model.named_modules()
            if isinstance(m, BATCHNORM) and m.running_var is None]
    if free:
        out.append("BatchNorm layers without running statistics (track_running_stats=False) "
                   f"normalise by batch statistics also in eval mode: {_names(free)}")
    if any(k.__name__ in _RESIDUAL_NAMES for k in kinds):
        out.append("it contains residual blocks (x + f(x) is bounded by 1 + Lip(f), not by "
                   "Lip(f))")
    return out


def mixing_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that mix the samples of a batch in their current mode (BatchNorm in train mode)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, SAMPLE_MIXING) and m.training]


#: Names a message lists before "and N more".
SHOWN_NAMES = 8


def _names(names: Sequence[str]) -> str:
    """``a, b, c`` (the first :data:`SHOWN_NAMES`, then "and N more")."""
    names = list(names)
    more = len(names) - SHOWN_NAMES
    return ", ".join(names[:SHOWN_NAMES]) + (f" and {more} more" if more > 0 else "")


def mixing_message(found: list[tuple[str, nn.Module]]) -> str:
    """The refusal of a model whose layers mix the samples of a batch: every such layer is
    counted, the first :data:`SHOWN_NAMES` named ("and N more")."""
    names = _names([f"{n or '<model>'} ({type(m).__name__})" for n, m in found])
    return (f"layers that mix the samples of a batch in train mode ({len(found)}): {names}; "
            "per-sample gradients are not defined for this model. "
            "Record weights, batch gradients and updates only with Recorder(..., "
            "per_sample=False) (the analysis then gives K, the flow drift and the pathwise "
            "terms, without noise terms, and K_net includes each BatchNorm's eval-mode factor), "
            "or put these layers in eval mode, or use GroupNorm/LayerNorm")
