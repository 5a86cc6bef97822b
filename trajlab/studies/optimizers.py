"""Optimizer validation (issue 23): does the forward prediction's band hold for the optimizers
people use?

R runs from one initialisation, differing only in the sampling seed, per optimizer. For each:
the coverage (how many runs end with log K_net inside their own 95% band), the predicted sd
against the sd of the residual (measured - predicted) across runs, and the predicted sd against
the spread of the measured log K_net itself. Targets (issue 23): coverage >= 3/4 of the runs,
pred sd / residual sd in [0.5, 2], pred sd / spread >= 0.3.

A case with ``clip`` trains as users clip: ``torch.nn.utils.clip_grad_norm_(params, clip)``
after the backward, before ``optimizer.step()``. The recorder sees the clipped ``.grad`` and
stores the clip factor as ``grad_scale`` (the per-sample information is rescaled to match); the
study reports the fraction of steps clipped and the median factor beside the three figures,
and for SGD the figures of the prediction with the expected clip factor modelled
(:func:`clip_aware_sgd`, docs/math.md §8b; ``analyze`` does not model clipping yet).

The predictions are trajlab's (docs/math.md §8): the paper covers SGD only (PAPER.md).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trajlab.recipes import TrainConfig, record_digits
from trajlab.sde import Z95
from trajlab.studies.registry import Study

__all__ = ["CASES", "CLIP_CASES", "STUDY", "Case", "band_numbers", "optimizer_validation"]

#: Issue 23's targets.
COVERAGE_TARGET = 0.75
RESIDUAL_RANGE = (0.5, 2.0)
SPREAD_MIN = 0.3


@dataclass(frozen=True)
class Case:
    """One optimizer setting of the study: a name and the TrainConfig fields it changes."""

    name: str
    optimizer: str
    lr: float
    probe_every: int = 1
    weight_decay: float = 0.0
    clip: float | None = None

    def __post_init__(self) -> None:
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip (the max-norm of clip_grad_norm_) must be positive or None, "
                             f"got {self.clip!r}")


#: The default cases: SGD with the probe at every step, every 10 steps (interpolated) and
#: without one (no prediction), momentum 0.9, Adam, AdamW.
CASES: tuple[Case, ...] = (
    Case("SGD, probe every step", "sgd", 0.05),
    Case("SGD, probe every 10 steps", "sgd", 0.05, probe_every=10),
    Case("SGD, no probe", "sgd", 0.05, probe_every=0),
    Case("SGD momentum 0.9", "momentum", 0.01),
    Case("Adam", "adam", 0.002),
    Case("AdamW (lambda 0.01)", "adamw", 0.002, weight_decay=0.01),
)

#: Clipped cases (issue 23 item 4): max-norms that bind on most steps of the default setting.
CLIP_CASES: tuple[Case, ...] = (
    Case("SGD, clip 0.3", "sgd", 0.05, clip=0.3),
    Case("AdamW (lambda 0.01), clip 0.3", "adamw", 0.002, weight_decay=0.01, clip=0.3),
)


def band_numbers(Z: np.ndarray, mean: np.ndarray, var: np.ndarray) -> dict[str, Any]:
    """The three figures of issue 23 from R runs' final measured log K_net ``Z``, predicted
    mean and variance (each (R,)). NaN predictions give ``coverage = None`` (no prediction)."""
    Z, mean, var = (np.asarray(a, dtype=np.float64) for a in (Z, mean, var))
    R = Z.size
    if not (np.isfinite(mean).all() and np.isfinite(var).all()):
        return {"runs": R, "coverage": None, "pred_sd_over_residual_sd": None,
                "pred_sd_over_spread": None, "passes": None,
                "note": "the runs have no full-data probe"}
    sd = np.sqrt(np.maximum(var, 0.0))
    inside = int((np.abs(Z - mean) <= Z95 * sd).sum())
    resid_sd = float(np.std(Z - mean, ddof=1))
    spread = float(np.std(Z, ddof=1))
    r1 = float(sd.mean() / resid_sd) if resid_sd > 0 else math.inf
    r2 = float(sd.mean() / spread) if spread > 0 else math.inf
    passes = (inside >= COVERAGE_TARGET * R and RESIDUAL_RANGE[0] <= r1 <= RESIDUAL_RANGE[1]
              and r2 >= SPREAD_MIN)
    return {"runs": R, "coverage": inside, "pred_sd_over_residual_sd": r1,
            "pred_sd_over_spread": r2, "mean_residual": float(np.mean(Z - mean)),
            "pred_sd": float(sd.mean()), "residual_sd": resid_sd, "spread": spread,
            "passes": bool(passes)}


def optimizer_validation(out: str | Path, *, runs: int = 16, steps: int = 40,
                         model: str = "mlp", hidden: int = 32, batch_size: int = 32,
                         dtype: str = "float64", init_seed: int = 0,
                         cases: Sequence[Case] = CASES, scheduler: Any = "synchronous",
                         progress: bool = False, echo: bool = True) -> dict[str, Any]:
    """Record ``runs`` runs per case from one initialisation, analyse them and write
    ``optimizer_validation.json`` into ``out``.

    Returns
    -------
    dict
        ``config``, ``cases`` (name -> :func:`band_numbers` plus the case's settings and
        theory), ``verdict`` (one line per case), ``runtime_s``.
    """
    from trajlab.analysis import analyze

    if runs < 2:
        raise ValueError(f"runs must be at least 2 (spreads across runs), got {runs}")
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "config": {"runs": runs, "steps": steps, "model": model, "hidden": hidden,
                   "batch_size": batch_size, "dtype": dtype, "init_seed": init_seed,
                   "data": "scikit-learn digits"},
        "targets": {"coverage_fraction": COVERAGE_TARGET, "pred_sd_over_residual_sd":
                    list(RESIDUAL_RANGE), "pred_sd_over_spread_min": SPREAD_MIN},
        "cases": {}, "verdict": []}
    for case in cases:
        Z, M, V, S, MC, VC, KA = [], [], [], [], [], [], []
        theory = why = None
        for r in range(runs):
            cfg = TrainConfig(model=model, hidden=hidden, steps=steps, batch_size=batch_size,
                              lr=case.lr, optimizer=case.optimizer, dtype=dtype,
                              probe_every=case.probe_every, weight_decay=case.weight_decay,
                              init_seed=init_seed, sampling_seed=r)
            store = out / "runs" / f"{_slug(case.name)}-{r:02d}.zarr"
            kappa = None
            if case.clip is None:
                record_digits(store, cfg, overwrite=True, progress=progress)
            else:
                kappa = record_digits_clipped(store, cfg, case.clip)[1]
                KA.append(kappa)
            ds = analyze(store, progress=progress, scheduler=scheduler)
            if kappa is not None and case.optimizer == "sgd":
                mc, vc = clip_aware_sgd(ds, kappa)
                MC.append(mc)
                VC.append(vc)
            last = ds.isel(step=-1)
            S.append(np.asarray(ds["grad_scale"].isel(layer=0), dtype=np.float64))
            Z.append(float(last.logK))
            M.append(float(last.logK_pred_mean))
            V.append(float(last.logK_pred_var))
            theory = ds.attrs.get("optimizer_theory")
            why = ds.attrs.get("prediction_unavailable")
        nums = band_numbers(np.array(Z), np.array(M), np.array(V))
        if case.clip is not None:
            nums.update(clip_statistics(np.concatenate(S)))
            nums["median_expected_clip_factor"] = float(np.nanmedian(np.concatenate(KA)))
        if MC:  # SGD with clipping modelled by the expected factor (docs/math.md 8b)
            nums["clip_modelled"] = band_numbers(np.array(Z), np.array(MC), np.array(VC))
        if nums["coverage"] is None and why:
            nums["note"] = why
        result["cases"][case.name] = {**asdict(case), "theory": theory, **nums}
        lines = [_line(case.name, nums)]
        if MC:
            lines.append(_line(case.name + ", expected clip factor modelled",
                               nums["clip_modelled"]))
        for line in lines:
            result["verdict"].append(line)
            if echo:
                print(line, flush=True)
    result["runtime_s"] = time.perf_counter() - t0
    (out / "optimizer_validation.json").write_text(json.dumps(result, indent=2))
    return result


def clip_statistics(grad_scale: np.ndarray) -> dict[str, float]:
    """How often clipping bound and how hard, from the recorded clip factors ``grad_scale``
    (``.grad`` = factor x the unclipped batch gradient; 1 where the norm was under max-norm).

    Returns ``clipped_fraction`` (steps with a factor < 1) and ``median_clip_factor``.
    """
    f = np.asarray(grad_scale, dtype=np.float64).ravel()
    f = f[np.isfinite(f)]
    if f.size == 0:
        raise ValueError("no finite clip factor (grad_scale) recorded: the runs hold no step")
    return {"clipped_fraction": float((f < 1).mean()), "median_clip_factor": float(np.median(f))}


def record_digits_clipped(out: str | Path, cfg: TrainConfig, clip: float
                          ) -> tuple[Path, np.ndarray]:
    """:func:`trajlab.recipes.record_digits` with ``clip_grad_norm_(params, clip)`` between
    the backward and ``optimizer.step()`` (the global norm over all parameters).

    Returns the store and the expected clip factor of every step (:func:`_expected_clip`,
    computed before the step's backward from the probe-equivalent full gradient and the
    batch's per-sample covariance)."""
    import torch
    import torch.nn.functional as F

    from trajlab.data import load_digits, make_batches
    from trajlab.recipes import digits_model, make_optimizer
    from trajlab.record import FullGradientProbe, Recorder

    if cfg.label_noise or cfg.device != "cpu":
        raise ValueError("record_digits_clipped supports the study's settings only (no label "
                         "noise, cpu); use record_digits without clip for others")
    dtype = getattr(torch, cfg.dtype)
    kappa = np.full(cfg.steps, np.nan)
    X, Y = load_digits(flatten=cfg.model == "mlp", split="train")
    X = X.to(dtype=dtype)
    model = digits_model(cfg).to(dtype=dtype)
    opt = make_optimizer(cfg, model.parameters())
    batches = make_batches(cfg.sampler, len(X), cfg.batch_size, seed=cfg.sampling_seed)
    probe = None
    if cfg.probe_every > 0:
        chunks = [(X[i: i + 512], Y[i: i + 512]) for i in range(0, len(X), 512)]
        probe = FullGradientProbe(chunks, F.cross_entropy, every=cfg.probe_every)
    meta = {"config": {**asdict(cfg), "clip_grad_norm": clip}, "dataset": "sklearn-digits",
            "n_train": len(X)}
    with Recorder(model, out, optimizer=opt, every=cfg.every, rank=cfg.rank, mode="w",
                  sampler=cfg.sampler, dataset_size=len(X), loss_fn=F.cross_entropy,
                  probe=probe, metadata=meta) as rec:
        for t in range(cfg.steps):
            idx = next(batches)
            x, y = X[idx], Y[idx]
            kappa[t] = _expected_clip(model, X, Y, x, y, clip)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            rec.log(loss=loss, indices=idx, inputs=x, targets=y)
            opt.step()
    return Path(out), kappa


def _expected_clip(model: Any, X: Any, Y: Any, x: Any, y: Any, clip: float) -> float:
    """kappa of :func:`~trajlab.sde.optimizer.expected_clip_factor` over all parameters:
    ``||grad L||^2`` from the full data, ``tr Cov(g_B) = tr Sigma_hat / B`` from the batch's
    per-sample gradients (independent draws); never the batch's own gradient norm."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    from trajlab.sde.optimizer import expected_clip_factor

    params = {k: p.detach() for k, p in model.named_parameters()}
    full = torch.autograd.grad(F.cross_entropy(model(X), Y), list(model.parameters()))
    g2 = float(sum((g.double() ** 2).sum() for g in full))

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    B = x.shape[0]
    tr = sum(float(((v - v.mean(0)) ** 2).sum()) for v in per.values()) / (B - 1) / B
    return float(expected_clip_factor(g2, tr, clip))


def clip_aware_sgd(ds: Any, kappa: np.ndarray) -> tuple[float, float]:
    """The last row's log K_net mean and variance of SGD's forward prediction with clipping
    modelled by the expected factor ``kappa`` (T,) per row (docs/math.md 8b): the expected
    update ``kappa_t grad L``, the noise ``kappa_t (g_B - grad L)``. The analysis's noise
    terms carry the realised factor ``grad_scale`` squared (the stored per-sample information
    is rescaled to ``.grad``); it is divided out here and ``kappa_t^2`` put in its place."""
    c = np.asarray(ds["grad_scale"].isel(layer=0), dtype=np.float64)
    k = np.asarray(kappa, dtype=np.float64)[: c.size]
    dt = np.asarray(ds["net_dt"], dtype=np.float64)
    flow = np.asarray(ds["logK_flow_expected"], dtype=np.float64)
    noise = np.asarray(ds["logK_noise_update"], dtype=np.float64)
    diff2 = np.asarray(ds["logK_diffusion2_update"], dtype=np.float64)
    r = (k / c) ** 2
    z0 = float(ds["logK"].isel(step=0))
    mean = z0 + float(np.sum(((k * flow + r * noise) * dt)[:-1]))
    return mean, float(np.sum((r * diff2 * dt)[:-1]))


def _line(name: str, n: dict[str, Any]) -> str:
    if n["coverage"] is None:
        return f"{name}: no prediction ({n['note']})"
    verdict = "meets" if n["passes"] else "misses"
    clip = (f" (clipped at {n['clipped_fraction']:.0%} of steps, median factor "
            f"{n['median_clip_factor']:.2f})" if "clipped_fraction" in n else "")
    return (f"{name}{clip}: coverage {n['coverage']}/{n['runs']}, pred sd / residual sd "
            f"{n['pred_sd_over_residual_sd']:.2f}, pred sd / spread of measured "
            f"{n['pred_sd_over_spread']:.2f}: {verdict} the targets")


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=16, help="runs per optimizer (default: 16)")
    p.add_argument("--steps", type=int, default=40, help="steps per run (default: 40)")
    p.add_argument("--model", choices=("mlp", "convnet"), default="mlp")
    p.add_argument("--quick", action="store_true", help="4 runs of 8 steps (smoke test)")
    p.add_argument("--clipped", action="store_true",
                   help="the clipped cases (SGD, AdamW with clip_grad_norm_) instead")


def _run(a: argparse.Namespace) -> dict[str, Any]:
    runs, steps = (4, 8) if a.quick else (a.runs, a.steps)
    return optimizer_validation(a.out, runs=runs, steps=steps, model=a.model,
                                cases=CLIP_CASES if a.clipped else CASES)


STUDY = Study(
    name="optimizers",
    summary="Optimizer validation (issue 23): coverage of the forward prediction's 95% band per "
            "optimizer",
    add_arguments=_arguments,
    run=_run,
    usage="  --out studies/optimizers\n  --out studies/optimizers --quick\n"
          "R runs from one initialisation (sampling seeds 0..R-1) for SGD (probe every step, "
          "every 10 steps, none),\nmomentum 0.9, Adam and AdamW on the digits MLP; writes "
          "optimizer_validation.json.\n"
          "  --out studies/optimizers-clipped --clipped: SGD and AdamW with gradient clipping.",
)
