"""A killed ``trajlab analyze --scheduler processes`` leaves no worker process behind (issue 24,
item 8): the workers of Dask's process pool hold both ends of its task queue, so without help
they wait forever for tasks from a parent that is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import mlp64, train

ROOT = Path(__file__).resolve().parents[2]
#: Generous bounds: the workers' start (importing torch) takes seconds on a loaded machine; the
#: test waits for them, never for a fixed time.
START_TIMEOUT = 120.0
EXIT_TIMEOUT = 30.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree")
def test_killed_analyze_leaves_no_worker_processes(tmp_path):
    X = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(6))
    run = tmp_path / "run.zarr"
    train(mlp64(), X, Y, steps=8, store=run, recorder_kwargs={"chunk_steps": 2})
    code = ("import sys, torch; torch.set_num_threads(1); from trajlab.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-c", code, "analyze", str(run), "--out",
                             str(tmp_path / "analysis.zarr"), "--scheduler", "processes",
                             "--workers", "2", "--chunk-rows", "1", "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    everyone: list[psutil.Process] = []
    try:
        workers: list[psutil.Process] = []
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            children = parent.children(recursive=True)
            workers = [c for c in children if _is_pool_worker(c)]
            if len(workers) >= 2:
                break
            time.sleep(0.05)
        if proc.poll() is not None:
            pytest.fail(f"the analysis ended (status {proc.returncode}) before its workers "
                        "were seen")
        assert len(workers) >= 2, "the process pool's workers never started"
        everyone = parent.children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(everyone, timeout=EXIT_TIMEOUT)
        assert not alive, (f"{len(alive)} of {len(everyone)} child processes outlived the "
                           f"killed analysis: {[p.pid for p in alive]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for c in everyone:  # never leave strays behind when the test fails
            try:
                c.kill()
            except psutil.Error:
                pass


def _is_pool_worker(p: psutil.Process) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return "multiprocessing" in cmd and "resource_tracker" not in cmd

