"""The optimizer validation study (trajlab.studies.optimizers): a small default version, and
issue 23's targets on 16 runs in the slow suite."""

from __future__ import annotations

import numpy as np
import pytest

from trajlab.studies.optimizers import (
    CASES,
    CLIP_CASES,
    Case,
    band_numbers,
    clip_aware_sgd,
    clip_statistics,
    optimizer_validation,
)


def test_band_numbers_against_hand_counts():
    Z = np.array([0.0, 1.0, 2.0, 10.0])
    n = band_numbers(Z, np.array([0.0, 1.0, 2.5, 2.0]), np.full(4, 1.0))
    assert n["coverage"] == 3  # |10 - 2| > 1.96
    resid = Z - np.array([0.0, 1.0, 2.5, 2.0])
    assert n["pred_sd_over_residual_sd"] == pytest.approx(1 / np.std(resid, ddof=1))
    assert n["pred_sd_over_spread"] == pytest.approx(1 / np.std(Z, ddof=1))
    assert band_numbers(Z, np.full(4, np.nan), np.ones(4))["coverage"] is None


def test_small_study_runs(tmp_path):
    res = optimizer_validation(tmp_path, runs=3, steps=6, hidden=8, batch_size=8, echo=False,
                               cases=(Case("SGD", "sgd", 0.05), Case("SGD, no probe", "sgd",
                                                                      0.05, probe_every=0),
                                      Case("Adam", "adam", 0.002)))
    assert (tmp_path / "optimizer_validation.json").exists()
    assert res["cases"]["SGD"]["coverage"] is not None
    assert res["cases"]["SGD, no probe"]["coverage"] is None
    assert res["cases"]["Adam"]["theory"].startswith("SDE for Adam")


def test_clip_statistics_against_hand_counts():
    n = clip_statistics(np.array([1.0, 0.5, 0.25, np.nan, 1.0, 0.75]))
    assert n["clipped_fraction"] == pytest.approx(3 / 5)
    assert n["median_clip_factor"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no finite clip factor"):
        clip_statistics(np.array([np.nan]))
    with pytest.raises(ValueError, match="max-norm"):
        Case("bad", "sgd", 0.05, clip=0.0)


def test_small_clipped_study_records_the_clip_factor(tmp_path):
    """The clipped setting, small: clip_grad_norm_ binds, the recorder stores its factor."""
    import torch
    import xarray as xr

    from trajlab.data import load_digits, make_batches
    from trajlab.recipes import TrainConfig, digits_model

    clip = 0.05
    res = optimizer_validation(tmp_path, runs=2, steps=4, hidden=8, batch_size=8, echo=False,
                               cases=(Case("SGD clipped", "sgd", 0.05, clip=clip),))
    n = res["cases"]["SGD clipped"]
    assert n["coverage"] is not None and n["clip"] == clip
    assert n["clipped_fraction"] == 1.0 and 0 < n["median_clip_factor"] < 1
    # independent: the first step's factor from a plain backward of the same first batch
    cfg = TrainConfig(model="mlp", hidden=8, batch_size=8, lr=0.05, dtype="float64",
                      init_seed=0, sampling_seed=0)
    X, Y = load_digits(flatten=True, split="train")
    model = digits_model(cfg).to(torch.float64)
    idx = next(make_batches(cfg.sampler, len(X), cfg.batch_size, seed=0))
    torch.nn.functional.cross_entropy(model(X[idx].double()), Y[idx]).backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())).item()
    from trajlab.analysis import analyze

    ds = analyze(tmp_path / "runs" / "sgd-clipped-00.zarr", progress=False)
    assert isinstance(ds, xr.Dataset)
    # clip_grad_norm_'s coefficient is max_norm / (norm + 1e-6)
    expected = clip / (norm + 1e-6)
    assert float(ds["grad_scale"].isel(step=0, layer=0)) == pytest.approx(expected, rel=1e-9)
    m = n["clip_modelled"]
    assert m["coverage"] is not None and 0 < m["pred_sd"]
    # the clip-aware prediction with kappa = the realised factor has the analysis's variance
    # (the realised factor squared is already in its noise terms)
    c = np.asarray(ds["grad_scale"].isel(layer=0))
    assert clip_aware_sgd(ds, c)[1] == pytest.approx(float(ds["logK_pred_var"][-1]), rel=1e-9)


@pytest.mark.slow
def test_clipped_cases_run(tmp_path):
    """The full clipped setting (issue 23 item 4): clipping binds on most steps; SGD with the
    expected clip factor modelled meets the targets (docs/validation.md); the unmodelled
    figures are reported, not asserted."""
    res = optimizer_validation(tmp_path, runs=16, steps=40, cases=CLIP_CASES, echo=False)
    for c in CLIP_CASES:
        n = res["cases"][c.name]
        assert n["clipped_fraction"] > 0.5 and n["coverage"] is not None, n
        if c.optimizer == "sgd":
            assert n["clip_modelled"]["passes"], n["clip_modelled"]


@pytest.mark.slow
def test_issue_23_targets(tmp_path):
    cases = [c for c in CASES if c.probe_every == 1]
    res = optimizer_validation(tmp_path, runs=16, steps=40, cases=cases, echo=False)
    for c in cases:
        assert res["cases"][c.name]["passes"], res["cases"][c.name]
