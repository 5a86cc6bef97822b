"""How tests/data/golden_v2.zarr and golden_v2_analysis.zarr were made (run-store format 2,
analysis format 2). Never regenerate them: the point of a golden store is that later trajlab
versions keep reading the bytes written by this one.

    python tests/data/make_golden_v2.py   # refuses to overwrite

The run covers the sketch kinds of format 2 (subspace, rank-1, diagonal), a clipped gradient
(grad_scale < 1), a full-data probe, momentum and two param groups.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

import trajlab

STORE = HERE / "golden_v2.zarr"
ANALYSIS = HERE / "golden_v2_analysis.zarr"
EXPECTED = HERE / "golden_v2_expected.json"
KEYS = ("K", "drift_flow", "drift_noise", "drift_noise_var", "diffusion2", "diffusion2_var",
        "pathwise_increment", "drift_optimizer", "grad_scale", "dt", "logK_drift",
        "logK_diffusion2", "logK_pred_mean", "logK_pred_var")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 6), nn.LayerNorm(6), nn.Tanh(),
                         nn.Linear(6, 3)).double()


def main() -> None:
    if STORE.exists() or ANALYSIS.exists() or EXPECTED.exists():
        raise SystemExit(f"{STORE} exists; golden stores are never regenerated")
    m = model()
    X = torch.randn(16, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD([{"params": m[0].parameters(), "lr": 0.05},
                           {"params": [*m[3].parameters(), *m[4].parameters(),
                                       *m[6].parameters()], "lr": 0.1}], momentum=0.5)
    probe = trajlab.FullGradientProbe([(X, Y)], F.cross_entropy, every=2)
    g = torch.Generator().manual_seed(3)
    with trajlab.Recorder(m, STORE, optimizer=opt, sampler="with_replacement", dataset_size=16,
                          loss_fn=F.cross_entropy, probe=probe, chunk_steps=2,
                          metadata={"purpose": "golden format 2"}) as rec:
        for _ in range(4):
            idx = torch.randint(0, 16, (4,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(m(X[idx]), Y[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
    ds = trajlab.analyze(STORE, out=ANALYSIS, scheduler="synchronous", progress=False)
    EXPECTED.write_text(json.dumps({k: ds[k].values.tolist() for k in KEYS}, indent=1))


if __name__ == "__main__":
    main()
