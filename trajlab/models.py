"""Small networks whose Lipschitz constant trajlab tracks during training.

All models are plain stacks of ``Linear`` / ``Conv2d`` layers with 1-Lipschitz
nonlinearities (ReLU, max-pooling, or optionally tanh) and no normalisation
layers, so the product of the layers' spectral norms bounds the network's
Lipschitz constant.

Every constructor takes ``seed``: when given, the parameters are initialised
inside :func:`torch.random.fork_rng` after ``torch.manual_seed(seed)``, so the
same seed gives the same model and the caller's global random state is left
as it was. With ``seed=None`` the global generator is used, as in PyTorch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import nn

__all__ = ["cifar_convnet", "digits_convnet", "mlp", "scale_init"]

Activation = Literal["relu", "tanh"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Run the block with a private, seeded global RNG state (or unchanged if ``None``)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}."
        ) from None


def mlp(
    in_features: int,
    hidden: Sequence[int] = (64, 64),
    out_features: int = 10,
    *,
    activation: Activation = "relu",
    bias: bool = True,
    seed: int | None = None,
) -> nn.Sequential:
    """Build a multilayer perceptron: Linear, activation, ..., Linear.

    Parameters
    ----------
    in_features
        Input width; inputs have shape ``(N, in_features)`` (flatten images
        first, e.g. ``load_digits(flatten=True)``).
    hidden
        Widths of the hidden layers; ``()`` gives a single linear layer.
    out_features
        Output width (number of classes).
    activation
        ``"relu"`` or ``"tanh"``, after every layer except the last.
    bias
        Give the Linear layers a bias.
    seed
        Initialisation seed; see the module docstring.

    Returns
    -------
    torch.nn.Sequential
        ``len(hidden) + 1`` Linear layers interleaved with activations.

    Examples
    --------
    >>> model = mlp(64, (32,), 10, seed=0)
    >>> model(torch.zeros(5, 64)).shape
    torch.Size([5, 10])
    """
    widths = [in_features, *hidden, out_features]
    if any(int(w) != w or w < 1 for w in widths):
        raise ValueError(f"layer widths must be positive integers, got {widths}.")
    _activation(activation)  # validate before building
    layers: list[nn.Module] = []
    with _seeded(seed):
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i > 0:
                layers.append(_activation(activation))
            layers.append(nn.Linear(fan_in, fan_out, bias=bias))
    return nn.Sequential(*layers)


def digits_convnet(
    *,
    channels: Sequence[int] = (16, 32),
    hidden: int = 64,
    num_classes: int = 10,
    seed: int | None = None,
) -> nn.Sequential:
    """Build a small ConvNet for 1x8x8 digit images.

    Architecture (defaults): ``Conv2d(1, 16, 3, padding=1)`` - ReLU -
    ``Conv2d(16, 32, 3, stride=2, padding=1)`` - ReLU - Flatten -
    ``Linear(32*4*4, 64)`` - ReLU - ``Linear(64, 10)``.

    Parameters
    ----------
    channels
        Output channels ``(c1, c2)`` of the two convolutions.
    hidden
        Width of the hidden Linear layer.
    num_classes
        Number of outputs.
    seed
        Initialisation seed; see the module docstring.

    Returns
    -------
    torch.nn.Sequential
        Maps ``(N, 1, 8, 8)`` to ``(N, num_classes)``.

    Examples
    --------
    >>> digits_convnet(seed=0)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    if len(channels) != 2 or any(c < 1 for c in channels):
        raise ValueError(f"channels must be two positive integers (c1, c2), got {channels!r}.")
    c1, c2 = channels
    with _seeded(seed):
        return nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )


def cifar_convnet(
    num_classes: int = 10,
    *,
    channels: Sequence[int] = (32, 64, 64),
    hidden: int = 64,
    seed: int | None = None,
) -> nn.Sequential:
    """Build a five-layer ConvNet (3 convolutions, 2 linear layers) for 3x32x32 images.

    The paper "Optimization-Induced Dynamics of Lipschitz Continuity in Neural
    Networks" (arXiv 2506.18588) trains a five-layer ConvNet on CIFAR-10/100,
    but its exact layer sizes could not be confirmed here; this is a standard
    stand-in of the same depth, not a verified reproduction:

    ``Conv2d(3, 32, 3, padding=1)`` - ReLU - ``MaxPool2d(2)`` -
    ``Conv2d(32, 64, 3, padding=1)`` - ReLU - ``MaxPool2d(2)`` -
    ``Conv2d(64, 64, 3, padding=1)`` - ReLU - Flatten -
    ``Linear(64*8*8, 64)`` - ReLU - ``Linear(64, num_classes)``.

    Parameters
    ----------
    num_classes
        Number of outputs (10 for CIFAR-10, 100 or 20 for CIFAR-100).
    channels
        Output channels of the three convolutions.
    hidden
        Width of the hidden Linear layer.
    seed
        Initialisation seed; see the module docstring.

    Returns
    -------
    torch.nn.Sequential
        Maps ``(N, 3, 32, 32)`` to ``(N, num_classes)``.

    Examples
    --------
    >>> cifar_convnet(100, seed=0)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 100])
    """
    if len(channels) != 3 or any(c < 1 for c in channels):
        raise ValueError(
            f"channels must be three positive integers (c1, c2, c3), got {channels!r}."
        )
    c1, c2, c3 = channels
    with _seeded(seed):
        return nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c3 * 8 * 8, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )


def scale_init(model: nn.Module, scale: float) -> nn.Module:
    """Multiply the weight of every ``Linear`` and ``Conv2d`` layer by ``scale``, in place.

    Biases are left unchanged. Used to study how the initialisation scale
    shapes the Lipschitz dynamics: each layer's spectral norm is multiplied by
    ``|scale|``.

    Parameters
    ----------
    model
        Model to modify (any submodules are visited).
    scale
        Finite multiplier.

    Returns
    -------
    torch.nn.Module
        ``model`` itself, for chaining.

    Examples
    --------
    >>> model = scale_init(mlp(4, (), 2, seed=0), 0.5)
    """
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}.")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.mul_(scale)
    return model
