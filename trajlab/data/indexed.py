"""Dataset wrapper that yields each sample's index, so a DataLoader (shuffled or not) gives the
recorder the dataset indices of every batch."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset


class WithIndices(Dataset):
    """``dataset[i]`` followed by ``i``: ``(x, y) -> (x, y, i)``.

    Wrap the training set before building the DataLoader; each batch then ends with the
    dataset indices of its samples, in batch order, whatever the shuffling:

    >>> loader = DataLoader(WithIndices(train_set), batch_size=64, shuffle=True)  # doctest: +SKIP
    >>> for x, y, idx in loader:                                                  # doctest: +SKIP
    ...     ...
    ...     rec.log(loss=loss, indices=idx)

    :class:`trajlab.FullGradientProbe` accepts such batches too (the indices are ignored).

    Parameters
    ----------
    dataset : a map-style dataset whose items are tuples (e.g. ``TensorDataset``) or single
        tensors.
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError("WithIndices needs a map-style dataset (with __getitem__ and "
                            f"__len__), got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        item = self.dataset[i]
        if isinstance(item, tuple):
            return (*item, i)
        if isinstance(item, list):
            return (*item, i)
        return item, i
