"""Command-line options the paper studies share (``trajlab study NAME``, ``analyses/study_*``).

A study's ``add_arguments`` calls :func:`add_common_arguments` and adds its own; its ``run``
turns the parsed options into a configuration with :func:`study_config` and into the keyword
arguments every study function takes with :func:`study_kwargs`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from trajlab.recipes import TrainConfig
from trajlab.studies.common import BASE

__all__ = ["QUICK", "add_common_arguments", "study_config", "study_kwargs", "values"]

#: The ``--quick`` size: seconds per study, for smoke tests.
QUICK = {"steps": 30, "hidden": 8, "batch_size": 16}


def add_common_arguments(p: argparse.ArgumentParser, *, steps: int) -> None:
    """Add the options every paper study shares (its own are added after)."""
    p.add_argument("--out", required=True, help="output folder (run stores, analyses, JSON, PNG)")
    p.add_argument("--runs", nargs="+", metavar="DIR_OR_STORE",
                   help="analyse these run stores (or folders of them) instead of recording")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny smoke-test size (seconds): {QUICK}")
    p.add_argument("--model", choices=("mlp", "convnet"), default=BASE.model,
                   help="digits model (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=BASE.hidden, help="width (default: %(default)s)")
    p.add_argument("--steps", type=int, default=steps, help="SGD steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the study's)")
    p.add_argument("--batch-size", type=int, default=BASE.batch_size,
                   help="batch size (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=BASE.dtype,
                   help="training dtype (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    p.add_argument("--scheduler", default="threads",
                   help="Dask scheduler for the analyses: threads (default), synchronous, "
                        "processes, a scheduler address, or 'cluster' (one LocalCluster for all)")
    p.add_argument("--progress", action="store_true", help="progress bars")


def study_config(args: argparse.Namespace, *, lr: float = BASE.lr) -> TrainConfig:
    """The base TrainConfig described by the shared options (``--quick`` shrinks it)."""
    cfg = BASE.replace(model=args.model, hidden=args.hidden, steps=args.steps,
                       lr=lr if args.lr is None else args.lr, batch_size=args.batch_size,
                       dtype=args.dtype, init_seed=args.seed)
    if args.quick:
        cfg = cfg.replace(**QUICK)
    return cfg


def study_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments every study function takes, from the shared options."""
    return {"runs": args.runs, "scheduler": args.scheduler, "progress": args.progress}


def values(args_values: Sequence, quick_values: Sequence, quick: bool) -> list:
    """The swept values: ``quick_values`` under ``--quick``."""
    return list(quick_values if quick else args_values)
