"""Paper Fig. 2 on the five-layer ConvNet (issue 23 item 7): measured K per layer and K_net
against the SDE for SGD (paper), forward prediction, on CIFAR when its files are given, else on
a stand-in said so on the figure and in the verdict.

The paper (PAPER.md, Fig. 2) trains a five-layer ConvNet on CIFAR-10 and CIFAR-100 for 30,000
steps and states that the Lipschitz constant predicted by its theorems closely agrees with the
measured one. Here: :func:`trajlab.models.cifar_convnet` (3 convolutions, 2 linear layers; its
widths are a stand-in, the paper's are not known), trained with plain SGD for a few hundred
steps on the first ``n_train`` training images, with a full-data gradient probe (the forward
prediction's expected gradient). Data, in order of preference:

* ``cifar``: a folder with the official binary CIFAR-10/100 files (:mod:`trajlab.data.cifar`);
* otherwise scikit-learn's digits, upscaled 8x8 -> 32x32 (nearest) and repeated over 3 channels
  (:func:`upscaled_digits`): real images with learnable labels in CIFAR's shape.

With ``runs`` >= 2 sampling orders from one initialisation, the study also reports issue 23's
three band figures (:func:`trajlab.studies.optimizers.band_numbers`).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from trajlab.models import cifar_convnet
from trajlab.recipes import TrainConfig, record_training
from trajlab.sde.layer import second_order_outside
from trajlab.studies.common import finish
from trajlab.studies.numbers import theory_numbers
from trajlab.studies.optimizers import band_numbers
from trajlab.studies.registry import Study
from trajlab.studies.sweep import analyse_runs
from trajlab.studies.sweep import scheduler as sweep_scheduler
from trajlab.studies.theory import (
    FIG2_CLAIM,
    FIG2_CRITERION,
    fig2_figure,
    fig2_supported,
    fig2_verdict,
)

__all__ = ["FULL", "QUICK", "STUDY", "ConvNetSetting", "convnet_theory", "study_data",
           "theory_limits", "upscaled_digits"]


@dataclasses.dataclass(frozen=True)
class ConvNetSetting:
    """Size of the ConvNet study: network widths, data, steps and optimiser settings."""

    channels: tuple[int, int, int] = (16, 32, 32)
    hidden: int = 32
    n_train: int = 512
    steps: int = 200
    batch_size: int = 32
    lr: float = 0.05
    probe_every: int = 5
    dtype: Literal["float32", "float64"] = "float64"
    runs: int = 1

    def __post_init__(self) -> None:
        if self.runs < 1 or self.n_train < self.batch_size:
            raise ValueError(f"need runs >= 1 and n_train >= batch_size, got runs={self.runs}, "
                             f"n_train={self.n_train}, batch_size={self.batch_size}")


#: The full size (``@pytest.mark.slow``, docs/validation.md): half of cifar_convnet's default
#: widths, 512 images, a probe every 5 steps (interpolated between), minutes on 2 CPU cores.
FULL = ConvNetSetting()
#: The default suite's size (seconds): a narrow ConvNet, few images and steps.
QUICK = ConvNetSetting(channels=(4, 8, 8), hidden=16, n_train=128, steps=20, batch_size=16,
                       lr=0.05, runs=1)


def upscaled_digits(n: int, *, dtype: torch.dtype = torch.float64
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` training digits as CIFAR-shaped images ``(n, 3, 32, 32)``: each 8x8
    digit upscaled 4x (nearest neighbour) and repeated over 3 channels, then standardised over
    all pixels; labels 0-9."""
    from trajlab.data.digits import load_digits

    X, Y = load_digits(split="train", dtype=dtype)
    if n > len(X):
        raise ValueError(f"n_train={n} is more than the {len(X)} training digits; lower it")
    X = X[:n].reshape(n, 1, 8, 8)
    X = torch.nn.functional.interpolate(X, scale_factor=4, mode="nearest").repeat(1, 3, 1, 1)
    return (X - X.mean()) / X.std(), Y[:n]


def study_data(n: int, *, cifar: str | Path | None, dataset: str = "cifar10",
               dtype: torch.dtype = torch.float64
               ) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """Images, labels, number of classes and a description of the data (said on the figure).

    CIFAR when ``cifar`` names a folder with its binary files (FileNotFoundError otherwise,
    naming the folder), else the upscaled digits."""
    if cifar is None:
        X, Y = upscaled_digits(n, dtype=dtype)
        return X, Y, 10, ("stand-in data: scikit-learn digits upscaled to 3x32x32 (no CIFAR "
                          f"files given), {n} images")
    from trajlab.data.cifar import load_cifar

    X, Y = load_cifar(cifar, dataset=dataset, train=True, dtype=dtype)
    return X[:n], Y[:n], 10 if dataset == "cifar10" else 100, \
        f"{dataset.upper().replace('CIFAR', 'CIFAR-')}, first {n} training images"


def theory_limits(ds: Any) -> dict[str, Any]:
    """Where the step is beyond the SDE's second-order, small-lr terms (docs/validation.md).

    Returns
    -------
    dict
        ``pred_rel_err_end_with_discretization``: K_net's forward-prediction error at the end
        when the integral of ``logK_discretization`` (the deterministic ``O(eta^2)`` part of a
        step that the paper's SDE leaves out) is added to its mean; ``second_order_outside``:
        per layer, the number of steps whose second-order change of ``s_1`` is beyond the
        two-level radius (:func:`~trajlab.sde.layer.second_order_outside`);
        ``outside_share_of_pathwise_error``: per layer, the share of the summed absolute
        one-step error of the pathwise reconstruction (against the measured change of K)
        carried by those steps (NaN without error).
    """
    K = np.asarray(ds.K.values, dtype=np.float64)
    inc = np.asarray(ds.pathwise_increment.values, dtype=np.float64)
    outside = second_order_outside(
        torch.from_numpy(inc), torch.from_numpy(np.asarray(ds.pathwise_first_order.values,
                                                            dtype=np.float64)),
        torch.from_numpy(K), torch.from_numpy(np.asarray(ds.spectral_gap.values,
                                                         dtype=np.float64))).numpy()
    err = np.abs(inc[:-1] - np.diff(K, axis=0))
    err = np.where(np.isfinite(err), err, 0.0)
    total = err.sum(0)
    share = np.where(total > 0, (err * outside[:-1]).sum(0) / np.where(total > 0, total, 1.0),
                     np.nan)
    end = float(ds.logK_pred_mean.values[-1] + ds.logK_discretization_integral.values[-1]
                - ds.logK.values[-1])
    layers = [str(v) for v in ds.layer.values]
    return {"pred_rel_err_end_with_discretization": float(np.expm1(end)),
            "second_order_outside": dict(zip(layers, outside[:-1].sum(0).tolist())),
            "outside_share_of_pathwise_error": dict(zip(layers, share.tolist()))}


def convnet_theory(out: str | Path, *, setting: ConvNetSetting = FULL,
                   cifar: str | Path | None = None,
                   dataset: Literal["cifar10", "cifar100"] = "cifar10", init_seed: int = 0,
                   scheduler: Any = "threads", progress: bool = False, echo: bool = True
                   ) -> dict[str, Any]:
    """Record ``setting.runs`` runs of the five-layer ConvNet (sampling seeds 0..runs-1, one
    initialisation), analyse them, and compare the measured K with the forward prediction.

    Writes ``convnet_theory.json`` and ``convnet_theory_<run>.png`` into ``out`` (run stores in
    ``out/runs``, analyses in ``out/analysis``).

    Returns
    -------
    dict
        ``data`` (what the network was trained on), ``setting``, per run ``runs`` (the numbers
        of :func:`~trajlab.studies.numbers.theory_numbers`), ``bands`` (issue 23's figures over
        the runs; None for one run), ``theory`` (the SDE the prediction integrates), the
        verdict and the flag ``supported`` (:data:`~trajlab.studies.theory.FIG2_CRITERION`).
    """
    t0 = time.perf_counter()
    out = Path(out)
    s = setting
    dtype = getattr(torch, s.dtype)
    X, Y, classes, data = study_data(s.n_train, cifar=cifar, dataset=dataset, dtype=dtype)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    paths = []
    for r in range(s.runs):
        cfg = TrainConfig(steps=s.steps, batch_size=s.batch_size, lr=s.lr, dtype=s.dtype,
                          probe_every=s.probe_every, init_seed=init_seed, sampling_seed=r)
        model = cifar_convnet(classes, channels=s.channels, hidden=s.hidden, seed=init_seed)
        paths.append(record_training(
            model, X, Y, out / "runs" / f"convnet-{r:02d}.zarr", cfg, overwrite=True,
            progress=progress, extra_metadata={
                "dataset": data, "n_train": len(X),
                "architecture": f"cifar_convnet channels={list(s.channels)} hidden={s.hidden}"}))
    with sweep_scheduler(scheduler) as where:
        sweep = analyse_runs(paths, out, scheduler=where, progress=progress)
    per_run, figs, verdict, ends = {}, [], [], []
    ok = True
    theory = None
    for lab, ds in zip(sweep.labels, sweep.datasets):
        ds = ds.load()
        num = theory_numbers(ds)
        num["limits"] = lim = theory_limits(ds)
        per_run[lab] = num
        theory = ds.attrs.get("optimizer_theory", theory)
        figs.append(fig2_figure(
            ds, f"Lipschitz constant of the five-layer ConvNet: SDE for SGD (paper) vs "
                f"measurement ({lab})\n{data}; {s.steps} steps", out / f"convnet_theory_{lab}.png"))
        verdict.append(fig2_verdict(lab, num))
        verdict.append(f"{lab}: with the discretization term the paper's SDE leaves out, K_net's "
                       f"end error is {lim['pred_rel_err_end_with_discretization']:+.1%}; steps "
                       f"beyond the second-order radius per layer: "
                       f"{lim['second_order_outside']}")
        ok &= fig2_supported(num)
        last = ds.isel(step=-1)
        ends.append((float(last.logK), float(last.logK_pred_mean), float(last.logK_pred_var)))
    bands = None
    if s.runs >= 2:
        Z, M, V = (np.array(v) for v in zip(*ends))
        bands = band_numbers(Z, M, V)
        verdict.append(f"over {s.runs} sampling orders: {bands['coverage']}/{s.runs} end inside "
                       f"their 95% band; pred sd / residual sd "
                       f"{bands['pred_sd_over_residual_sd']:.2f}, pred sd / spread of measured "
                       f"{bands['pred_sd_over_spread']:.2f}")
    verdict.append(f"data: {data}")
    return finish(out, "convnet_theory", {
        "study": "convnet_theory",
        "title": "theory vs measurement on the five-layer ConvNet (paper Fig. 2)",
        "claim": FIG2_CLAIM,
        "setting": "paper: five-layer ConvNet on CIFAR-10 and CIFAR-100, 30,000 steps (200 "
                   f"epochs); here: cifar_convnet channels {list(s.channels)}, hidden "
                   f"{s.hidden} (the paper's widths are not known), {data}, {s.steps} SGD "
                   f"steps of batch {s.batch_size}, lr {s.lr}, {s.dtype}, a full-data probe "
                   f"every {s.probe_every} steps",
        "data": data, "cifar": cifar is not None, "theory": theory,
        "config": dataclasses.asdict(s), "supported": ok, "runs": per_run, "bands": bands,
        "figures": figs, "verdict": verdict, "criterion": FIG2_CRITERION,
    }, t0, echo=echo)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (run stores, analyses, JSON, PNG)")
    p.add_argument("--cifar", default=None, metavar="DIR",
                   help="folder with the CIFAR binary files (default: none, upscaled digits)")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10")
    p.add_argument("--steps", type=int, default=FULL.steps, help="SGD steps (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=FULL.n_train,
                   help="training images (default: %(default)s)")
    p.add_argument("--runs", type=int, default=FULL.runs,
                   help="sampling orders from one initialisation (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help=f"smoke-test size (seconds): {QUICK}")
    p.add_argument("--scheduler", default="threads", help="Dask scheduler for the analyses")
    p.add_argument("--progress", action="store_true", help="progress bars")


def _run(a: argparse.Namespace) -> dict[str, Any]:
    setting = QUICK if a.quick else dataclasses.replace(FULL, steps=a.steps, n_train=a.n_train,
                                                        runs=a.runs)
    return convnet_theory(a.out, setting=setting, cifar=a.cifar, dataset=a.dataset,
                          scheduler=a.scheduler, progress=a.progress)


STUDY = Study(
    name="convnet_theory",
    summary="Paper Fig. 2 on the five-layer ConvNet: K vs the SDE for SGD (paper), on CIFAR or "
            "upscaled digits",
    add_arguments=_arguments,
    run=_run,
    usage="  --out studies/convnet --cifar ~/data       CIFAR-10 binary files\n"
          "  --out studies/convnet                      upscaled digits (said on the figure)\n"
          "  --out studies/convnet --quick              seconds\n"
          "Writes convnet_theory.json and convnet_theory_<run>.png into --out.",
)
