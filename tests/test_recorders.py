"""The scripts in recorders/ and the CLI, end to end on tiny data."""

from __future__ import annotations

import runpy
import sys

import numpy as np
import pytest

import trajlab
from trajlab.cli import main as cli_main
from trajlab.data import write_cifar_dataset


def run_script(path, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [path, *argv])
    runpy.run_path(path, run_name="__main__")


def test_digits_recorder_script(tmp_path, monkeypatch, capsys):
    out = tmp_path / "d.zarr"
    run_script("recorders/digits.py", [str(out), "--model", "mlp", "--steps", "5",
                                       "--batch-size", "16", "--optimizer", "momentum",
                                       "--label-noise", "0.1", "--quiet"], monkeypatch)
    run = trajlab.open_run(out)
    assert run.n_steps == 5 and run.meta.user["config"]["optimizer"] == "momentum"
    assert "integrity   ok" in capsys.readouterr().out


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_recorder_on_tiny_binary_dataset(tmp_path, monkeypatch, dataset):
    rng = np.random.default_rng(0)
    n = 20
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    if dataset == "cifar10":
        labels = rng.integers(0, 10, n)
    else:
        labels = np.stack([rng.integers(0, 20, n), rng.integers(0, 100, n)], axis=1)
    write_cifar_dataset(tmp_path / "data", images, labels, dataset=dataset, train=True)
    out = tmp_path / "c.zarr"
    run_script("recorders/cifar.py", [str(out), "--root", str(tmp_path / "data"),
                                      "--dataset", dataset, "--steps", "2", "--batch-size", "4",
                                      "--quiet"], monkeypatch)
    run = trajlab.open_run(out)
    assert run.n_steps == 2
    kinds = {run.layer_meta(n).module for n in run.layers}
    assert kinds == {"Conv2d", "Linear"}
    assert run.root.indices.values.max() < n


@pytest.mark.parametrize("argv,expect", [
    (["--model", "resnet"], "invalid choice: 'resnet'"),
    (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--label-noise", "1.5"], "label_noise must be in [0, 1)"),
    (["--every", "0"], "every must be an integer >= 1"),
    (["--hidden", "0"], "hidden must be an integer >= 1"),
])
def test_recorder_scripts_refuse_bad_options_in_one_line(tmp_path, monkeypatch, capsys, argv,
                                                         expect):
    with pytest.raises(SystemExit) as stop:
        run_script("recorders/digits.py", [str(tmp_path / "d.zarr"), *argv, "--quiet"],
                   monkeypatch)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not (tmp_path / "d.zarr").exists()


def test_cifar_script_errors_are_one_line_and_its_model_is_fixed(tmp_path, monkeypatch,
                                                                 capsys):
    with pytest.raises(SystemExit) as stop:  # no such option: the architecture is fixed
        run_script("recorders/cifar.py", [str(tmp_path / "c.zarr"), "--root", str(tmp_path),
                                          "--hidden", "7"], monkeypatch)
    assert stop.value.code == 2 and "unrecognized arguments: --hidden" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # no data there
        run_script("recorders/cifar.py", [str(tmp_path / "c.zarr"), "--root", str(tmp_path),
                                          "--quiet"], monkeypatch)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    from trajlab.recipes import TrainConfig, record_cifar

    with pytest.raises(ValueError, match="fixed five-layer ConvNet: model, hidden"):
        record_cifar(tmp_path, tmp_path / "c.zarr", TrainConfig(model="mlp", hidden=7))


def test_cli_info_and_errors(tmp_path, capsys):
    assert cli_main(["info", str(tmp_path / "missing.zarr")]) == 2
    assert "no run store" in capsys.readouterr().err
    import zarr

    zarr.open_group(tmp_path / "other.zarr", mode="w")
    assert cli_main(["info", str(tmp_path / "other.zarr")]) == 2
    assert "not a trajlab run store" in capsys.readouterr().err


def test_cli_analyze_plot_and_accessor(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    from trajlab.recipes import TrainConfig, record_digits

    run = record_digits(tmp_path / "r.zarr", TrainConfig(model="mlp", steps=12, batch_size=16),
                        progress=False)
    assert cli_main(["analyze", str(run), "--out", str(tmp_path / "a.zarr"),
                     "--scheduler", "threads", "--quiet"]) == 0
    assert cli_main(["plot", str(tmp_path / "a.zarr"), "--kind", "validation", "drift", "noise",
                     "band", "--out-dir", str(tmp_path / "fig")]) == 0
    for kind in ("validation", "drift", "noise", "band"):
        assert (tmp_path / "fig" / f"a_{kind}.png").stat().st_size > 10_000
    ds = trajlab.open_analysis(tmp_path / "a.zarr")
    assert ds.K.dims == ("step", "layer") and "time" in ds.coords
    assert ds.K.attrs["description"].startswith("measured")
    fig = ds.lipschitz.plot_validation()
    assert len(fig.axes) >= len(ds.layer) + 1
