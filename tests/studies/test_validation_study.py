"""The validation study of issue 4: its statistics on synthetic data, a small study, the full one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from trajlab.studies.ensemble import BAR, mean_check, variance_check, variance_horizon
from trajlab.studies.validation import run_validation


# ----------------------------------------------------------------------------- pure statistics
def test_variance_check_recovers_a_known_variance():
    rng = np.random.default_rng(0)
    m = rng.normal(0.0, 2.0, size=4000)
    res = variance_check(m, {"full": np.full(m.size, 4.0), "half": np.full(m.size, 2.0)})
    assert res["full"]["ratio"] == pytest.approx(1.0, rel=0.1)
    assert res["full"]["within_bar"] and res["full"]["consistent_with_bar"]
    assert res["half"]["ratio"] == pytest.approx(2.0, rel=0.1) and not res["half"]["within_bar"]
    lo, hi = res["full"]["ratio_ci"]
    assert lo < res["full"]["ratio"] < hi
    assert res["rel_sd"] == pytest.approx(math.sqrt(2 / 3999))


def test_variance_check_band_covers_the_truth_at_its_level():
    """Over many 16-run ensembles the 95% chi-square band holds the true ratio 1 ~95% of times."""
    rng = np.random.default_rng(1)
    hits = [variance_check(rng.normal(size=16), {"p": np.ones(16)})["p"]["ratio_ci"]
            for _ in range(2000)]
    cover = np.mean([lo <= 1.0 <= hi for lo, hi in hits])
    assert 0.93 < cover < 0.97


def test_mean_check_ratio_and_paired_residual():
    rng = np.random.default_rng(2)
    pred = 1.0 + 0.1 * rng.normal(size=64)
    meas = pred + 0.05 + 0.01 * rng.normal(size=64)
    res = mean_check(meas, {"ito": pred})
    assert res["ito"]["ratio"] == pytest.approx(meas.mean() / pred.mean())
    assert res["ito"]["residual"]["mean"] == pytest.approx(0.05, abs=0.005)
    assert res["ito"]["residual"]["se"] < 0.002  # paired: the run-to-run spread cancels
    assert res["ito"]["within_bar"]


def test_variance_horizon_on_brownian_motion_and_on_mean_reversion():
    """Brownian paths never part from int sigma^2; Ornstein-Uhlenbeck paths part for good."""
    rng = np.random.default_rng(3)
    n, T, dt = 400, 300, 0.05
    xi = rng.normal(size=(n, T - 1)) * math.sqrt(dt)
    bm = np.concatenate([np.zeros((n, 1)), np.cumsum(xi, 1)], 1)
    pred = np.broadcast_to(np.arange(T) * dt, (n, T))
    hz = variance_horizon(bm, pred)
    assert hz["burn_in_rows"] == 1 and hz["parting_row"] is None
    assert hz["ratio_end"] == pytest.approx(1.0, rel=0.2)
    ou = np.zeros((n, T))
    for t in range(1, T):  # dX = -2 X dt + dB: Var saturates at 1/4, int sigma^2 grows as t
        ou[:, t] = ou[:, t - 1] * (1 - 2 * dt) + xi[:, t - 1]
    hz = variance_horizon(ou, pred)
    assert hz["parting_row"] is not None and hz["ratio_end"] < 1 / BAR
    assert hz["first_exit_row"] <= hz["parting_row"]
    np.testing.assert_allclose(hz["curves"]["var_Z"], ou.var(0, ddof=1))


# ----------------------------------------------------------------------------- the study, small
@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("validation")
    res = run_validation(out, n_runs=4, steps=40, hidden=16, batch_size=16,
                         scheduler="synchronous", progress=False)
    return out, res


def _finite_numbers(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _finite_numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(x, float):
        yield path, x


def test_small_study_computes_every_statistic(small_study):
    _out, res = small_study
    for sampler in ("with_replacement", "reshuffle"):
        s = res[sampler]
        assert s["n_runs"] == 4
        for grad in ("batch", "auto"):
            g = s[grad]
            for pred in ("ito", "ito_plus_discretization"):
                assert math.isfinite(g["mean"][pred]["ratio"])
                assert g["mean"][pred]["predicted"]["se"] > 0
            for form in ("full", "blockdiag"):
                assert g["martingale"][form]["ratio"] > 0
                lo, hi = g["martingale"][form]["ratio_ci"]
                assert lo < g["martingale"][form]["ratio"] < hi
            assert g["nonfinite_rates"] == 0
        assert s["horizon"]["burn_in_rows"] >= 1
        assert math.isfinite(s["horizon"]["ratio_end"])
        assert np.isfinite(s["flow_bias"]["batch_minus_probe"]["mean"])
    # The noise terms do not depend on the gradient choice; the flow term does.
    wr = res["with_replacement"]
    assert wr["batch"]["martingale"]["full"]["predicted"]["mean"] == pytest.approx(
        wr["auto"]["martingale"]["full"]["predicted"]["mean"], rel=1e-12)
    # With the flow term from the batch gradient, M loses the first-order noise (check 2 needs
    # the probe); the probe's martingale variance is orders of magnitude larger.
    assert (wr["batch"]["martingale"]["measured_var"]
            < 0.1 * wr["auto"]["martingale"]["measured_var"])
    curves = res["curves"]
    T = len(curves["step"])
    assert T == 40
    for sampler in ("with_replacement", "reshuffle"):
        assert curves[sampler]["var_Z"][0] < 1e-20 and curves[sampler]["pred_var"][0] == 0
        assert all(len(v) == T for v in curves[sampler].values())
    assert len(res["verdict"]) == 4


def test_small_study_writes_json_and_figure(small_study):
    out, res = small_study
    data = json.loads((out / "validation.json").read_text())
    assert data["with_replacement"]["auto"]["martingale"]["full"]["ratio"] == pytest.approx(
        res["with_replacement"]["auto"]["martingale"]["full"]["ratio"])
    bad = [p for p, v in _finite_numbers(data) if not math.isfinite(v)]
    assert not bad
    png = (out / "validation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert len(list((out / "runs").glob("*.zarr"))) == 8


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_runs"):
        run_validation(tmp_path, n_runs=1, progress=False)
    with pytest.raises(ValueError, match="probe_every"):
        run_validation(tmp_path, probe_every=0, progress=False)


# ----------------------------------------------------------------------------- the study, full
@pytest.mark.slow
def test_full_study_meets_the_bars_with_independent_batches(tmp_path):
    """Issue 4's bars at the defaults (measured figures in docs/validation.md)."""
    res = run_validation(tmp_path, scheduler="synchronous", progress=False)
    wr = res["with_replacement"]["auto"]
    assert wr["mean"]["ito"]["within_bar"]
    assert wr["mean"]["ito_plus_discretization"]["within_bar"]
    assert wr["martingale"]["full"]["within_bar"]
    assert wr["martingale"]["blockdiag"]["within_bar"]
