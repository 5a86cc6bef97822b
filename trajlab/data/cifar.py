"""CIFAR-10 and CIFAR-100 from the official *binary* distribution, read with numpy only.

Get the "binary version" archives from https://www.cs.toronto.edu/~kriz/cifar.html
and extract them; no pickle and no torchvision are involved.

On-disk format (one file is a plain concatenation of fixed-length records):

* CIFAR-10, folder ``cifar-10-batches-bin``: files ``data_batch_1.bin`` ..
  ``data_batch_5.bin`` (train) and ``test_batch.bin``; each record is
  1 label byte followed by 3072 pixel bytes.
* CIFAR-100, folder ``cifar-100-binary``: files ``train.bin`` and ``test.bin``;
  each record is 1 coarse label byte, 1 fine label byte, then 3072 pixel bytes.

The 3072 pixel bytes are channel-major: the 1024 red values, then green, then
blue, each a 32x32 image in row-major order, i.e. exactly a C-ordered
``(3, 32, 32)`` array.

Reading is split in two steps: :func:`read_cifar_binary` returns the raw
``uint8`` records of one file, :func:`load_cifar` selects the label and turns
the pixels into normalised tensors. :func:`write_cifar_binary` and
:func:`write_cifar_dataset` write the same format, for building tiny data sets
in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CIFAR_URL",
    "load_cifar",
    "read_cifar_binary",
    "write_cifar_binary",
    "write_cifar_dataset",
]

CifarName = Literal["cifar10", "cifar100"]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
"""Where to download the binary archives."""

CIFAR_MEAN: dict[str, tuple[float, float, float]] = {
    "cifar10": (0.4914, 0.4822, 0.4465),
    "cifar100": (0.5071, 0.4865, 0.4409),
}
"""Per-channel (R, G, B) mean of the training pixels scaled to [0, 1]."""

CIFAR_STD: dict[str, tuple[float, float, float]] = {
    "cifar10": (0.2470, 0.2435, 0.2616),
    "cifar100": (0.2673, 0.2564, 0.2762),
}
"""Per-channel (R, G, B) standard deviation of the training pixels scaled to [0, 1].

These are the standard deviations over all training pixels of a channel, not the
often quoted (0.2023, 0.1994, 0.2010), which average per-image deviations.
"""

_IMAGE_SHAPE = (3, 32, 32)
_IMAGE_BYTES = 3 * 32 * 32


@dataclass(frozen=True)
class _Layout:
    """How one CIFAR variant is laid out on disk."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_names: tuple[str, ...]  # label bytes of a record, in on-disk order
    num_classes: tuple[int, ...]  # class count of each label byte

    @property
    def record_bytes(self) -> int:
        return len(self.label_names) + _IMAGE_BYTES


_LAYOUTS: dict[str, _Layout] = {
    "cifar10": _Layout(
        folder="cifar-10-batches-bin",
        train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        test_files=("test_batch.bin",),
        label_names=("fine",),
        num_classes=(10,),
    ),
    "cifar100": _Layout(
        folder="cifar-100-binary",
        train_files=("train.bin",),
        test_files=("test.bin",),
        label_names=("coarse", "fine"),
        num_classes=(20, 100),
    ),
}


def _layout(dataset: str) -> _Layout:
    try:
        return _LAYOUTS[dataset]
    except KeyError:
        raise ValueError(f"dataset must be one of {sorted(_LAYOUTS)}, got {dataset!r}.") from None


def _find_folder(root: Path, layout: _Layout, files: tuple[str, ...]) -> Path:
    """Return the folder holding ``files``: ``root`` itself or ``root / layout.folder``."""
    for candidate in (root / layout.folder, root):
        if all((candidate / name).is_file() for name in files):
            return candidate
    searched = root / layout.folder if (root / layout.folder).is_dir() else root
    missing = [name for name in files if not (searched / name).is_file()]
    raise FileNotFoundError(
        f"CIFAR binary files not found: expected {', '.join(files)} in "
        f"{root / layout.folder} or {root} (missing from {searched}: {', '.join(missing)}). "
        f"Download the *binary version* from {CIFAR_URL} and extract it, then pass the "
        f"extracted folder '{layout.folder}' or its parent as root."
    )


def read_cifar_binary(
    path: str | Path, *, dataset: CifarName = "cifar10"
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR binary file into raw ``uint8`` arrays.

    Parameters
    ----------
    path
        A ``.bin`` file of the official binary distribution.
    dataset
        ``"cifar10"`` (1 label byte per record) or ``"cifar100"`` (coarse and
        fine label bytes per record).

    Returns
    -------
    images : numpy.ndarray
        ``uint8``, shape ``(N, 3, 32, 32)`` (sample, channel, height, width).
    labels : numpy.ndarray
        ``uint8``, shape ``(N, L)``: the label bytes in on-disk order, ``L = 1``
        for CIFAR-10 and ``L = 2`` (coarse, fine) for CIFAR-100.

    Raises
    ------
    ValueError
        If the file size is not a multiple of the record length, or a label is
        out of range (the file is corrupt or of the other CIFAR variant).
    """
    layout = _layout(dataset)
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % layout.record_bytes != 0:
        raise ValueError(
            f"{path} has {raw.size} bytes, not a multiple of the {dataset} record length "
            f"{layout.record_bytes} ({len(layout.label_names)} label byte(s) + {_IMAGE_BYTES} "
            f"pixel bytes); the file is truncated or corrupt, or dataset={dataset!r} is wrong. "
            f"Download the binary version again from {CIFAR_URL}."
        )
    records = raw.reshape(-1, layout.record_bytes)
    n_labels = len(layout.label_names)
    labels = records[:, :n_labels].copy()
    images = records[:, n_labels:].reshape(-1, *_IMAGE_SHAPE).copy()
    for column, (name, count) in enumerate(zip(layout.label_names, layout.num_classes)):
        if labels.shape[0] and labels[:, column].max() >= count:
            raise ValueError(
                f"{path} holds {name} label {int(labels[:, column].max())}, but {dataset} has "
                f"{count} {name} classes; the file is corrupt or dataset={dataset!r} is wrong."
            )
    return images, labels


def load_cifar(
    root: str | Path,
    *,
    dataset: CifarName = "cifar10",
    train: bool = True,
    label: Literal["fine", "coarse"] = "fine",
    dtype: torch.dtype = torch.float32,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Load CIFAR-10 or CIFAR-100 from the official binary distribution.

    Parameters
    ----------
    root
        The extracted folder (``cifar-10-batches-bin`` or ``cifar-100-binary``)
        or its parent.
    dataset
        ``"cifar10"`` or ``"cifar100"``.
    train
        Load the training files (50,000 images) or the test file (10,000).
    label
        For CIFAR-100, ``"fine"`` (100 classes) or ``"coarse"`` (20
        superclasses). CIFAR-10 has a single label, which counts as ``"fine"``.
    dtype
        Floating point dtype of the images.
    normalize
        Scale pixels to [0, 1], then subtract :data:`CIFAR_MEAN` and divide by
        :data:`CIFAR_STD` per channel. With ``False`` pixels are only scaled to
        [0, 1].

    Returns
    -------
    X : Tensor
        Images, shape ``(N, 3, 32, 32)`` (sample, channel, height, width),
        channels in R, G, B order.
    y : Tensor
        Class labels, int64, shape ``(N,)``, in file order (CIFAR-10 train files
        in order ``data_batch_1`` .. ``data_batch_5``).

    Raises
    ------
    FileNotFoundError
        If the expected files are not under ``root``.
    ValueError
        For a corrupt file (see :func:`read_cifar_binary`) or invalid options.

    Examples
    --------
    >>> X, y = load_cifar("~/data", dataset="cifar100", label="coarse")  # doctest: +SKIP
    """
    layout = _layout(dataset)
    if label not in layout.label_names:
        raise ValueError(
            f"label must be one of {list(layout.label_names)} for {dataset}, got {label!r}."
        )
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}; use torch.float32.")

    files = layout.train_files if train else layout.test_files
    folder = _find_folder(Path(root).expanduser(), layout, files)
    parts = [read_cifar_binary(folder / name, dataset=dataset) for name in files]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])[:, layout.label_names.index(label)]

    X = torch.from_numpy(images).to(dtype).div_(255.0)
    if normalize:
        mean = torch.tensor(CIFAR_MEAN[dataset], dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR_STD[dataset], dtype=dtype).view(1, 3, 1, 1)
        X.sub_(mean).div_(std)
    return X, torch.from_numpy(labels.astype(np.int64))


def _as_numpy(array: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(array, Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def write_cifar_binary(
    path: str | Path,
    images_uint8: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    *,
    dataset: CifarName = "cifar10",
) -> Path:
    """Write images and labels as one file in the official CIFAR binary format.

    The inverse of :func:`read_cifar_binary`; meant for building tiny data sets
    in tests.

    Parameters
    ----------
    path
        File to write (overwritten).
    images_uint8
        ``uint8`` images, shape ``(N, 3, 32, 32)`` (channels R, G, B).
    labels
        CIFAR-10: shape ``(N,)`` (or ``(N, 1)``). CIFAR-100: shape ``(N, 2)``,
        columns (coarse, fine). Integers within each label's class count.
    dataset
        ``"cifar10"`` or ``"cifar100"``.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    layout = _layout(dataset)
    images = _as_numpy(images_uint8)
    label_array = _as_numpy(labels)
    if images.dtype != np.uint8:
        raise ValueError(
            f"images_uint8 must have dtype uint8, got {images.dtype}; convert explicitly, "
            "e.g. (x * 255).round().astype(np.uint8)."
        )
    if images.ndim != 4 or images.shape[1:] != _IMAGE_SHAPE:
        raise ValueError(f"images_uint8 must have shape (N, 3, 32, 32), got {tuple(images.shape)}.")
    n_labels = len(layout.label_names)
    if label_array.ndim == 1 and n_labels == 1:
        label_array = label_array[:, None]
    if label_array.shape != (images.shape[0], n_labels):
        expected = "(N,)" if n_labels == 1 else "(N, 2) with columns (coarse, fine)"
        raise ValueError(
            f"labels for {dataset} must have shape {expected} with N={images.shape[0]}, "
            f"got {tuple(label_array.shape)}."
        )
    if not np.issubdtype(label_array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {label_array.dtype}.")
    for column, (name, count) in enumerate(zip(layout.label_names, layout.num_classes)):
        values = label_array[:, column]
        if values.size and (values.min() < 0 or values.max() >= count):
            raise ValueError(
                f"{name} labels for {dataset} must lie in 0..{count - 1}, found "
                f"{values.min()}..{values.max()}."
            )
    records = np.concatenate(
        [label_array.astype(np.uint8), images.reshape(images.shape[0], _IMAGE_BYTES)], axis=1
    )
    path = Path(path)
    np.ascontiguousarray(records).tofile(path)
    return path


def write_cifar_dataset(
    root: str | Path,
    images_uint8: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    *,
    dataset: CifarName = "cifar10",
    train: bool = True,
) -> Path:
    """Write one split of a CIFAR data set as the official extracted folder.

    Creates ``root/cifar-10-batches-bin`` or ``root/cifar-100-binary`` and
    writes the split's files into it; CIFAR-10 training images are divided in
    order over ``data_batch_1.bin`` .. ``data_batch_5.bin`` (some may be empty
    for fewer than 5 images). ``load_cifar(root, dataset=..., train=...)``
    then returns the same images and labels.

    Parameters
    ----------
    root
        Parent folder of the data set folder.
    images_uint8, labels, dataset
        As in :func:`write_cifar_binary`.
    train
        Write the training files or the test file.

    Returns
    -------
    pathlib.Path
        The data set folder.
    """
    layout = _layout(dataset)
    folder = Path(root) / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    files = layout.train_files if train else layout.test_files
    images = _as_numpy(images_uint8)
    label_array = _as_numpy(labels)
    bounds = np.linspace(0, images.shape[0], len(files) + 1).round().astype(int)
    for name, start, stop in zip(files, bounds[:-1], bounds[1:]):
        write_cifar_binary(
            folder / name, images[start:stop], label_array[start:stop], dataset=dataset
        )
    return folder
