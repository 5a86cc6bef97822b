"""Analyses written into other tools' formats, one module per format.

* :func:`to_tensorboard` (:mod:`trajlab.export.tensorboard`): per-layer and network quantities
  as TensorBoard scalars at the run's optimizer steps, beside the training curves
  (``pip install "trajlab[tensorboard]"``).

>>> from trajlab.export import to_tensorboard  # doctest: +SKIP
>>> to_tensorboard("analysis.zarr", "runs/exp1")  # doctest: +SKIP
"""

from trajlab.export.tensorboard import (
    LAYER_SCALARS,
    NETWORK_SCALARS,
    scalar_descriptions,
    scalar_tag,
    to_tensorboard,
)

__all__ = ["LAYER_SCALARS", "NETWORK_SCALARS", "scalar_descriptions", "scalar_tag",
           "to_tensorboard"]
