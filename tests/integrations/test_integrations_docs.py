"""docs/integrations.md: every ```python block runs as written (in a fresh directory, one
subprocess for all, one torch thread) and leaves a run store with one recorded
row per optimizer step that the example's own arithmetic says it takes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import trajlab

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
RUNNER = r"""
import json, os, sys, warnings
import torch
torch.set_num_threads(1)
warnings.simplefilter("ignore")
blocks = json.load(open(sys.argv[1]))
root = os.getcwd()
for i, code in enumerate(blocks):
    os.makedirs(f"{root}/block{i}")
    os.chdir(f"{root}/block{i}")
    ddp = "init_process_group" in code  # as torchrun would start it, with one process
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": sys.argv[2]} if ddp else {}
    os.environ.update(env)
    exec(compile(code, f"docs/integrations.md block {i}", "exec"), {"__name__": "__main__"})
    for k in env:
        del os.environ[k]
    os.chdir(root)
"""


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_doc_examples_run(tmp_path):
    for mod, extra in (("transformers", "hf"), ("accelerate", "hf"), ("lightning", "lightning")):
        pytest.importorskip(mod, reason=f"{mod} is not installed (pip install trajlab[{extra}])")
    code = blocks()
    assert len(code) == 5
    (tmp_path / "blocks.json").write_text(json.dumps(code))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(trajlab.__file__)
                                                                     .parent.parent)}
    with socket.socket() as s:  # a free port for the DDP example's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json"), str(port)],
                   cwd=tmp_path, check=True, timeout=600, env=env)
    # recorded optimizer steps: 12 steps every 2; 6 Trainer steps every 2; 16 micro-batches
    # in accumulations of 2; 16 Lightning batches, accumulations of 2, every 2; 10 DDP steps
    expected = [[0, 2, 4, 6, 8, 10], [0, 2, 4], list(range(8)), [0, 2, 4, 6], list(range(10))]
    for i, steps in enumerate(expected):
        run = trajlab.open_run(tmp_path / f"block{i}" / "run.zarr")
        assert run.steps.tolist() == steps, i
        W = run.layer(run.layers[0]).weight.values[-1].astype(np.float64)
        assert np.isfinite(np.linalg.svd(W, compute_uv=False)).all()
