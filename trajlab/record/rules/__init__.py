"""Layer rules: how each supported module type exposes its weight matrix and per-sample gradients.

Supporting a new layer type is one file with a :class:`~trajlab.record.rules.base.LayerRule`
subclass and one entry in :data:`RULES` (exact-type dispatch, as in BackPACK). Module types with
parameters but without an entry are reported once as unsupported and not recorded.
"""

from __future__ import annotations

from torch import nn

from trajlab.record.rules.base import Capture, LayerRule
from trajlab.record.rules.conv2d import Conv2dRule
from trajlab.record.rules.linear import LinearRule

#: Exact module type -> rule. Subclasses of these types are *not* matched implicitly, since a
#: subclass may change what ``forward`` computes.
RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv2d: Conv2dRule(),
}


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``'s exact type, or None when the type is not supported."""
    return RULES.get(type(module))


__all__ = ["RULES", "Capture", "LayerRule", "rule_for"]
