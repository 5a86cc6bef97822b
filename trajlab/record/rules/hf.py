"""``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ...): a Linear layer whose weight is stored
transposed, ``(in, out)``; its forward is ``x @ weight + bias`` over the last axis.

The rule is the Linear rule with the matrix read as ``weight.T`` (out, in): exact rank-one
factors on (batch, features) inputs, the top-k subspace sketch over sequences, at the Linear
rule's cost. trajlab never imports ``transformers``: the rule is registered the first time a
module of that class is looked up (:func:`trajlab.record.rules.rule_for`), which can only happen
when ``transformers`` is already imported.
"""

from __future__ import annotations

from torch import Tensor, nn

from trajlab.record.rules.linear import LinearRule


class HFConv1DRule(LinearRule):
    """``transformers.pytorch_utils.Conv1D``: the recorded matrix is ``weight.T`` (nf x nx)."""

    module_type = "Conv1D"

    def matrix_of(self, module: nn.Module, matrix, tensor: Tensor) -> Tensor:
        return tensor.t()  # (nx, nf) -> (nf, nx): the (out, in) matrix of the map

    def how(self, module: nn.Module) -> str:
        return "Conv1D rule (transformers; Linear with a transposed weight)"


#: Classes of optional libraries with a rule of their own, by (module, class name): registered
#: lazily by rule_for, without importing the library.
OPTIONAL_RULES = {("transformers.pytorch_utils", "Conv1D"): HFConv1DRule}
