"""The paper's studies (analyses/study_*.py, one module each in trajlab.studies, found by the
registry): each --quick path end to end, the --runs path on existing stores, identities of the
numbers they report, and the registry and ``trajlab study``."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from trajlab.cli import build_parser as cli_parser
from trajlab.cli import main as cli_main
from trajlab.plot.figures import moving_average
from trajlab.studies import common, numbers, sweep
from trajlab.studies.registry import STUDIES as REGISTRY
from trajlab.studies.registry import Study, build_parser, run_study

ROOT = Path(__file__).resolve().parents[2]
STUDIES = {  # entry point -> (JSON, figures)
    "theory": ("theory.json", ["theory_mlp.png"]),
    "convergence": ("convergence.json", ["convergence_mlp.png", "convergence_drift_mlp.png",
                                         "convergence_noise_mlp.png"]),
    "orders": ("orders.json", ["orders.png"]),
    "batch_size": ("batch_size.json", ["batch_size.png", "batch_size_drift.png"]),
    "label_noise": ("label_noise.json", ["label_noise.png", "label_noise_drift.png"]),
    "init_scale": ("init_scale.json", ["init_scale.png", "init_scale_drift.png"]),
    "weight_decay": ("weight_decay.json", ["weight_decay.png", "weight_decay_drift.png"]),
}


def entry_point(name: str):
    spec = importlib.util.spec_from_file_location(f"study_{name}",
                                                  ROOT / "analyses" / f"study_{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def leaves(x, path="$"):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def assert_finite_json(path: Path) -> dict:
    data = json.loads(path.read_text())
    for where, v in leaves(data):
        if where.endswith(".supported"):
            assert v is None or isinstance(v, bool), where
            continue
        assert v is not None, f"{where} is null (non-finite) in {path.name}"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            assert math.isfinite(v), where
    return data


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Every study's --quick run, once per test module (about 30 s in all on 2 cores)."""
    root = tmp_path_factory.mktemp("studies")
    results = {}
    for name in STUDIES:
        results[name] = entry_point(name)(["--out", str(root / name), "--quick"])
    return root, results


@pytest.mark.parametrize("name", list(STUDIES))
def test_quick_study_writes_finite_json_and_figures(quick, name):
    root, results = quick
    js, figs = STUDIES[name]
    data = assert_finite_json(root / name / js)
    assert data == results[name]  # the returned dict is what was written
    assert data["verdict"] and data["claim"] and set(figs) <= set(data["figures"])
    for f in data["figures"]:
        png = root / name / f
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_runs_option_analyses_existing_stores_and_reads_the_swept_value(quick, tmp_path):
    root, results = quick
    res = entry_point("batch_size")(["--out", str(tmp_path / "again"), "--quick",
                                     "--runs", str(root / "batch_size" / "runs")])
    assert res["numbers"]["batch_size"] == [8.0, 32.0]
    assert not (tmp_path / "again" / "runs").exists()  # nothing recorded
    before = results["batch_size"]["numbers"]["per_run"]
    for a, b in zip(res["numbers"]["per_run"], before):
        assert a["sigma_Z2_mean"] == pytest.approx(b["sigma_Z2_mean"], rel=1e-12)


def test_sweep_reuses_stores_with_the_same_config(quick):
    root, _ = quick
    runs = sorted((root / "label_noise" / "runs").iterdir())
    stamp = [p.joinpath("zarr.json").stat().st_mtime_ns for p in runs]
    cfg = common.BASE.replace(steps=30, hidden=8, batch_size=16)
    again = sweep.record_sweep(root / "label_noise",
                               {"label_noise-0": cfg.replace(label_noise=0.0),
                                "label_noise-0.4": cfg.replace(label_noise=0.4)})
    assert sorted(again) == runs
    assert [p.joinpath("zarr.json").stat().st_mtime_ns for p in runs] == stamp


def test_drift_parts_add_up_and_weight_decay_is_outside_grad(quick):
    root, results = quick
    ds = sweep.analyse_runs(sweep.find_runs([root / "weight_decay" / "runs"]),
                            root / "weight_decay").datasets[-1].load()
    parts = numbers.drift_parts(ds)
    np.testing.assert_allclose(parts["flow"] + parts["kappa"] + parts["ito"], parts["total"],
                               rtol=1e-10, atol=1e-14)
    wd = results["weight_decay"]["numbers"]
    assert wd["weight_decay"] == [0.0, 0.01] and wd["grad_excludes_decay"]
    r0, r1 = wd["per_run"]
    assert r0["grad_check_update_residual"] < 1e-10 < r1["grad_check_update_residual"]
    # the pathwise term (recorded update) sees the decay; so does the forward prediction of the
    # SDE of SGD with L2 decay (the former check used the realised update's optimizer drift)
    assert abs(r1["forward_pred_delta_Z"] - r1["pathwise_delta_Z"]) < \
        abs(r1["pred_delta_Z"] - r1["pathwise_delta_Z"])
    # for SGD's L2 decay the optimizer drift is exactly -lambda per layer: -lambda * L * t
    assert abs(r0["int_drift_optimizer"]) < 1e-9
    np.testing.assert_allclose(r1["int_drift_optimizer"], r1["decay_term_reference"], rtol=1e-6)


def test_find_runs_rejects_paths_without_run_stores(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a trajlab run store"):
        sweep.find_runs([tmp_path])


def test_json_writer_nulls_non_finite_numbers(tmp_path):
    out = sweep.write_json(tmp_path / "x.json", {"a": np.float64("nan"), "b": np.arange(2),
                                                  "c": (np.bool_(True), Path("p"))})
    assert out == {"a": None, "b": [0, 1], "c": [True, "p"]}


def test_moving_average_is_flat_on_constants_and_ignores_nan():
    y = np.full(50, 3.0)
    y[7] = np.nan
    np.testing.assert_allclose(moving_average(y, 10), 3.0)


def test_registry_lists_every_study_module():
    """Every module under trajlab/studies/ that defines STUDY is registered under its name;
    the entry points of analyses/ are the registry's studies."""
    pkg = ROOT / "trajlab" / "studies"
    declared = sorted(p.stem for p in pkg.glob("*.py") if "\nSTUDY = " in p.read_text())
    assert len(declared) == len(REGISTRY)
    for name, study in REGISTRY.items():
        assert isinstance(study, Study) and study.name == name and study.summary
    assert set(STUDIES) | {"validation", "optimizers"} <= set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_study_has_a_command_line(name, capsys):
    """``trajlab study NAME --help`` and the study's own parser format (no argparse % traps)."""
    assert build_parser(REGISTRY[name]).format_help()
    with pytest.raises(SystemExit) as e:
        cli_parser().parse_args(["study", name, "--help"])
    assert e.value.code == 0 and name in capsys.readouterr().out


def test_unknown_study_is_named_with_the_choices(capsys):
    with pytest.raises(ValueError, match="unknown study 'nope'.*theory"):
        run_study("nope", ["--out", "x"])
    with pytest.raises(SystemExit) as e:
        cli_main(["study", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_trajlab_study_runs_a_registered_study(quick, tmp_path):
    """The CLI runs the same study as the entry point (the --runs path: nothing recorded)."""
    root, results = quick
    out = tmp_path / "cli"
    assert cli_main(["study", "theory", "--out", str(out), "--quick",
                     "--runs", str(root / "theory" / "runs")]) == 0
    data = json.loads((out / "theory.json").read_text())
    assert data["verdict"] == results["theory"]["verdict"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STUDIES))
def test_full_size_study(tmp_path, name):
    """The full-size study as documented in docs/studies.md (minutes each on 2 cores)."""
    res = entry_point(name)(["--out", str(tmp_path / name)])
    assert_finite_json(tmp_path / name / STUDIES[name][0])
    assert res["runtime_s"] < 600
