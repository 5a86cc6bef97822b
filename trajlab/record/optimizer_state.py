"""What the analysis needs to know about the optimizer: its SDE's parameters (docs/math.md §8).

The recorder stores :meth:`trajlab.sde.optimizer.OptimizerSpec.to_dict` of the recorded layers'
param group in the run's user metadata under ``"optimizer_spec"`` (a few hundred bytes once
per run); the analysis reads it to choose the SDE of its forward prediction. Where no spec is
known (another optimizer, param groups whose hyper-parameters differ) it stores the reason
under ``"optimizer_spec_unavailable"`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

SPEC_KEY = "optimizer_spec"
UNAVAILABLE_KEY = "optimizer_spec_unavailable"


def with_optimizer_spec(user: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                        params: Sequence[torch.Tensor]) -> dict[str, Any]:
    """``user`` plus the spec of the optimizer's param group(s) holding ``params`` (a spec
    the user put there is kept)."""
    from trajlab.sde.optimizer import OptimizerSpec

    out = dict(user)
    if SPEC_KEY in out:
        return out
    ids = {id(p) for p in params}
    groups = [i for i, g in enumerate(optimizer.param_groups)
              if any(id(p) in ids for p in g["params"])]
    try:
        specs = {OptimizerSpec.from_optimizer(optimizer, i) for i in groups}
    except (ValueError, KeyError, TypeError) as e:
        out[UNAVAILABLE_KEY] = str(e)
        return out
    if len(specs) != 1:
        out[UNAVAILABLE_KEY] = ("the recorded layers are in param groups with different "
                                "optimizer hyper-parameters")
        return out
    out[SPEC_KEY] = specs.pop().to_dict()
    return out
