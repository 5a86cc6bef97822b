"""The UCI handwritten digits (8x8 grey images, 10 classes) shipped with scikit-learn.

The data set is small (1,797 images) and needs no download, which makes it the
default for quick training runs and tests.

Dimension names: ``sample`` (N), ``channel`` (1), ``height`` (8), ``width`` (8),
or ``feature`` (64) when flattened.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["DIGITS_NUM_CLASSES", "load_digits", "with_label_noise"]

DIGITS_NUM_CLASSES = 10
"""Number of classes in the digits data set."""

_PIXEL_MAX = 16.0  # sklearn's digits pixels are integer counts in 0..16


def _split_indices(n: int, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train, test) index arrays of a deterministic random split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}; "
            "pass e.g. test_fraction=0.2."
        )
    n_test = round(test_fraction * n)
    if n_test == 0 or n_test == n:
        raise ValueError(
            f"test_fraction={test_fraction!r} leaves an empty split of {n} samples; "
            "choose a fraction further from 0 and 1."
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def load_digits(
    *,
    dtype: torch.dtype = torch.float32,
    flatten: bool = False,
    split: Literal["train", "test"] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Load scikit-learn's handwritten digits as standardised tensors.

    Pixels are scaled to [0, 1] (divided by 16) and then standardised with a
    single scalar mean and standard deviation (``ddof=0``) computed over all
    pixels of the *training* part of the split. The statistics always come from
    the training part, also for ``split="test"`` and ``split=None``, so a given
    image has the same values whichever split it is returned in.

    Parameters
    ----------
    dtype
        Floating point dtype of the images.
    flatten
        Return images as ``(sample, feature)`` with 64 features instead of
        ``(sample, channel, height, width)``.
    split
        ``"train"``, ``"test"``, or ``None`` for all 1,797 samples in their
        original order.
    test_fraction
        Fraction of samples in the test part, strictly between 0 and 1; the test
        part has ``round(test_fraction * 1797)`` samples.
    seed
        Seed of the :class:`numpy.random.Generator` that draws the split.

    Returns
    -------
    X : Tensor
        Images, shape ``(N, 1, 8, 8)``, or ``(N, 64)`` when ``flatten``.
    y : Tensor
        Class labels in ``0..9``, int64, shape ``(N,)``. Within a split samples
        keep their original relative order.

    Examples
    --------
    >>> X, y = load_digits(split="train")
    >>> X.shape, y.dtype
    (torch.Size([1438, 1, 8, 8]), torch.int64)
    >>> X, y = load_digits(flatten=True)
    >>> tuple(X.shape)
    (1797, 64)
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}; use torch.float32.")
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}.")

    from sklearn.datasets import load_digits as _sk_load_digits  # lazy: sklearn is slow to import

    bunch = _sk_load_digits()
    pixels = np.asarray(bunch.data, dtype=np.float64) / _PIXEL_MAX  # (N, 64)
    labels = np.asarray(bunch.target, dtype=np.int64)

    train_idx, test_idx = _split_indices(len(labels), test_fraction=test_fraction, seed=seed)
    mean = pixels[train_idx].mean()
    std = pixels[train_idx].std()
    pixels = (pixels - mean) / std

    if split == "train":
        pixels, labels = pixels[train_idx], labels[train_idx]
    elif split == "test":
        pixels, labels = pixels[test_idx], labels[test_idx]

    X = torch.from_numpy(pixels).to(dtype)
    if not flatten:
        X = X.reshape(-1, 1, 8, 8)
    return X, torch.from_numpy(labels)


def with_label_noise(y: Tensor, fraction: float, *, num_classes: int, seed: int) -> Tensor:
    """Return a copy of ``y`` with a fraction of labels replaced by a different class.

    Exactly ``round(fraction * N)`` labels, chosen uniformly without
    replacement, are changed; each gets a class drawn uniformly from the
    ``num_classes - 1`` classes other than its own, so no chosen label keeps its
    value.

    Parameters
    ----------
    y
        Integer class labels in ``0..num_classes-1``, shape ``(N,)``.
    fraction
        Fraction of labels to corrupt, in [0, 1].
    num_classes
        Number of classes, at least 2.
    seed
        Seed of the :class:`numpy.random.Generator` choosing which labels change
        and their new classes.

    Returns
    -------
    Tensor
        Noisy labels, same shape, dtype and device as ``y``; ``y`` is unchanged.

    Examples
    --------
    >>> y = torch.arange(10) % 3
    >>> noisy = with_label_noise(y, 0.3, num_classes=3, seed=0)
    >>> int((noisy != y).sum())
    3
    """
    if y.ndim != 1:
        raise ValueError(f"y must be one-dimensional (N,), got shape {tuple(y.shape)}.")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction!r}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 to change a label, got {num_classes!r}.")
    labels = y.detach().cpu().numpy().astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1}, found range "
            f"{labels.min()}..{labels.max()}; check num_classes."
        )

    rng = np.random.default_rng(seed)
    n_noisy = round(fraction * labels.size)
    chosen = rng.choice(labels.size, size=n_noisy, replace=False)
    shift = rng.integers(1, num_classes, size=n_noisy)  # never 0, so the class always changes
    noisy = labels.copy()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return torch.from_numpy(noisy).to(dtype=y.dtype, device=y.device)
