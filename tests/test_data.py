"""Specifications of trajlab.data: digits, label noise, CIFAR binary I/O, samplers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from trajlab.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    batches_reshuffled,
    batches_with_replacement,
    load_cifar,
    load_digits,
    make_batches,
    read_cifar_binary,
    with_label_noise,
    write_cifar_binary,
    write_cifar_dataset,
)

# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_all():
    return load_digits()


def test_digits_shapes_and_dtypes(digits_all):
    X, y = digits_all
    assert X.shape == (1797, 1, 8, 8) and X.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    Xf, _ = load_digits(flatten=True, dtype=torch.float64)
    assert Xf.shape == (1797, 64) and Xf.dtype == torch.float64
    torch.testing.assert_close(Xf.float().reshape(-1, 1, 8, 8), X)


def test_digits_split_is_a_deterministic_partition(digits_all):
    X, y = digits_all
    Xtr, ytr = load_digits(split="train", seed=3)
    Xte, yte = load_digits(split="test", seed=3)
    assert len(yte) == round(0.2 * 1797) and len(ytr) + len(yte) == 1797
    # Same seed, same split; another seed, another split.
    torch.testing.assert_close(load_digits(split="train", seed=3)[0], Xtr)
    assert not torch.equal(load_digits(split="train", seed=4)[0], Xtr)
    # Train and test together are exactly the full set (as rows of the seed-3 standardised X).
    X3, y3 = load_digits(seed=3, flatten=True)
    rows = {tuple(r) for r in X3.numpy().round(5).tolist()}
    both = torch.cat([Xtr, Xte]).reshape(-1, 64).numpy().round(5).tolist()
    assert {tuple(r) for r in both} == rows
    assert sorted(torch.cat([ytr, yte]).tolist()) == sorted(y.tolist())


def test_digits_standardised_with_train_statistics():
    Xtr, _ = load_digits(split="train", dtype=torch.float64)
    assert abs(Xtr.mean().item()) < 1e-10
    assert abs(Xtr.std(unbiased=False).item() - 1.0) < 1e-10
    # Test part uses the train statistics: close to, but not exactly, standard.
    Xte, _ = load_digits(split="test", dtype=torch.float64)
    assert abs(Xte.mean().item()) > 1e-6 and abs(Xte.mean().item()) < 0.2


def test_digits_matches_sklearn_up_to_affine_map(digits_all):
    from sklearn.datasets import load_digits as sk_load

    X, y = digits_all
    raw = torch.from_numpy(sk_load().data / 16.0)
    flat = X.reshape(-1, 64).double()
    # X = (raw - m) / s for scalars m and s > 0.
    coeff = np.polyfit(raw.flatten().numpy(), flat.flatten().numpy(), 1)
    assert coeff[0] > 0
    np.testing.assert_allclose(np.polyval(coeff, raw.numpy()), flat.numpy(), atol=1e-5)
    assert y.tolist() == sk_load().target.tolist()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "val"}, "split"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"dtype": torch.int64}, "floating point"),
    ],
)
def test_digits_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits(**kwargs)


# --------------------------------------------------------------------------- label noise


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 1.0])
def test_label_noise_changes_exactly_the_requested_count(fraction):
    y = torch.arange(503) % 10
    noisy = with_label_noise(y, fraction, num_classes=10, seed=1)
    assert noisy.dtype == y.dtype and noisy.shape == y.shape
    assert int((noisy != y).sum()) == round(fraction * 503)
    assert noisy.min() >= 0 and noisy.max() < 10
    assert torch.equal(y, torch.arange(503) % 10)  # input untouched


def test_label_noise_never_keeps_label_even_with_two_classes():
    y = torch.randint(0, 2, (200,), generator=torch.Generator().manual_seed(0))
    noisy = with_label_noise(y, 1.0, num_classes=2, seed=0)
    assert torch.equal(noisy, 1 - y)


def test_label_noise_is_deterministic_and_spreads_over_classes():
    y = torch.zeros(2000, dtype=torch.int64)
    a = with_label_noise(y, 0.5, num_classes=10, seed=7)
    assert torch.equal(a, with_label_noise(y, 0.5, num_classes=10, seed=7))
    assert not torch.equal(a, with_label_noise(y, 0.5, num_classes=10, seed=8))
    assert set(a[a != 0].tolist()) == set(range(1, 10))


@pytest.mark.parametrize(
    "y, fraction, num_classes, match",
    [
        (torch.zeros(3, 2, dtype=torch.int64), 0.1, 10, "one-dimensional"),
        (torch.zeros(3), 0.1, 10, "integer"),
        (torch.zeros(3, dtype=torch.int64), 1.5, 10, "fraction"),
        (torch.zeros(3, dtype=torch.int64), 0.5, 1, "num_classes"),
        (torch.tensor([0, 10]), 0.5, 10, "0..9"),
    ],
)
def test_label_noise_rejects_bad_input(y, fraction, num_classes, match):
    with pytest.raises(ValueError, match=match):
        with_label_noise(y, fraction, num_classes=num_classes, seed=0)


# --------------------------------------------------------------------------- CIFAR


def _patterned_images(n: int, seed: int = 0) -> np.ndarray:
    """Random uint8 images with a known marker: pixel (c, 0, 0) = 10*c + 1, (c, h, w) row-major."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    images[:, :, 0, 0] = np.array([1, 11, 21], dtype=np.uint8)
    return images


def test_cifar10_binary_layout_is_label_then_rgb_row_major(tmp_path):
    image = np.zeros((1, 3, 32, 32), dtype=np.uint8)
    image[0, 0], image[0, 1], image[0, 2] = 50, 100, 150  # distinct per channel
    image[0, 0, 0, 1] = 7  # red, row 0, column 1
    image[0, 2, 1, 0] = 9  # blue, row 1, column 0
    path = write_cifar_binary(tmp_path / "one.bin", image, np.array([3]), dataset="cifar10")
    raw = np.fromfile(path, dtype=np.uint8)
    assert raw.size == 1 + 3072
    assert raw[0] == 3
    assert (raw[1 : 1 + 1024] != 50).sum() == 1 and raw[1 + 1] == 7
    assert (raw[1 + 1024 : 1 + 2048] == 100).all()
    assert (raw[1 + 2048 :] != 150).sum() == 1 and raw[1 + 2048 + 32] == 9


def test_cifar10_round_trip(tmp_path):
    train_images, test_images = _patterned_images(13, seed=0), _patterned_images(4, seed=1)
    train_labels, test_labels = np.arange(13) % 10, np.array([9, 0, 5, 5])
    write_cifar_dataset(tmp_path, train_images, train_labels, dataset="cifar10", train=True)
    folder = write_cifar_dataset(tmp_path, test_images, test_labels, dataset="cifar10", train=False)
    assert sorted(p.name for p in folder.iterdir()) == [
        *(f"data_batch_{i}.bin" for i in range(1, 6)),
        "test_batch.bin",
    ]

    X, y = load_cifar(tmp_path, dataset="cifar10", normalize=False, dtype=torch.float64)
    assert X.shape == (13, 3, 32, 32) and y.dtype == torch.int64
    assert y.tolist() == train_labels.tolist()
    np.testing.assert_array_equal((X * 255).round().numpy().astype(np.uint8), train_images)

    # root may also be the extracted folder itself.
    Xt, yt = load_cifar(folder, dataset="cifar10", train=False, normalize=False)
    assert yt.tolist() == test_labels.tolist()
    assert Xt[:, :, 0, 0].mul(255).round().tolist() == [[1.0, 11.0, 21.0]] * 4


def test_cifar10_normalisation_is_per_channel(tmp_path):
    images = _patterned_images(3)
    write_cifar_dataset(tmp_path, images, np.zeros(3, dtype=np.int64), train=False)
    X, _ = load_cifar(tmp_path, train=False, dtype=torch.float64)
    mean = torch.tensor(CIFAR_MEAN["cifar10"], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD["cifar10"], dtype=torch.float64).view(1, 3, 1, 1)
    expected = (torch.from_numpy(images).double() / 255 - mean) / std
    torch.testing.assert_close(X, expected)


def test_cifar100_round_trip_fine_and_coarse(tmp_path):
    images = _patterned_images(6)
    labels = np.array([[0, 99], [19, 0], [5, 42], [7, 7], [1, 2], [3, 4]])
    write_cifar_dataset(tmp_path, images, labels, dataset="cifar100", train=True)
    X, fine = load_cifar(tmp_path, dataset="cifar100", normalize=False)
    _, coarse = load_cifar(tmp_path, dataset="cifar100", label="coarse")
    assert fine.tolist() == labels[:, 1].tolist()
    assert coarse.tolist() == labels[:, 0].tolist()
    np.testing.assert_array_equal((X * 255).round().numpy().astype(np.uint8), images)

    raw_images, raw_labels = read_cifar_binary(
        tmp_path / "cifar-100-binary" / "train.bin", dataset="cifar100"
    )
    np.testing.assert_array_equal(raw_images, images)
    np.testing.assert_array_equal(raw_labels, labels)


@pytest.mark.parametrize(
    "dataset, files", [("cifar10", "data_batch_1.bin"), ("cifar100", "train.bin")]
)
def test_cifar_missing_files_name_expected_files_and_source(tmp_path, dataset, files):
    with pytest.raises(FileNotFoundError) as info:
        load_cifar(tmp_path, dataset=dataset)
    message = str(info.value)
    assert files in message and "cs.toronto.edu/~kriz/cifar.html" in message
    assert "binary" in message


def test_cifar_missing_one_batch_is_named(tmp_path):
    folder = write_cifar_dataset(tmp_path, _patterned_images(5), np.arange(5))
    (folder / "data_batch_4.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4.bin"):
        load_cifar(tmp_path)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_corrupt_size_is_a_clear_error(tmp_path, dataset):
    labels = np.zeros(2, dtype=np.int64) if dataset == "cifar10" else np.zeros((2, 2), np.int64)
    folder = write_cifar_dataset(
        tmp_path, _patterned_images(2), labels, dataset=dataset, train=False
    )
    test_file = next(folder.iterdir())
    test_file.write_bytes(test_file.read_bytes()[:-5])  # truncated download
    with pytest.raises(ValueError, match="not a multiple of the .* record length"):
        load_cifar(tmp_path, dataset=dataset, train=False)


def test_cifar_out_of_range_label_is_detected(tmp_path):
    record = np.full(1 + 3072, 200, dtype=np.uint8)  # label byte 200: not a CIFAR-10 class
    record.tofile(tmp_path / "x.bin")
    with pytest.raises(ValueError, match="label 200"):
        read_cifar_binary(tmp_path / "x.bin", dataset="cifar10")


@pytest.mark.parametrize(
    "images, labels, kwargs, match",
    [
        (np.zeros((1, 3, 32, 32), np.float32), np.zeros(1, np.int64), {}, "uint8"),
        (np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, np.int64), {}, "shape"),
        (np.zeros((1, 3, 32, 32), np.uint8), np.array([10]), {}, "0..9"),
        (
            np.zeros((1, 3, 32, 32), np.uint8),
            np.zeros(1, np.int64),
            {"dataset": "cifar100"},
            "coarse",
        ),
        (np.zeros((1, 3, 32, 32), np.uint8), np.zeros(1, np.int64), {"dataset": "svhn"}, "dataset"),
    ],
)
def test_write_cifar_binary_validates(tmp_path, images, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_cifar_binary(tmp_path / "x.bin", images, labels, **kwargs)


def test_load_cifar_rejects_coarse_labels_for_cifar10(tmp_path):
    with pytest.raises(ValueError, match="label"):
        load_cifar(tmp_path, dataset="cifar10", label="coarse")


# --------------------------------------------------------------------------- samplers


def _take(iterator, k):
    return [b.clone() for b in itertools.islice(iterator, k)]


@pytest.mark.parametrize("kind", ["with_replacement", "reshuffle"])
def test_samplers_are_deterministic_given_seed(kind):
    a = _take(make_batches(kind, 50, 8, seed=3), 20)
    b = _take(make_batches(kind, 50, 8, seed=3), 20)
    c = _take(make_batches(kind, 50, 8, seed=4), 20)
    assert all(torch.equal(x, z) for x, z in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c))


@pytest.mark.parametrize("kind", ["with_replacement", "reshuffle"])
def test_samplers_do_not_touch_global_rng(kind):
    torch.manual_seed(0)
    np.random.seed(0)
    expected_torch, expected_numpy = torch.rand(3), np.random.rand(3)
    torch.manual_seed(0)
    np.random.seed(0)
    _take(make_batches(kind, 50, 8, seed=1), 10)
    assert torch.equal(torch.rand(3), expected_torch)
    np.testing.assert_array_equal(np.random.rand(3), expected_numpy)


def test_with_replacement_shape_range_and_repeats():
    batches = _take(batches_with_replacement(7, 20, seed=0), 200)
    stacked = torch.stack(batches)
    assert stacked.shape == (200, 20) and stacked.dtype == torch.int64
    assert stacked.min() == 0 and stacked.max() == 6
    assert any(len(set(b.tolist())) < len(b) for b in batches)  # 20 draws from 7 must repeat
    counts = torch.bincount(stacked.flatten(), minlength=7).double()
    assert (counts / counts.sum() - 1 / 7).abs().max() < 0.02  # roughly uniform


@pytest.mark.parametrize("n, batch_size", [(20, 5), (23, 5), (10, 10)])
def test_reshuffle_covers_each_index_once_per_epoch(n, batch_size):
    per_epoch = n // batch_size
    batches = _take(batches_reshuffled(n, batch_size, seed=2), 3 * per_epoch)
    assert all(b.shape == (batch_size,) and b.dtype == torch.int64 for b in batches)
    epochs = [torch.cat(batches[i * per_epoch : (i + 1) * per_epoch]) for i in range(3)]
    for epoch in epochs:
        assert len(set(epoch.tolist())) == per_epoch * batch_size  # no repeats within an epoch
        if n % batch_size == 0:
            assert sorted(epoch.tolist()) == list(range(n))
    if n > batch_size:
        assert not torch.equal(epochs[0], epochs[1])  # reshuffled between epochs


def test_reshuffle_without_drop_last_covers_every_index():
    batches = _take(batches_reshuffled(23, 5, seed=0, drop_last=False), 10)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3] * 2
    for epoch in (batches[:5], batches[5:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(23))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: make_batches("sequential", 10, 2, seed=0), "unknown sampling kind"),
        (lambda: batches_with_replacement(0, 2, seed=0), "n "),
        (lambda: batches_reshuffled(10, 0, seed=0), "batch_size"),
        (lambda: batches_reshuffled(5, 8, seed=0), "drop_last"),
    ],
)
def test_sampler_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
