"""The kill matrix: a recording killed at each point of the store writer (store creation, chunk
write, resize, sample growth, commit marker, close), with both writers, the training process or
the writer child alone; every store then opens, verifies, resumes, and equals an uninterrupted
run bit for bit. Kill points are reached deterministically (tests/kill_worker.py), not timed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import trajlab

WORKER = Path(__file__).resolve().parents[1] / "kill_worker.py"
STEPS = 24
POINTS = {"create": "1", "chunk": "7", "resize": "1", "grow": "2", "commit_before": "5",
          "commit_after": "5", "close": "1"}
CASES = ([(p, "thread", "self") for p in POINTS]
         + [(p, "process", "self") for p in POINTS]
         + [(p, "process", "parent") for p in POINTS])
#: a few cases in the default suite; the whole matrix with `make test-slow`
FAST = {("grow", "thread", "self"), ("commit_before", "process", "self")}


def _run(store: Path, writer: str, *, kill: str | None = None, resume: bool = False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("TRAJLAB_KILL", None)
    if kill:
        env["TRAJLAB_KILL"] = kill
    cmd = [sys.executable, str(WORKER), str(store), str(STEPS), writer]
    return subprocess.run(cmd + (["--resume"] if resume else []), env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    store = tmp_path_factory.mktemp("ref") / "ref.zarr"
    out = _run(store, "thread")
    assert out.returncode == 0, out.stderr
    return trajlab.open_run(store)


def _same(a: np.ndarray, b: np.ndarray, dims: tuple[str, ...], what: str) -> None:
    """Bitwise equal, except that the padded sample axis may be wider in one of them (it grows
    with the largest batch seen); the extra columns must then be padding."""
    if "sample" in dims and a.shape != b.shape:
        ax = dims.index("sample")
        w = min(a.shape[ax], b.shape[ax])
        for x in (a, b):
            extra = np.take(x, range(w, x.shape[ax]), axis=ax)
            assert (np.isnan(extra) if x.dtype.kind == "f" else extra == -1).all(), what
        a, b = np.take(a, range(w), axis=ax), np.take(b, range(w), axis=ax)
    np.testing.assert_array_equal(a, b, err_msg=what)


def _assert_rows_equal(run, ref, n):
    assert run.steps.tolist() == list(range(n))
    if n == 0:
        return
    for name in ("batch_size", "loss", "indices"):
        a = run.root_rows([name])[name]
        b = ref.root_rows([name])[name][:n]
        _same(a, b, ("step", "sample") if name == "indices" else ("step",), name)
    for layer in ref.layers:
        a = run.layer(layer).compute()
        b = ref.layer(layer).isel(step=slice(0, n)).compute()
        for v in a.data_vars:
            if v != "update_stored":  # where updates are stored depends on the flushes
                _same(a[v].values, b[v].values, a[v].dims, f"{layer}/{v}")


def _params(cases):
    return [pytest.param(*c, marks=() if c in FAST else pytest.mark.slow, id="-".join(c))
            for c in cases]


@pytest.mark.parametrize("point, writer, who", _params(CASES))
def test_a_recording_killed_at_any_point_opens_verifies_resumes_and_equals_the_reference(
        tmp_path, reference, point, writer, who):
    store = tmp_path / "r.zarr"
    killed = _run(store, writer, kill=f"{point}:{POINTS[point]}:{who}")
    if writer == "thread" or who == "parent":
        assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    else:  # the child alone died: training finished and said why recording stopped
        assert killed.returncode == 0, killed.stderr[-2000:]
        assert "writer process was killed by SIGKILL" in killed.stderr
    run = trajlab.open_run(store)  # every store that exists opens ...
    assert run.verify() == []  # ... intact ...
    n = run.n_steps
    assert n < STEPS or point == "close"
    _assert_rows_equal(run, reference, n)  # ... holding exactly the committed steps
    if n < STEPS:
        resumed = _run(store, writer, resume=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    run = trajlab.open_run(store)
    assert run.verify() == []
    _assert_rows_equal(run, reference, STEPS)
