"""trajlab.estimate / `trajlab estimate`: a cost plan measured on a copy of the model."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import mlp64

import trajlab
from trajlab.cli import main as cli_main
from trajlab.cost import CostEstimate, estimate, parse_bytes


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 6, dtype=torch.float64, generator=g), torch.randint(0, 4, (16,),
                                                                              generator=g)


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_the_estimate_leaves_the_run_alone_and_matches_a_real_recording(tmp_path):
    model = mlp64()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    plan = estimate(model, (x, y), optimizer=opt, steps=1000, every=4, measure_steps=6,
                    target=tmp_path / "future.zarr")
    for k, v in model.state_dict().items():  # the user's model and optimizer are untouched
        assert torch.equal(v, before[k]), k
    assert not opt.state
    assert list(tmp_path.iterdir()) == []  # the temporary store is gone
    # the same 6 steps recorded for real: the estimate's bytes are its chunks (no metadata)
    m2 = mlp64()
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.1)
    real = tmp_path / "real.zarr"
    with trajlab.Recorder(m2, real, optimizer=o2, loss_fn=F.cross_entropy) as rec:
        for _ in range(6):
            o2.zero_grad()
            loss = F.cross_entropy(m2(x), y)
            loss.backward()
            rec.log(loss=loss, inputs=x, targets=y)
            o2.step()
    total = _dir_bytes(real)
    assert 0.5 * total / 6 <= plan.bytes_per_recorded_step <= total / 6
    assert plan.recorded_steps == 250 and plan.steps == 1000 and plan.every == 4
    assert plan.total_bytes == pytest.approx(250 * plan.bytes_per_recorded_step)
    assert plan.free_bytes is not None and plan.free_bytes > 0
    assert "every=4 -> 250 recorded" in str(plan)


def test_the_every_that_fits_a_budget_is_the_smallest_that_fits():
    base = dict(plain_step_seconds=0.01, recorded_step_seconds=0.02, fixed_seconds=0.1,
                every=1, free_bytes=None, measured_steps=8)
    plan = CostEstimate(bytes_per_recorded_step=3.8e6, steps=30_000,
                        budget_bytes=parse_bytes("50GB"), **base)
    e = plan.every_for_budget
    fits = lambda k: math.ceil(30_000 / k) * 3.8e6 <= 50e9  # noqa: E731
    assert fits(e) and not fits(e - 1)
    assert f"every={e} is the smallest" in str(plan) and "(every=1 does not)" in str(plan)
    assert plan.total_seconds == pytest.approx(30_000 * 0.02 + 0.1)


@pytest.mark.parametrize("text, value", [("50GB", 50 * 10**9), ("1.5 TiB", int(1.5 * 2**40)),
                                         ("200mb", 200 * 10**6), (1024, 1024)])
def test_sizes_are_read_with_their_units(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["5XB", "-3GB", "0", "GB", ""])
def test_a_bad_size_names_the_problem(text):
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes(text)


def test_bad_options_are_refused_before_measuring():
    x, y = _batch()
    model = mlp64()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="every"):
        estimate(model, (x, y), optimizer=opt, every=0)
    with pytest.raises(TypeError, match="'mode'"):
        estimate(model, (x, y), optimizer=opt, mode="w")
    other = torch.optim.SGD(mlp64(1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not the model's"):
        estimate(model, (x, y), optimizer=other)


def test_the_command_prints_the_plan(capsys, tmp_path):
    rc = cli_main(["estimate", "--model", "mlp", "--batch-size", "8", "--measure-steps", "3",
                   "--steps", "100", "--budget", "1MB", "--out", str(tmp_path / "r.zarr"),
                   "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "per recorded step" in out and "the run: 100 steps" in out and "smallest" in out
    assert cli_main(["estimate", "--budget", "lots"]) == 2
    assert "cannot read 'lots'" in capsys.readouterr().err
