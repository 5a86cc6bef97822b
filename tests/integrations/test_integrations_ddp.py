"""DistributedDataParallel with 2 gloo processes on the CPU (issue 22, item 5): one store whose
sample axis holds both ranks' samples in rank order, written by rank 0 alone; its analysis
equals a one-process run on the same global batches (float64) within 1e-8; a rank that dies
loses nothing committed. The processes are tests/ddp_worker.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import trajlab

WORKER = Path(__file__).resolve().parents[1] / "ddp_worker.py"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _start(tmp_path, rank, world, store, steps, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(trajlab.__file__).parent.parent)}
    return subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world),
                             str(tmp_path / "init"), str(store), str(steps), *map(str, extra)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait(procs, timeout=900):
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=timeout)
        out.append((p.returncode, text))
    return out


def test_two_ranks_equal_one_process(tmp_path):
    steps = 6
    from ddp_worker import train

    procs = [_start(tmp_path, 0, 2, tmp_path / "ddp.zarr", steps),
             _start(tmp_path, 1, 2, tmp_path / "ddp.zarr", steps)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(0, 1, "", str(tmp_path / "one.zarr"), steps)  # here, while the ranks start
    finally:
        torch.set_num_threads(threads)
    for rank, (rc, text) in enumerate(_wait(procs)):
        assert rc == 0, f"rank {rank} exited with {rc}:\n{text[-3000:]}"
    ddp, one = trajlab.open_run(tmp_path / "ddp.zarr"), trajlab.open_run(tmp_path / "one.zarr")
    assert ddp.steps.tolist() == list(range(steps))
    assert ddp.root.batch_size.values.tolist() == [16] * steps  # 8 samples from each rank
    np.testing.assert_array_equal(ddp.root.indices.values, one.root.indices.values)
    assert ddp.layers == one.layers == ("0", "2")  # the wrapped module's names
    for name in ddp.layers:
        np.testing.assert_allclose(ddp.layer(name).weight.values, one.layer(name).weight.values,
                                   rtol=0, atol=1e-13)
    a = trajlab.analyze(tmp_path / "ddp.zarr", scheduler="synchronous", progress=False)
    b = trajlab.analyze(tmp_path / "one.zarr", scheduler="synchronous", progress=False)
    compared = 0
    for v in b.data_vars:
        x, y = a[v].values, b[v].values
        if y.dtype.kind != "f":
            continue
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=v)
        if np.isfinite(y).any():
            scale = max(float(np.nanmax(np.abs(y))), 1e-300)
            assert float(np.nanmax(np.abs(x - y))) <= 1e-8 * scale, v
            compared += 1
    assert compared > 10
    assert not list(tmp_path.glob("*.zarr.lock"))  # released


def test_a_rank_that_dies_loses_nothing_committed(tmp_path):
    """Rank 1 exits abruptly before step 4's optimizer.step(): rank 0's next collective fails,
    the training loop raises, and the store keeps steps 0..3, intact."""
    procs = [_start(tmp_path, 0, 2, tmp_path / "ddp.zarr", 8, 4),
             _start(tmp_path, 1, 2, tmp_path / "ddp.zarr", 8, 4)]
    (rc0, text0), (rc1, _) = _wait(procs)
    assert rc0 != 0 and rc1 != 0, text0[-2000:]
    run = trajlab.open_run(tmp_path / "ddp.zarr")
    assert run.steps.tolist() == [0, 1, 2, 3]
    assert run.verify() == []


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hf", "lightning"])
def test_trainers_under_ddp(tmp_path, which):
    """The Hugging Face Trainer and Lightning (strategy="ddp") under torchrun with 2 gloo
    processes, each with its RecorderCallback: one store, the global batch (2 ranks x 2
    micro-batches) per optimizer step, the weights rank 0's optimizer saw (its own hook)."""
    pytest.importorskip("transformers" if which == "hf" else "lightning",
                        reason=f"{which} is not installed")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(trajlab.__file__).parent.parent)}
    store, snaps = tmp_path / "run.zarr", tmp_path / "snaps.pt"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(port), str(WORKER.parent / "ddp_trainers_worker.py"),
                          which, str(store), str(snaps)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    run = trajlab.open_run(store)
    assert run.steps.tolist() == [0, 1, 2, 3]
    assert run.root.batch_size.values.tolist() == [16 if which == "hf" else 64] * 4
    name = "transformer.h.0.mlp.c_fc" if which == "hf" else "net.0"
    want = torch.stack(torch.load(snaps)).numpy()
    np.testing.assert_array_equal(run.layer(name).weight.values, want)
