"""Study 7: weight decay vs the growth of K, and what the theory terms include (the recorded
``.grad`` excludes SGD's L2 decay: :func:`decay_check`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trajlab.recipes import TrainConfig
from trajlab.store import open_run
from trajlab.studies.common import column, fmt, fmt_list
from trajlab.studies.numbers import integral, monotone, step_dt
from trajlab.studies.sweep import Sweep
from trajlab.studies.sweep_study import Rows, SweepStudy, run_sweep, sweep_entry

__all__ = ["STUDY", "decay_check", "weight_decay_sweep"]


def decay_check(run: str | Path, *, rows: Sequence[int] = (0, -1)) -> dict[str, Any]:
    """What the recorded ``.grad`` includes, for a run with an SGD weight decay.

    ``torch.optim.SGD(weight_decay=wd)`` adds ``wd * W`` to the gradient inside ``step()``, so
    the ``.grad`` the recorder stores (and the flow and noise terms use) excludes the decay, while
    the recorded update includes it: ``update = -lr (grad + wd W)``. At the given rows this
    estimates ``wd`` by least squares from ``-(update / lr + grad)`` against ``W``
    (``wd_estimate``, mean over layers) and reports ``update_residual``: ||update + lr grad|| /
    ||update|| (0 when the update is the plain gradient step). Layers without a batch
    gradient (the ``rank1_basis`` sketch stores only its terms) are left out; NaN when none has
    one.
    """
    r = open_run(run)
    est, resid = [], []
    for name in r.layers:
        lay = r.layer(name)
        if "grad" not in lay:
            continue
        n = lay.sizes["step"]
        for row in rows:
            row = row % n
            W = np.asarray(lay["weight"][row].values, dtype=np.float64)
            g = np.asarray(lay["grad"][row].values, dtype=np.float64)
            u = np.asarray(lay["update"][row].values, dtype=np.float64)
            lr = float(lay["lr"][row].values)
            extra = -(u / lr + g)
            est.append(float(np.sum(extra * W) / np.sum(W * W)))
            resid.append(float(np.linalg.norm(u + lr * g) / np.linalg.norm(u)))
    if not est:
        return {"wd_estimate": float("nan"), "update_residual": float("nan")}
    return {"wd_estimate": float(np.mean(est)), "update_residual": float(np.mean(resid))}


def _decay_numbers(sweep: Sweep, rows: Rows, lam: list) -> dict[str, Any]:
    """Per run: what the recorded .grad includes (decay_check), the optimizer drift and the
    discretisation term; adds those columns to ``rows``."""
    checks = [decay_check(p) for p in sweep.runs]
    for r, c, wd, ds in zip(rows, checks, lam, sweep.datasets):
        r.update({f"grad_check_{k}": v for k, v in c.items()})
        r["int_drift_optimizer"] = integral(
            np.asarray(ds.logK_drift_optimizer.values, dtype=np.float64), step_dt(ds))
        # pathwise bookkeeping (the realised update's optimizer drift), not a prediction
        r["int_mu_Z_plus_pathwise_optimizer"] = r["int_mu_Z"] + r["int_drift_optimizer"]
        # the finite-step term the SDE leaves out (debiased when the batch gradient is used)
        r["int_discretization"] = integral(
            np.asarray(ds.logK_discretization.values, dtype=np.float64), step_dt(ds))
        # reference only: the L2 decay's exact first-order drift of log K_net, -wd * L * t
        r["decay_term_reference"] = -wd * ds.sizes["layer"] * r["duration"]
    return {"delta_Z_trend": monotone(column(rows, "delta_Z")),
            "grad_excludes_decay": all(abs(c["wd_estimate"] - wd) <= 0.05 * wd + 1e-9
                                       for c, wd in zip(checks, lam))}


def _decay_verdict(num: dict[str, Any], rows: Rows, lam: list) -> list[str]:
    with_disc = [r["forward_pred_delta_Z"] + r["int_discretization"] for r in rows]
    return [
        (f"λ = {', '.join(fmt(x) for x in lam)}: ΔZ {fmt_list(column(rows, 'delta_Z'), '+.3f')} "
        f"({num['delta_Z_trend']}); K_net(T) {fmt_list(column(rows, 'K_net_end'))}"),
        (f"paper's SGD SDE (.grad, no decay) predicts ΔZ "
        f"{fmt_list(column(rows, 'pred_delta_Z'), '+.3f')}; the SDE of SGD with L2 decay (forward "
        f"prediction, docs/math.md 8): {fmt_list(column(rows, 'forward_pred_delta_Z'), '+.3f')} "
        f"(+ discretisation ∫d dt: {fmt_list(with_disc, '+.3f')}); pathwise reconstruction "
        f"{fmt_list(column(rows, 'pathwise_delta_Z'), '+.3f')}, its optimizer drift "
        f"∫logK_drift_optimizer dt {fmt_list(column(rows, 'int_drift_optimizer'), '+.3f')} "
        f"(−λLt = {fmt_list(column(rows, 'decay_term_reference'), '+.3f')})"),
        "recorded .grad excludes the decay: λ estimated from update vs grad = "
        + fmt_list(column(rows, "grad_check_wd_estimate"), ".2g")
        + f" (set: {', '.join(fmt(x) for x in lam)}); ||update + lr·grad|| / ||update|| = "
        + fmt_list(column(rows, "grad_check_update_residual"), ".2g"),
    ]


_STUDY = SweepStudy(
    name="weight_decay", param="weight_decay", axis="weight decay λ", title="weight decay",
    claim="weight decay suppresses the growth of K", criterion="ΔZ decreases with λ",
    summary_keys={"delta_Z": "measured ΔZ",
                  "pred_delta_Z": "SDE for SGD (paper), from .grad: no decay",
                  "forward_pred_delta_Z": "SDE for SGD with L2 decay (forward prediction)",
                  "pathwise_delta_Z": "pathwise (recorded update)"},
    summary_ylabel="change of log K_net over the run",
    numbers=_decay_numbers, verdict=_decay_verdict,
    supported=lambda num: num["delta_Z_trend"] == "decreasing",
)


def weight_decay_sweep(out: str | Path, *, config: TrainConfig | None = None,
                       decays: Sequence[float] = (0.0, 1e-3, 1e-2),
                       runs: Sequence[str | Path] | None = None, scheduler: Any = "threads",
                       progress: bool = False, echo: bool = True) -> dict[str, Any]:
    """Study 7: weight decay vs the growth of K, and what the theory terms include.

    The flow and noise terms use the recorded ``.grad``, which for ``torch.optim.SGD`` excludes
    the decay (added inside ``step()``; checked per run by :func:`decay_check`); the pathwise
    term uses the recorded update, which includes it. The analysis's ``logK_drift_optimizer``
    (sum_l drift_optimizer/K: the first-order drift the optimizer adds to plain SGD, measured
    from the recorded update; -wd per layer for an L2 decay wd) supplies the missing drift: the
    study reports the SDE prediction int logK_drift dt alone and int (logK_drift +
    logK_drift_optimizer) dt (dt = lr) against the measured change of log K_net. Writes
    ``weight_decay.json``, ``weight_decay.png``, ``weight_decay_drift.png``.
    """
    return run_sweep(_STUDY, out, [float(x) for x in decays], config=config, runs=runs,
                     scheduler=scheduler, progress=progress, echo=echo)


STUDY = sweep_entry(
    weight_decay_sweep, name="weight_decay",
    summary="Study 7: weight decay vs the growth of K, and what the theory terms include",
    flag="--weight-decays", keyword="decays", kind=float, default=[0, 0.001, 0.01],
    quick=[0.0, 0.01],
    usage="  --out studies/weight_decay\n  --out studies/weight_decay --quick\n"
          "  --out my --runs my_sweep_dir/\n"
          "Writes weight_decay.json, weight_decay.png and weight_decay_drift.png into --out.",
)
