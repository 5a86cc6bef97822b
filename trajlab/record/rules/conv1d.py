"""nn.Conv1d: per-sample gradients over im2col patches, recorded as a top-k subspace sketch.

The worked example of docs/recorder.md ("Adding a layer rule"): one file, one registration in
``trajlab/record/rules/__init__.py``, one setting in ``tests/record/test_rules.py``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from trajlab.record.rules.base import Description, LayerRule, Patches, require_batched
from trajlab.sketches import Subspace
from trajlab.store.metadata import ConvGeometry


def _pads(module: nn.Conv1d) -> tuple[int, int]:
    """(before, after) padding of the length axis (``padding="same"`` resolved)."""
    if isinstance(module.padding, str):
        rp = module._reversed_padding_repeated_twice  # PyTorch's resolution of "same"/"valid"
        return int(rp[0]), int(rp[1])
    return int(module.padding[0]), int(module.padding[0])


class Conv1dRule(LayerRule):
    """``Conv1d`` (``groups=1``): the recorded matrix is the kernel reshaped to
    ``C_out x (C_in k)``; sample i's gradient is ``sum_p delta_ip patch_ip^T`` over the output
    positions p, so it is recorded as a subspace sketch (MATH.md §2, §6)."""

    module_type = "Conv1d"

    def refuse(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return (f"Conv1d with groups={module.groups} (its weight is block-diagonal) is not "
                    "supported yet")
        return None

    def describe(self, module, matrix, args, kwargs) -> Description:
        x = args[0]
        require_batched(module, "input", x, 3)
        before, after = _pads(module)
        (k,), (s,), (d,) = module.kernel_size, module.stride, module.dilation
        length = int(x.shape[-1])
        positions = (length + before + after - d * (k - 1) - 1) // s + 1
        geometry = ConvGeometry(
            kernel_shape=tuple(module.weight.shape), stride=(s,),
            # (before, after): asymmetric
            padding=(before,) if before == after else (before, after),
            dilation=(d,), padding_mode=module.padding_mode, input_size=(length,))
        return Description(Subspace.name, int(positions), geometry)

    def per_sample(self, module, matrix, args, kwargs, grad_out: Tensor) -> Patches:
        x = args[0].detach()
        B = x.shape[0]
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, _pads(module), mode=mode)
        # im2col on a height-1 image: (B, C_in * k, P), ordered like weight.reshape(C_out, -1)
        act = F.unfold(x.unsqueeze(2), (1, module.kernel_size[0]),
                       dilation=(1, module.dilation[0]), stride=(1, module.stride[0]))
        delta = grad_out.reshape(B, grad_out.shape[1], -1) * B  # undo the loss mean
        return Patches(act, delta)
