"""One process of tests/integrations/test_integrations_ddp.py: a float64 MLP trained on fixed global
batches, either as rank `rank` of `world` DDP processes (gloo) that each take their share of
every global batch in rank order, or alone on the whole global batch (world = 1, no DDP).

Usage: python ddp_worker.py RANK WORLD INIT_FILE STORE STEPS [DIE_AT]: with DIE_AT, rank 1
exits abruptly (os._exit) before that step's optimizer.step()."""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys
import warnings

import torch

faulthandler.enable()  # a native abort (SIGABRT) prints every thread's Python stack

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import trajlab  # noqa: E402


def main() -> None:
    train(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]),
          int(sys.argv[6]) if len(sys.argv) > 6 else None)


def train(rank: int, world: int, init: str, store: str, steps: int,
          die_at: int | None = None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 6, generator=g, dtype=torch.float64)
    Y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()
    if world > 1:
        # generous: under load the other rank may take a minute to import torch and trajlab
        # (a 60 s limit once timed out in gloo's rendezvous on a loaded 2-core machine)
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=300))
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _loop(model, opt, X, Y, g, rank, world, store, steps, die_at)
    if world > 1:
        dist.destroy_process_group()


def _loop(model, opt, X, Y, g, rank, world, store, steps, die_at):
    per_rank = 8
    with trajlab.Recorder(model, store, optimizer=opt, loss_fn=F.cross_entropy,
                          sampler="with_replacement", dataset_size=len(X)) as rec:
        for step in range(steps):
            batch = torch.randint(0, len(X), (per_rank * 2,), generator=g)
            idx = batch if world == 1 else batch[rank * per_rank:(rank + 1) * per_rank]
            opt.zero_grad()
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            rec.log(loss=loss, indices=idx, inputs=X[idx], targets=Y[idx])
            if die_at is not None and rank == 1 and step == die_at:
                os._exit(1)
            opt.step()


if __name__ == "__main__":
    main()
