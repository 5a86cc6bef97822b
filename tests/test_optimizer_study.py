"""The optimizer validation study (trajlab.studies.optimizers): a small default version, and
issue 23's targets on 16 runs in the slow suite."""

from __future__ import annotations

import numpy as np
import pytest

from trajlab.studies.optimizers import CASES, Case, band_numbers, optimizer_validation


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


@pytest.mark.slow
def test_issue_23_targets(tmp_path):
    cases = [c for c in CASES if c.probe_every == 1]
    res = optimizer_validation(tmp_path, runs=16, steps=40, cases=cases, echo=False)
    for c in cases:
        assert res["cases"][c.name]["passes"], res["cases"][c.name]
