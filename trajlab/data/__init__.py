"""Data sets and mini-batch samplers for trajlab training runs.

* :mod:`trajlab.data.digits`: scikit-learn's 8x8 digits (no download) and label noise.
* :mod:`trajlab.data.cifar`: CIFAR-10/100 from the official binary files.
* :mod:`trajlab.data.sampling`: seeded index samplers (with replacement, reshuffling).
* :mod:`trajlab.data.indexed`: :class:`WithIndices`, so a DataLoader yields (x, y, indices).
"""

from trajlab.data.cifar import (
    CIFAR_MEAN,
    CIFAR_STD,
    load_cifar,
    read_cifar_binary,
    write_cifar_binary,
    write_cifar_dataset,
)
from trajlab.data.digits import DIGITS_NUM_CLASSES, load_digits, with_label_noise
from trajlab.data.indexed import WithIndices
from trajlab.data.sampling import (
    SamplingKind,
    batches_reshuffled,
    batches_with_replacement,
    make_batches,
)

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DIGITS_NUM_CLASSES",
    "SamplingKind",
    "WithIndices",
    "batches_reshuffled",
    "batches_with_replacement",
    "load_cifar",
    "load_digits",
    "make_batches",
    "read_cifar_binary",
    "with_label_noise",
    "write_cifar_binary",
    "write_cifar_dataset",
]
