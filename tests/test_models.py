"""Specifications of trajlab.models: shapes, seeding, layer types, scale_init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trajlab.models import cifar_convnet, digits_convnet, mlp, scale_init

BUILDERS = {
    "mlp": (lambda seed: mlp(64, (32, 16), 10, seed=seed), (4, 64), (4, 10)),
    "mlp_tanh": (lambda seed: mlp(64, activation="tanh", seed=seed), (4, 64), (4, 10)),
    "digits": (lambda seed: digits_convnet(seed=seed), (4, 1, 8, 8), (4, 10)),
    "digits_wide": (
        lambda seed: digits_convnet(channels=(8, 12), num_classes=3, seed=seed),
        (4, 1, 8, 8),
        (4, 3),
    ),
    "cifar10": (lambda seed: cifar_convnet(seed=seed), (2, 3, 32, 32), (2, 10)),
    "cifar100": (lambda seed: cifar_convnet(100, seed=seed), (2, 3, 32, 32), (2, 100)),
}


def _same_parameters(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = list(a.parameters()), list(b.parameters())
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))


@pytest.mark.parametrize("name", BUILDERS)
def test_output_shape(name):
    build, in_shape, out_shape = BUILDERS[name]
    assert build(0)(torch.randn(in_shape)).shape == out_shape


@pytest.mark.parametrize("name", BUILDERS)
def test_seed_determines_parameters(name):
    build, _, _ = BUILDERS[name]
    assert _same_parameters(build(1), build(1))
    assert not _same_parameters(build(1), build(2))


@pytest.mark.parametrize("name", BUILDERS)
def test_seeding_leaves_global_rng_untouched(name):
    build, _, _ = BUILDERS[name]
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    build(7)
    assert torch.equal(torch.rand(5), expected)


def test_unseeded_uses_global_rng():
    torch.manual_seed(5)
    a = mlp(8, (4,), 2)
    torch.manual_seed(5)
    assert _same_parameters(a, mlp(8, (4,), 2))


@pytest.mark.parametrize("name", BUILDERS)
def test_only_linear_conv_and_1_lipschitz_nonlinearities(name):
    build, _, _ = BUILDERS[name]
    allowed = (nn.Sequential, nn.Linear, nn.Conv2d, nn.ReLU, nn.Tanh, nn.MaxPool2d, nn.Flatten)
    assert all(isinstance(m, allowed) for m in build(0).modules())


def test_mlp_structure():
    model = mlp(10, (20, 30), 5, activation="tanh", bias=False)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 20), (20, 30), (30, 5)]
    assert all(m.bias is None for m in linears)
    assert isinstance(model[1], nn.Tanh) and isinstance(model[-1], nn.Linear)
    assert len(mlp(10, (), 5)) == 1


def test_digits_convnet_default_architecture():
    model = digits_convnet()
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (1, 16, (1, 1)),
        (16, 32, (2, 2)),
    ]
    assert [(m.in_features, m.out_features) for m in linears] == [(32 * 4 * 4, 64), (64, 10)]


def test_cifar_convnet_has_five_weight_layers():
    model = cifar_convnet()
    kinds = [type(m) for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert kinds == [nn.Conv2d] * 3 + [nn.Linear] * 2


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mlp(8, activation="gelu"), "activation"),
        (lambda: mlp(0), "positive"),
        (lambda: digits_convnet(channels=(4,)), "channels"),
        (lambda: cifar_convnet(channels=(4, 4)), "channels"),
    ],
)
def test_constructor_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_scale_init_scales_weights_not_biases_and_spectral_norm():
    model = digits_convnet(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = scale_init(model, -2.5)
    assert out is model
    for key, value in model.state_dict().items():
        factor = -2.5 if key.endswith("weight") else 1.0
        torch.testing.assert_close(value, before[key] * factor)
    w0 = before["5.weight"]
    torch.testing.assert_close(
        torch.linalg.matrix_norm(model[5].weight, ord=2),
        2.5 * torch.linalg.matrix_norm(w0, ord=2),
    )
    assert not any(p.grad is not None for p in model.parameters())
    assert all(p.requires_grad and p.is_leaf for p in model.parameters())


def test_scale_init_rejects_non_finite():
    with pytest.raises(ValueError, match="finite"):
        scale_init(mlp(2, (), 2), float("nan"))
