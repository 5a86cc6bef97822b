"""How tests/data/golden_v1.zarr was made (format version 1). Never regenerate it: the point of
a golden store is that later trajlab versions keep reading the bytes written by this one.

    python tests/data/make_golden.py   # refuses to overwrite
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from helpers import ConvModel

import trajlab

STORE = HERE / "golden_v1.zarr"
EXPECTED = HERE / "golden_v1_expected.json"
KEYS = ("K", "drift_flow", "drift_noise", "drift_noise_var", "diffusion2", "diffusion2_var",
        "pathwise_increment", "logK_drift", "logK_diffusion2", "logK_pred_var")


def main() -> None:
    if STORE.exists() or EXPECTED.exists():
        raise SystemExit(f"{STORE} exists; golden stores are never regenerated")
    torch.manual_seed(0)
    model = ConvModel().double()
    X = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    Y = torch.randint(0, 4, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with trajlab.Recorder(model, STORE, optimizer=opt, rank=2, sampler="with_replacement",
                          dataset_size=16, loss_fn=F.cross_entropy) as rec:
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            idx = torch.randint(0, 16, (4,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            opt.step()
    ds = trajlab.analyze(STORE, scheduler="synchronous", progress=False)
    expected = {k: ds[k].values.tolist() for k in KEYS}
    EXPECTED.write_text(json.dumps(expected, indent=1))


if __name__ == "__main__":
    main()
