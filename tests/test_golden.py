"""A store written by format version 1 keeps opening and analysing identically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import trajlab

DATA = Path(__file__).parent / "data"


def test_golden_v1_store_opens_and_analyses_identically(tmp_path):
    store = tmp_path / "golden.zarr"
    shutil.copytree(DATA / "golden_v1.zarr", store)  # never touch the committed copy
    run = trajlab.open_run(store)
    assert run.meta.format_version == 1
    assert run.layers == ("conv", "fc") and run.n_steps == 4
    assert run.layer_meta("conv").sketch == "subspace"
    assert run.layer_meta("fc").sketch == "rank1"
    ps = trajlab.per_sample_gradients(run, "fc", 2)
    np.testing.assert_allclose(ps.grads.mean(0), run.layer("fc").grad.sel(step=2).values,
                               rtol=1e-12, atol=1e-15)
    ds = trajlab.analyze(run, scheduler="synchronous", progress=False)
    expected = json.loads((DATA / "golden_v1_expected.json").read_text())
    for k, v in expected.items():
        np.testing.assert_allclose(ds[k].values, np.array(v, dtype=float), rtol=1e-10,
                                   atol=1e-300, err_msg=k)
