"""nn.Embedding: the table as the recorded matrix, row-sparse per-sample gradients."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trajlab.record.rules.base import Description, LayerRule, Rows
from trajlab.sketches import RowsSketch


class EmbeddingRule(LayerRule):
    """``nn.Embedding``: the recorded matrix is the table itself (``num_embeddings x dim``),
    the transpose of the map one-hot -> vector; sigma_1 and every term of the analysis are the
    same for both (MATH.md §2 is invariant under ``W -> W^T``).

    Sample i's gradient has a row per distinct token it holds: ``G_i = sum_p e_{t_ip} dy_ip^T``.
    The rule hands over (token, output gradient) pairs (:class:`Rows`) and the ``"rows"`` sketch
    kind stores them coalesced and exactly, ``B x R x dim`` numbers with ``R`` the number of
    positions per sample at the first recorded step (more distinct tokens in one sample later on
    stop the recording with a clear message); no one-hot matrix is formed. ``padding_idx``
    positions carry no gradient and are skipped, sparse gradients (``sparse=True``) are read
    densely.
    """

    module_type = "Embedding"

    def refuse(self, module: nn.Module) -> str | None:
        if module.scale_grad_by_freq:
            return ("scale_grad_by_freq=True divides each row's gradient by the token's count in "
                    "the whole batch, so per-sample gradients are not defined")
        return None

    def matrix_of(self, module, matrix, tensor: Tensor) -> Tensor:
        return tensor.to_dense() if tensor.is_sparse else tensor

    def describe(self, module, matrix, args, kwargs) -> Description:
        idx = args[0]
        positions = int(math.prod(idx.shape[1:]))
        return Description(RowsSketch.name, positions, None, rank=max(1, min(positions,
                                                                    module.num_embeddings)))

    def per_sample(self, module, matrix, args, kwargs, grad_out: Tensor) -> Rows:
        idx = args[0]
        B = idx.shape[0]
        index = idx.reshape(B, -1).to(torch.int64)
        if module.padding_idx is not None:
            index = torch.where(index == module.padding_idx, torch.full_like(index, -1), index)
        values = grad_out.reshape(B, index.shape[1], -1) * B  # undo the loss mean
        return Rows(index, values, module.num_embeddings)
