"""nn.Linear recorded with the ``rank1_basis`` sketch where its shape makes that smaller (opt-in).

:class:`LinearBasisRule` describes a Linear layer on (batch, features) inputs with the
``rank1_basis`` sketch (:class:`~trajlab.sketches.Rank1Basis`: per-sample statistics in W's
singular basis) when its per-sample bytes are at least ``min_saving`` times smaller than the
``rank1`` factors' (:func:`~trajlab.sketches.rank1_basis.shape_saving`), else as
:class:`~trajlab.record.rules.linear.LinearRule` does. Opt in for every Linear layer with::

    trajlab.register_rule(torch.nn.Linear, LinearBasisRule(), overwrite=True)

and back with ``register_rule(torch.nn.Linear, LinearRule(), overwrite=True)``.
"""

from __future__ import annotations

from trajlab.record.rules.base import Description
from trajlab.record.rules.linear import LinearRule
from trajlab.sketches import Rank1, Rank1Basis
from trajlab.sketches.rank1_basis import shape_saving


class LinearBasisRule(LinearRule):
    """:class:`LinearRule` with the ``rank1_basis`` sketch for layers it makes smaller.

    Parameters
    ----------
    min_saving : use ``rank1_basis`` when ``rank1``'s bytes per sample over its own are at
        least this (float32 per-sample storage assumed; its statistics are float64). 0 uses it
        for every Linear layer on (batch, features) inputs.
    """

    def __init__(self, min_saving: float = 2.0) -> None:
        self.min_saving = float(min_saving)

    def describe(self, module, matrix, args, kwargs) -> Description:
        desc = super().describe(module, matrix, args, kwargs)
        if desc.sketch != Rank1.name:
            return desc
        m, n = (int(d) for d in module.weight.shape)
        if shape_saving((m, n)) < self.min_saving:
            return desc
        return Description(Rank1Basis.name, 1, None, rank=min(m, n))
