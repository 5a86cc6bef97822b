"""Mini-batch index samplers for a training loop, driven by an explicit seed.

Two sampling schemes are studied for their effect on the gradient noise of SGD:

* **with replacement**: every batch is ``batch_size`` indices drawn i.i.d.
  uniformly from ``0..n-1``;
* **random reshuffling**: each epoch is a fresh random permutation of
  ``0..n-1`` cut into consecutive batches.

Both samplers are infinite generators of int64 index tensors; the training loop
decides when to stop. Each owns a private :class:`numpy.random.Generator`, so
neither reads nor changes a global random state, and the same seed gives the
same sequence of batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SamplingKind",
    "batches_reshuffled",
    "batches_with_replacement",
    "make_batches",
]

SamplingKind = Literal["with_replacement", "reshuffle"]


def _check_sizes(n: int, batch_size: int) -> None:
    if n < 1:
        raise ValueError(f"n (the number of samples) must be at least 1, got {n!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}.")


def batches_with_replacement(n: int, batch_size: int, *, seed: int) -> Iterator[Tensor]:
    """Yield batches of indices drawn i.i.d. uniformly with replacement, forever.

    Parameters
    ----------
    n
        Number of samples; indices lie in ``0..n-1``.
    batch_size
        Indices per batch; may exceed ``n``.
    seed
        Seed of the private :class:`numpy.random.Generator`.

    Yields
    ------
    Tensor
        int64 indices, shape ``(batch_size,)``; repeats within a batch are
        possible.

    Examples
    --------
    >>> batches = batches_with_replacement(100, 8, seed=0)
    >>> next(batches).shape
    torch.Size([8])
    """
    _check_sizes(n, batch_size)
    return _with_replacement(n, batch_size, np.random.default_rng(seed))


def _with_replacement(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[Tensor]:
    while True:
        yield torch.from_numpy(rng.integers(0, n, size=batch_size, dtype=np.int64))


def batches_reshuffled(
    n: int, batch_size: int, *, seed: int, drop_last: bool = True
) -> Iterator[Tensor]:
    """Yield batches of a fresh random permutation each epoch (random reshuffling), forever.

    Parameters
    ----------
    n
        Number of samples; indices lie in ``0..n-1``.
    batch_size
        Indices per batch.
    seed
        Seed of the private :class:`numpy.random.Generator`.
    drop_last
        Drop the last ``n % batch_size`` indices of each epoch's permutation so
        every batch has ``batch_size`` indices (then ``batch_size <= n`` is
        required). With ``False`` each epoch ends with a smaller batch and
        covers every index exactly once.

    Yields
    ------
    Tensor
        int64 indices without repeats, shape ``(batch_size,)`` (the last batch
        of an epoch may be shorter when ``drop_last=False``). An epoch is
        ``n // batch_size`` batches, or ``ceil(n / batch_size)`` with
        ``drop_last=False``.

    Examples
    --------
    >>> batches = batches_reshuffled(10, 5, seed=0)
    >>> sorted(torch.cat([next(batches), next(batches)]).tolist()) == list(range(10))
    True
    """
    _check_sizes(n, batch_size)
    if drop_last and batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} exceeds n={n}, so drop_last=True would drop every "
            "batch; lower batch_size or pass drop_last=False."
        )
    return _reshuffled(n, batch_size, drop_last, np.random.default_rng(seed))


def _reshuffled(
    n: int, batch_size: int, drop_last: bool, rng: np.random.Generator
) -> Iterator[Tensor]:
    stop = n - n % batch_size if drop_last else n
    while True:
        perm = torch.from_numpy(rng.permutation(n).astype(np.int64))
        for start in range(0, stop, batch_size):
            yield perm[start : start + batch_size]


_SAMPLERS: dict[str, Callable[..., Iterator[Tensor]]] = {
    "with_replacement": batches_with_replacement,
    "reshuffle": batches_reshuffled,
}


def make_batches(kind: SamplingKind, n: int, batch_size: int, *, seed: int) -> Iterator[Tensor]:
    """Return the infinite batch sampler named ``kind``.

    Parameters
    ----------
    kind
        ``"with_replacement"`` (:func:`batches_with_replacement`) or
        ``"reshuffle"`` (:func:`batches_reshuffled` with ``drop_last=True``).
    n, batch_size, seed
        Passed to the sampler.

    Returns
    -------
    Iterator[Tensor]
        int64 index batches of shape ``(batch_size,)``.

    Examples
    --------
    >>> next(make_batches("reshuffle", 100, 10, seed=1)).shape
    torch.Size([10])
    """
    try:
        sampler = _SAMPLERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown sampling kind {kind!r}; choose one of {sorted(_SAMPLERS)}."
        ) from None
    return sampler(n, batch_size, seed=seed)
