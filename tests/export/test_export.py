"""TensorBoard export: the event files read back with tensorboard's own reader equal the analysis."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import mlp64

import trajlab
from trajlab.cli import main as cli_main
from trajlab.export import LAYER_SCALARS, NETWORK_SCALARS, scalar_tag, to_tensorboard

NEEDS_TB = "needs the optional tensorboard package (pip install \"trajlab[tensorboard]\")"


def read_events(logdir):
    """Every scalar under ``logdir`` as {tag: (steps, float32 values)}, via EventAccumulator."""
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                 reason=NEEDS_TB)
    acc = ea_mod.EventAccumulator(str(logdir), size_guidance={ea_mod.SCALARS: 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events]),
                    np.array([e.value for e in events], dtype=np.float32))
    return out


def expected(ds, *, layers=None, every=1):
    """{tag: (steps, float32 values)} the export must write: finite values only."""
    ds = ds.load().isel(step=slice(None, None, every))
    layers = [str(n) for n in ds.layer.values] if layers is None else layers
    out = {}
    cols = [(scalar_tag(k, n), ds[k].sel(layer=n).values) for k in LAYER_SCALARS
            for n in layers]
    cols += [(scalar_tag(k), ds[k].values) for k in NETWORK_SCALARS]
    for tag, v in cols:
        ok = np.isfinite(v)
        if ok.any():
            out[tag] = (ds.step.values[ok], v[ok].astype(np.float32))
    return out


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for tag, (steps, values) in want.items():
        np.testing.assert_array_equal(got[tag][0], steps, err_msg=tag)
        np.testing.assert_array_equal(got[tag][1], values, err_msg=tag)


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    """A stored analysis of 10 recorded SGD steps of a two-layer MLP, starting at step 5."""
    torch.manual_seed(0)
    X = torch.randn(64, 6, dtype=torch.float64)
    Y = torch.randint(0, 4, (64,))
    base = tmp_path_factory.mktemp("export")
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with trajlab.Recorder(model, base / "run.zarr", optimizer=opt, loss_fn=F.cross_entropy,
                          start_step=5) as rec:
        for _ in range(10):
            idx = torch.randint(0, len(X), (8,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
    trajlab.analyze(base / "run.zarr", out=base / "analysis.zarr", scheduler="synchronous",
                    progress=False)
    return base / "analysis.zarr"


def test_event_files_hold_the_analysis(analysis, tmp_path):
    pytest.importorskip("tensorboard", reason=NEEDS_TB)
    out = to_tensorboard(analysis, tmp_path / "tb")
    assert out == tmp_path / "tb"
    ds = trajlab.open_analysis(analysis)
    got = read_events(out)
    assert_same(got, expected(ds))
    assert "trajlab/K/0" in got and "trajlab/net/K_net" in got
    assert got["trajlab/K/0"][0][0] == 5  # global_step is the optimizer step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out))
    acc.Reload()
    assert acc.SummaryMetadata("trajlab/K/2").plugin_data.plugin_name == "scalars"
    assert acc.SummaryMetadata("trajlab/K/2").summary_description.startswith("measured")
    assert acc.SummaryMetadata("trajlab/K/2").summary_description.endswith("(layer 2)")


def test_beside_the_users_own_training_curves(analysis, tmp_path):
    pytest.importorskip("tensorboard", reason=NEEDS_TB)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "exp1") as user:
        for step in range(5, 15):
            user.add_scalar("train/loss", 1.0 / step, step)
    to_tensorboard(analysis, tmp_path / "exp1")
    got = read_events(tmp_path / "exp1")  # one TensorBoard run holding both
    np.testing.assert_array_equal(got.pop("train/loss")[0], np.arange(5, 15))
    assert_same(got, expected(trajlab.open_analysis(analysis)))


def test_layers_every_and_run_name(analysis, tmp_path):
    pytest.importorskip("tensorboard", reason=NEEDS_TB)
    ds = trajlab.open_analysis(analysis)
    out = to_tensorboard(ds, tmp_path, run_name="trajlab", layers=["2"], every=3)
    assert out == tmp_path / "trajlab"
    got = read_events(out)
    assert_same(got, expected(ds, layers=["2"], every=3))
    assert not any(t.endswith("/0") for t in got)


def test_nan_values_are_not_written(analysis, tmp_path):
    pytest.importorskip("tensorboard", reason=NEEDS_TB)
    ds = trajlab.open_analysis(analysis).load()
    ds["K"][3, 0] = np.nan
    ds["logK_drift"][:] = np.nan
    got = read_events(to_tensorboard(ds, tmp_path))
    assert_same(got, expected(ds))
    assert ds.step.values[3] not in got["trajlab/K/0"][0]
    assert "trajlab/net/logK_drift" not in got


def test_lazy_analysis_loads_only_the_exported_variables(analysis, tmp_path):
    pytest.importorskip("tensorboard", reason=NEEDS_TB)

    def boom(block):
        raise AssertionError("the export loaded a variable it does not write")

    ds = trajlab.open_analysis(analysis)
    for k in ("noise_proj", "drift_noise_var", "logK_pred_var"):
        ds[k] = ds[k].copy(data=ds[k].data.map_blocks(boom, dtype=ds[k].dtype))
    got = read_events(to_tensorboard(ds, tmp_path))
    assert_same(got, expected(trajlab.open_analysis(analysis)))


def test_invalid_arguments(analysis, tmp_path):
    ds = trajlab.open_analysis(analysis)
    with pytest.raises(ValueError, match="unknown layer"):
        to_tensorboard(ds, tmp_path, layers=["nope"])
    with pytest.raises(ValueError, match="every"):
        to_tensorboard(ds, tmp_path, every=0)
    with pytest.raises(ValueError, match="run_name"):
        to_tensorboard(ds, tmp_path, run_name="../elsewhere")
    with pytest.raises(ValueError, match="export one analysis at a time"):
        to_tensorboard(ds.expand_dims(run=2), tmp_path)


def test_missing_tensorboard_names_the_extra(analysis, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r'pip install "trajlab\[tensorboard\]"'):
        to_tensorboard(analysis, tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
    assert cli_main(["export", str(analysis), "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "trajlab[tensorboard]"' in err


def test_cli_export(analysis, tmp_path, capsys):
    pytest.importorskip("tensorboard", reason=NEEDS_TB)
    assert cli_main(["export", str(analysis), "--tensorboard", str(tmp_path / "tb"),
                     "--every", "2"]) == 0
    assert "tensorboard ->" in capsys.readouterr().out
    ds = trajlab.open_analysis(analysis)
    assert_same(read_events(tmp_path / "tb"), expected(ds, every=2))


def test_cli_export_errors(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "missing.zarr"), "--tensorboard",
                     str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trajlab export: error:")
    assert "no analysis store" in err
    with pytest.raises(SystemExit) as exc:
        cli_main(["export", str(tmp_path / "missing.zarr"), "--tensorboard", "tb",
                  "--every", "0"])
    assert exc.value.code == 2
    assert "--every" in capsys.readouterr().err
