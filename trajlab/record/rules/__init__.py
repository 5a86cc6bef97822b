"""Layer rules: how each module type exposes its weight matrices and per-sample gradients.

A rule is one class (:class:`~trajlab.record.rules.base.LayerRule`) registered for a module
type with :func:`register_rule`. Dispatch is by type: the rule registered for the module's
exact type wins, else the nearest registered base class whose rule accepts subclasses (a Linear
subclass is recorded as a Linear unless a rule for it is registered). Every module with
parameters that no rule covers is listed, with the reason, in the recorder's summary and in
``trajlab info``.
"""

from __future__ import annotations

from torch import nn

from trajlab.record.rules.attention import MultiheadAttentionRule
from trajlab.record.rules.base import (
    Dense,
    Description,
    Diagonal,
    LayerRule,
    Matrix,
    Patches,
    PerSample,
    Rows,
    rank1_sketch,
    subspace_sketch,
)
from trajlab.record.rules.conv1d import Conv1dRule
from trajlab.record.rules.conv2d import Conv2dRule
from trajlab.record.rules.conv_transpose2d import ConvTranspose2dRule
from trajlab.record.rules.embedding import EmbeddingRule
from trajlab.record.rules.generic import GenericRule, matrix_parameters
from trajlab.record.rules.hf import OPTIONAL_RULES, HFConv1DRule
from trajlab.record.rules.linear import LinearRule
from trajlab.record.rules.norm import GroupNormRule, LayerNormRule, RMSNormRule

_RULES: dict[type[nn.Module], LayerRule] = {}
_FALLBACKS: dict[type[nn.Module], GenericRule] = {}
#: Rules of classes from optional libraries (transformers' Conv1D), made at their first look-up
#: (see :data:`trajlab.record.rules.hf.OPTIONAL_RULES`); kept apart from ``rules()``, which lists
#: the rules trajlab always registers.
_OPTIONAL: dict[type[nn.Module], LayerRule | None] = {}


def register_rule(module_type: type[nn.Module], rule: LayerRule, *,
                  overwrite: bool = False) -> LayerRule:
    """Record modules of ``module_type`` (and, if ``rule.subclasses``, its subclasses) with
    ``rule``.

    Parameters
    ----------
    module_type : a subclass of ``torch.nn.Module``.
    rule : a :class:`LayerRule` instance.
    overwrite : replace a rule already registered for exactly this type.

    Examples
    --------
    >>> class MyRule(trajlab.record.rules.LinearRule):  # doctest: +SKIP
    ...     module_type = "MyLinear"
    >>> trajlab.register_rule(MyLinear, MyRule())  # doctest: +SKIP
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"rule must be a trajlab LayerRule instance, got {type(rule).__name__}")
    if module_type in _RULES and not overwrite:
        raise ValueError(f"a rule is already registered for {module_type.__name__} "
                         f"({type(_RULES[module_type]).__name__}); pass overwrite=True to "
                         "replace it")
    _RULES[module_type] = rule
    return rule


def unregister_rule(module_type: type[nn.Module]) -> None:
    """Remove the rule registered for exactly ``module_type`` (tests, experiments)."""
    _RULES.pop(module_type, None)


def rule_for(module: nn.Module, *, fallback: bool = True) -> LayerRule | None:
    """The rule for ``module``: its exact type's, else the nearest base class's whose rule
    accepts subclasses, else (``fallback``) the generic torch.func rule when the module has 2-D
    parameters of its own; None when nothing covers it."""
    t = type(module)
    if t in _RULES:
        return _RULES[t]
    for base in t.__mro__[1:]:
        rule = _RULES.get(base)
        if rule is not None and rule.subclasses:
            return rule
    rule = _optional_rule(t)
    if rule is not None:
        return rule
    if fallback and matrix_parameters(module):
        if t not in _FALLBACKS:
            _FALLBACKS[t] = GenericRule(f"generic:{t.__name__}")
        return _FALLBACKS[t]
    return None


def _optional_rule(t: type[nn.Module]) -> LayerRule | None:
    """The rule of an optional library's class (or of a subclass of one), made once per type."""
    if t not in _OPTIONAL:
        _OPTIONAL[t] = None
        for base in t.__mro__:
            make = OPTIONAL_RULES.get((base.__module__, base.__qualname__))
            if make is not None:
                _OPTIONAL[t] = make()
                break
    return _OPTIONAL[t]


def rules() -> dict[type[nn.Module], LayerRule]:
    """Every registered rule by module type."""
    return dict(_RULES)


def supported_types() -> str:
    """The registered module types, for messages ("Linear, Conv2d, ...")."""
    return ", ".join(sorted({r.module_type or t.__name__ for t, r in _RULES.items()}))


register_rule(nn.Linear, LinearRule())
register_rule(nn.Conv1d, Conv1dRule())
register_rule(nn.Conv2d, Conv2dRule())
register_rule(nn.ConvTranspose2d, ConvTranspose2dRule())
register_rule(nn.MultiheadAttention, MultiheadAttentionRule())
register_rule(nn.Embedding, EmbeddingRule())
register_rule(nn.LayerNorm, LayerNormRule())
register_rule(nn.GroupNorm, GroupNormRule())
if hasattr(nn, "RMSNorm"):
    register_rule(nn.RMSNorm, RMSNormRule())

__all__ = [
    "Conv1dRule",
    "Conv2dRule",
    "ConvTranspose2dRule",
    "Dense",
    "Description",
    "Diagonal",
    "EmbeddingRule",
    "GenericRule",
    "GroupNormRule",
    "HFConv1DRule",
    "LayerNormRule",
    "LayerRule",
    "LinearRule",
    "Matrix",
    "MultiheadAttentionRule",
    "Patches",
    "PerSample",
    "RMSNormRule",
    "Rows",
    "rank1_sketch",
    "register_rule",
    "rule_for",
    "rules",
    "subspace_sketch",
    "supported_types",
    "unregister_rule",
]
