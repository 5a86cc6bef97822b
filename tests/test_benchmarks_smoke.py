"""benchmarks/paper_scale.py cannot rot: a few-step run end to end, and its projection against
a computation by hand."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_paper_scale(monkeypatch):
    # the benchmark sets OMP_WAIT_POLICY for itself at import: not for the rest of the suite
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    spec = importlib.util.spec_from_file_location("paper_scale", BENCH / "paper_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_scale"] = module  # dataclasses look their module up
    sys.path.insert(0, str(BENCH))  # it imports record_overhead from beside it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_projection_is_the_cost_estimate_of_the_measured_figures(tmp_path, monkeypatch):
    ps = load_paper_scale(monkeypatch)
    r = ps.Recording(batch=128, every=10, recorded=40, plain_s=0.1, step_s=0.13, ratios=[1.3],
                     first_s=0.5, close_s=0.2, logical=6e6, stored=4e6, on_disk=4.1e6, load=1.0,
                     store=tmp_path)
    # one recorded step in ten: 10 x 0.13 = 9 x 0.1 + recorded
    assert r.recorded_step_s == pytest.approx(0.4)
    e = r.estimate(30_000)
    assert e.recorded_steps == 3000
    assert e.total_bytes == pytest.approx(3000 * 4e6)
    fixed = (0.5 - 0.4) + 0.2
    assert e.total_seconds == pytest.approx(27_000 * 0.1 + 3000 * 0.4 + fixed)
    # every=1: the recorded step is the measured step
    r1 = ps.Recording(**{**r.__dict__, "every": 1})
    assert r1.recorded_step_s == pytest.approx(0.13)
    assert r1.estimate(344_370).total_bytes == pytest.approx(344_370 * 4e6)


def test_quick_run_end_to_end(tmp_path):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, str(BENCH / "paper_scale.py"), "--quick", "--steps", "3",
           "--steps-every10", "1", "--blocks", "1", "--batch", "4", "--dir", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "OMP_WAIT_POLICY=PASSIVE" in out and "load average" in out
    for text in ("1. Recording", "2. Analysis", "3. Projection", "Fig. 2", "Fig. 3"):
        assert text in out
    rows = [line.split() for line in out.splitlines()]
    assert any(r[:2] == ["4", "matrix"] for r in rows)
    assert any(r[:2] == ["4", "operator"] for r in rows)
    # every=1 and every=10, printed once the batch size is done and again in the summary
    assert sum(r[:2] == ["Fig.", "3"] for r in rows) == 4
    assert list(tmp_path.iterdir()) == []  # the stores were removed
