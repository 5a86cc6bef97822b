"""The checks of ``Recorder.log``'s arguments.

Two stages. On every step, :func:`_check_loss_type` and :func:`_check_indices_type` look only at
types and shapes: no value is read, so an unrecorded step costs no device synchronisation. On a
recorded step, :func:`loss_value` and :func:`indices_value` read the values (the loss as a
float, the indices on the CPU, checked against ``dataset_size``).

The two type checks keep their underscore names: tests/record/test_writer.py lists them by name as the
only trajlab code that ``log`` runs on an unrecorded step.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def _scalar_error(loss: Tensor) -> ValueError:
    return ValueError(f"log(loss=...) needs the batch's mean loss as a scalar; got a tensor of "
                      f"shape {tuple(loss.shape)} (pass loss.mean() or loss.item())")


def _loss_kind_error(loss: Any) -> TypeError:
    return TypeError(f"log(loss=...) needs a number or a one-element tensor, got "
                     f"{type(loss).__name__}")


def _not_integer_indices(idx: Tensor) -> bool:
    return (idx.dim() != 1 or idx.is_floating_point() or idx.is_complex()
            or idx.dtype == torch.bool)


def _indices_error(idx: Tensor) -> ValueError:
    return ValueError(f"log(indices=...) needs a 1-D sequence of integer dataset indices, "
                      f"got a {idx.dtype} tensor of shape {tuple(idx.shape)}")


def _check_loss_type(loss: Any) -> None:
    """The checks of :func:`loss_value` that need no value (no device synchronisation).

    Raises
    ------
    ValueError
        A tensor of more than one element.
    TypeError
        Neither a real number nor a tensor.
    """
    if loss is None or isinstance(loss, numbers.Real):
        return
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise _scalar_error(loss)
        return
    raise _loss_kind_error(loss)


def _check_indices_type(indices: Any) -> None:
    """The checks of :func:`indices_value` that need no copy, for tensors.

    Raises
    ------
    ValueError
        A tensor that is not 1-D or not of an integer dtype.
    """
    if isinstance(indices, Tensor) and (indices.dim() != 1 or indices.is_floating_point()
                                        or indices.is_complex()
                                        or indices.dtype == torch.bool):
        raise _indices_error(indices)  # inline: an unrecorded step calls nothing more


def loss_value(loss: Tensor | float | None) -> float | None:
    """The logged loss as a float (a float64 loss stays exact), or None.

    Raises
    ------
    ValueError, TypeError
        As :func:`_check_loss_type`.
    """
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise _scalar_error(loss)
        return float(loss.detach().double().item())
    if isinstance(loss, numbers.Real):
        return float(loss)
    raise _loss_kind_error(loss)


def indices_value(indices: Tensor | np.ndarray | Sequence[int] | None, *,
                  dataset_size: int | None, step: int) -> Tensor | None:
    """The logged dataset indices as a CPU int64 tensor, or None.

    Parameters
    ----------
    indices : 1-D integers (tensor, array or sequence), or None.
    dataset_size : the run's ``dataset_size`` option; indices must lie in ``0..dataset_size-1``.
    step : the step being recorded (named in the error).

    Raises
    ------
    TypeError
        Not convertible to a tensor.
    ValueError
        Not 1-D integers, or outside ``0..dataset_size-1``.
    """
    if indices is None:
        return None
    try:
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor)
                              else indices).detach()
    except (TypeError, ValueError) as e:
        raise TypeError(f"log(indices=...) needs a 1-D sequence of integer dataset indices: "
                        f"{e}") from None
    if _not_integer_indices(idx):
        raise _indices_error(idx)
    n = dataset_size
    if n is not None and idx.numel() and (int(idx.max()) >= n or int(idx.min()) < 0):
        raise ValueError(
            f"log(indices=...) at step {step}: indices {int(idx.min())}..{int(idx.max())} but "
            f"dataset_size={n} (indices are positions in the dataset, 0..dataset_size-1); pass "
            "the dataset's size as dataset_size (the analysis's finite-population factor "
            "depends on it)")
    return idx.to("cpu", torch.int64)


__all__ = ["_check_indices_type", "_check_loss_type", "indices_value", "loss_value"]
