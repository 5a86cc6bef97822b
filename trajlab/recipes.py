"""Ready-made recorded training runs: the embedded digits run and CIFAR-10/100.

The scripts in ``recorders/`` and ``trajlab demo`` parse arguments and call these functions; the
training loop itself is an ordinary PyTorch loop with a :class:`trajlab.Recorder` attached.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trajlab.data import load_cifar, load_digits, make_batches, with_label_noise
from trajlab.models import cifar_convnet, digits_convnet, mlp, scale_init
from trajlab.record import FullGradientProbe, Recorder


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a recorded run (all stored in the run's metadata).

    Attributes
    ----------
    model : "mlp" or "convnet".  hidden : width of hidden Linear layers.  channels : ConvNet
    convolution channels.
    steps : optimizer steps.  batch_size : samples per batch.  lr : learning rate.
    optimizer : "sgd", "momentum" (SGD with momentum 0.9), "adam" or "adamw".
    weight_decay : L2 / decoupled weight decay.  label_noise : fraction of training labels replaced.
    init_scale : multiply the initial weights by this.  init_seed / sampling_seed : seeds for the
    initialisation and for the batch order.  sampler : "with_replacement" or "reshuffle".
    every : record every ``every`` steps.  rank : subspace-sketch rank for Conv2d layers.
    dtype : "float32" or "float64".  probe_every : full-data gradient every k steps (0 = never).
    device : torch device for training.
    """

    model: Literal["mlp", "convnet"] = "convnet"
    hidden: int = 32
    channels: tuple[int, int] = (8, 16)
    steps: int = 1000
    batch_size: int = 64
    lr: float = 0.05
    optimizer: Literal["sgd", "momentum", "adam", "adamw"] = "sgd"
    weight_decay: float = 0.0
    label_noise: float = 0.0
    init_scale: float = 1.0
    init_seed: int = 0
    sampling_seed: int = 0
    sampler: Literal["with_replacement", "reshuffle"] = "with_replacement"
    every: int = 1
    rank: int = 2
    dtype: Literal["float32", "float64"] = "float32"
    probe_every: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        for name, lo in (("hidden", 1), ("steps", 1), ("batch_size", 2), ("every", 1),
                         ("rank", 1), ("probe_every", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}"
                                 + (" (the noise terms need at least 2 samples per batch)"
                                    if name == "batch_size" else ""))
        if len(self.channels) != 2 or any(int(c) < 1 for c in self.channels):
            raise ValueError(f"channels must be two integers >= 1, got {self.channels!r}")
        for name, ok, what in (("lr", self.lr > 0, "> 0"),
                               ("weight_decay", self.weight_decay >= 0, ">= 0"),
                               ("label_noise", 0 <= self.label_noise < 1, "in [0, 1)"),
                               ("init_scale", self.init_scale > 0, "> 0")):
            if not ok or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


#: Allowed values of the TrainConfig fields that name a choice (argparse ``choices`` too).
_CHOICES: dict[str, tuple[str, ...]] = {
    "model": ("mlp", "convnet"),
    "optimizer": ("sgd", "momentum", "adam", "adamw"),
    "sampler": ("with_replacement", "reshuffle"),
    "dtype": ("float32", "float64"),
}


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "momentum":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use sgd, momentum, adam or adamw")


def record_training(
    model: nn.Module,
    X: Tensor,
    Y: Tensor,
    out: str | Path,
    cfg: TrainConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    extra_metadata: dict | None = None,
) -> Path:
    """Train ``model`` on (X, Y) with cross-entropy and record the run into ``out``.

    Returns the store path. Batches are index sets drawn by ``cfg.sampler`` with
    ``cfg.sampling_seed``; their indices are recorded (the sampling trajectory).
    """
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    model = model.to(device=device, dtype=dtype)
    X = X.to(device=device, dtype=dtype)
    Y = Y.to(device)
    opt = make_optimizer(cfg, model.parameters())
    batches = make_batches(cfg.sampler, len(X), cfg.batch_size, seed=cfg.sampling_seed)
    probe = None
    if cfg.probe_every > 0:
        chunks = [(X[i : i + 512], Y[i : i + 512]) for i in range(0, len(X), 512)]
        probe = FullGradientProbe(chunks, F.cross_entropy, every=cfg.probe_every)
    meta = {"config": dataclasses.asdict(cfg), **(extra_metadata or {})}
    bar = _progress(cfg.steps, progress, desc=f"recording {Path(str(out)).name}")
    with Recorder(
        model,
        out,
        optimizer=opt,
        every=cfg.every,
        rank=cfg.rank,
        mode="w" if overwrite else "w-",
        sampler=cfg.sampler,
        dataset_size=len(X),
        loss_fn=F.cross_entropy,
        probe=probe,
        metadata=meta,
    ) as rec:
        for _ in range(cfg.steps):
            idx = next(batches).to(device)
            x, y = X[idx], Y[idx]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            rec.log(loss=loss, indices=idx, inputs=x, targets=y)
            opt.step()
            bar.update(1)
    bar.close()
    return Path(str(out)) if "://" not in str(out) else out


def digits_model(cfg: TrainConfig) -> nn.Module:
    """The model for the digits run described by ``cfg``."""
    if cfg.model == "mlp":
        model = mlp(64, (cfg.hidden, cfg.hidden), 10, seed=cfg.init_seed)
    elif cfg.model == "convnet":
        model = digits_convnet(
            channels=tuple(cfg.channels), hidden=cfg.hidden, seed=cfg.init_seed
        )
    else:
        raise ValueError(f"unknown model {cfg.model!r}: use 'mlp' or 'convnet'")
    if cfg.init_scale != 1.0:
        scale_init(model, cfg.init_scale)
    return model


def record_digits(
    out: str | Path, cfg: TrainConfig = TrainConfig(), *, overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Record a run on scikit-learn's handwritten digits (ships with scikit-learn, no download)."""
    X, Y = load_digits(flatten=cfg.model == "mlp", split="train")
    if cfg.label_noise > 0:
        Y = with_label_noise(Y, cfg.label_noise, num_classes=10, seed=cfg.init_seed)
    return record_training(
        digits_model(cfg), X, Y, out, cfg, overwrite=overwrite, progress=progress,
        extra_metadata={"dataset": "sklearn-digits", "n_train": len(X)},
    )


def record_cifar(
    root: str | Path,
    out: str | Path,
    cfg: TrainConfig = TrainConfig(),
    *,
    dataset: Literal["cifar10", "cifar100"] = "cifar10",
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Record the five-layer ConvNet on CIFAR-10/100 read from the official binary files.

    The architecture is fixed (:func:`trajlab.models.cifar_convnet`): ``cfg.model``,
    ``cfg.hidden`` and ``cfg.channels`` must keep their defaults (ValueError otherwise), and
    the run's metadata records the architecture."""
    changed = [k for k in ("model", "hidden", "channels")
               if getattr(cfg, k) != getattr(TrainConfig(), k)]
    if changed:
        raise ValueError(f"record_cifar trains the fixed five-layer ConvNet: {', '.join(changed)} "
                         "do not apply (leave them at their defaults)")
    X, Y = load_cifar(root, dataset=dataset, train=True)
    if limit is not None:
        X, Y = X[:limit], Y[:limit]
    num_classes = 10 if dataset == "cifar10" else 100
    if cfg.label_noise > 0:
        Y = with_label_noise(Y, cfg.label_noise, num_classes=num_classes, seed=cfg.init_seed)
    model = cifar_convnet(num_classes, seed=cfg.init_seed)
    if cfg.init_scale != 1.0:
        scale_init(model, cfg.init_scale)
    return record_training(
        model, X, Y, out, cfg, overwrite=overwrite, progress=progress,
        extra_metadata={"dataset": dataset, "n_train": len(X),
                        "architecture": "cifar_convnet (3 conv + 2 linear)"},
    )


def _progress(total: int, enabled: bool, *, desc: str):
    from tqdm import tqdm  # plain text bars: no ipywidgets needed in notebooks

    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", leave=False)


def add_config_arguments(parser, *, exclude: tuple[str, ...] = ()) -> None:
    """Add one ``--option`` per :class:`TrainConfig` field to an argparse parser (fields in
    ``exclude`` keep their defaults); choices are listed in ``--help``."""
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, tuple):
            parser.add_argument(flag, type=int, nargs=len(default), default=default,
                                help=f"(default: {' '.join(map(str, default))})")
        elif f.name in _CHOICES:
            parser.add_argument(flag, choices=_CHOICES[f.name], default=default,
                                help="(default: %(default)s)")
        else:
            parser.add_argument(flag, type=type(default), default=default,
                                help="(default: %(default)s)")


def config_from_arguments(args) -> TrainConfig:
    """The :class:`TrainConfig` described by parsed arguments (see add_config_arguments);
    ValueError names an invalid value."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name)}
    if "channels" in values:
        values["channels"] = tuple(values["channels"])
    return TrainConfig(**values)


def run_script(parser, body) -> None:
    """Run a recorder script's ``body(args)``: bad options are argparse errors (usage, exit 2),
    and trajlab's own errors and bad data one line each (exit 2), never a traceback."""
    import sys

    from trajlab.errors import TrajlabError

    args = parser.parse_args()
    try:
        body(args)
    except (TrajlabError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
