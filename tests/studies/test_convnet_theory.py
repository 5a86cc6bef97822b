"""Paper Fig. 2 on the five-layer ConvNet (trajlab.studies.convnet_theory): the stand-in data
against an independent computation, the CIFAR path on tiny binary files, the quick study through
``trajlab study``, and the full size in the slow suite."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from trajlab.cli import main as cli_main
from trajlab.data.cifar import write_cifar_dataset
from trajlab.data.digits import load_digits
from trajlab.studies.convnet_theory import (
    FULL,
    QUICK,
    convnet_theory,
    study_data,
    theory_limits,
    upscaled_digits,
)
from trajlab.studies.registry import STUDIES


def test_upscaled_digits_are_the_digits_in_cifar_shape():
    X, Y = upscaled_digits(20)
    assert X.shape == (20, 3, 32, 32) and X.dtype == torch.float64
    _, y_train = load_digits(split="train")
    np.testing.assert_array_equal(Y.numpy(), y_train[:20].numpy())
    # independently: the raw 8x8 digit blown up by a Kronecker product, then standardised
    x_train, _ = load_digits(split="train", dtype=torch.float64)
    big = np.stack([np.kron(x.numpy().reshape(8, 8), np.ones((4, 4))) for x in x_train[:20]])
    big = np.repeat(big[:, None], 3, axis=1)
    big = (big - big.mean()) / big.std(ddof=1)
    np.testing.assert_allclose(X.numpy(), big, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="more than the .* training digits"):
        upscaled_digits(10_000)


def test_cifar_files_are_used_when_given(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=40)
    write_cifar_dataset(tmp_path, images, labels)
    X, Y, classes, data = study_data(24, cifar=tmp_path)
    assert X.shape == (24, 3, 32, 32) and classes == 10 and data.startswith("CIFAR-10")
    np.testing.assert_array_equal(Y.numpy(), labels[:24])
    with pytest.raises(FileNotFoundError):
        study_data(8, cifar=tmp_path / "missing")
    res = convnet_theory(tmp_path / "out", cifar=tmp_path, echo=False, scheduler="synchronous",
                         setting=dataclasses.replace(QUICK, n_train=32, steps=6))
    assert res["cifar"] and res["data"].startswith("CIFAR-10")
    assert res["verdict"][-1] == f"data: {res['data']}"


def test_quick_study_through_the_registry(tmp_path):
    assert "convnet_theory" in STUDIES
    out = tmp_path / "quick"
    assert cli_main(["study", "convnet_theory", "--quick", "--out", str(out),
                     "--scheduler", "synchronous"]) == 0
    res = json.loads((out / "convnet_theory.json").read_text())
    assert not res["cifar"] and "stand-in" in res["data"] and "stand-in" in res["setting"]
    assert res["theory"] == "SDE for SGD (paper)"
    (run,) = res["runs"].values()
    assert len(run["layers"]) == 5  # 3 convolutions, 2 linear layers
    net = run["network"]
    assert 0 <= net["inside_band_fraction"] <= 1 and np.isfinite(net["pred_rel_err_end"])
    assert isinstance(res["supported"], bool) and res["bands"] is None
    png = (out / res["figures"][0]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_several_orders_report_the_band_figures(tmp_path):
    res = convnet_theory(tmp_path, setting=dataclasses.replace(QUICK, steps=6, runs=3),
                         echo=False, scheduler="synchronous")
    b = res["bands"]
    assert b["runs"] == 3 and 0 <= b["coverage"] <= 3
    assert "sampling orders" in res["verdict"][-2]
    assert len(res["figures"]) == 3


def test_theory_limits_against_hand_counts():
    """Two layers, three steps: the flag, its share of the pathwise error and the end error
    with the discretization integral, computed by hand."""
    import xarray as xr

    K = np.array([[1.0, 2.0], [1.01, 2.0], [1.2, 2.0]])
    gap = np.array([[0.1, 0.5], [0.01, 0.5], [0.1, 0.5]])          # relative
    first = np.array([[0.01, 0.0], [0.0, 0.0], [0.0, 0.0]])
    inc = np.array([[0.011, 0.001], [0.3, 0.0], [np.nan, np.nan]])  # step 1: 0.3 > 0.01 / 4
    ds = xr.Dataset({
        "K": (("step", "layer"), K), "spectral_gap": (("step", "layer"), gap),
        "pathwise_first_order": (("step", "layer"), first),
        "pathwise_increment": (("step", "layer"), inc),
        "logK": ("step", [0.0, 0.1, 0.5]), "logK_pred_mean": ("step", [0.0, 0.05, 0.2]),
        "logK_discretization_integral": ("step", [0.0, 0.1, 0.2]),
    }, coords={"layer": [9, 11]})
    lim = theory_limits(ds)
    assert lim["second_order_outside"] == {"9": 1, "11": 0}
    err9 = [abs(0.011 - 0.01), abs(0.3 - 0.19)]
    assert lim["outside_share_of_pathwise_error"]["9"] == pytest.approx(err9[1] / sum(err9))
    assert lim["outside_share_of_pathwise_error"]["11"] == 0.0
    assert lim["pred_rel_err_end_with_discretization"] == pytest.approx(np.exp(-0.1) - 1)


@pytest.mark.slow
def test_full_size_convnet_study(tmp_path):
    """The full size of docs/validation.md on the stand-in data (CIFAR is not shipped)."""
    res = convnet_theory(tmp_path, setting=FULL, echo=False, scheduler="synchronous")
    net = next(iter(res["runs"].values()))["network"]
    assert np.isfinite(net["pred_rel_err_end"]) and net["inside_band_fraction"] > 0
