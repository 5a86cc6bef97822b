"""Optimizer validation (issue 23): coverage of the forward prediction's 95% band per optimizer.

    python analyses/study_optimizers.py --out studies/optimizers
    python analyses/study_optimizers.py --out studies/optimizers --quick

R runs from one initialisation (sampling seeds 0..R-1) for SGD (probe every step, every 10
steps, none), momentum 0.9, Adam and AdamW on the digits MLP; writes optimizer_validation.json.
Logic: trajlab.studies.optimizers.
"""

from __future__ import annotations

import argparse

from trajlab.studies.optimizers import optimizer_validation


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=16, help="runs per optimizer (default: 16)")
    p.add_argument("--steps", type=int, default=40, help="steps per run (default: 40)")
    p.add_argument("--model", choices=("mlp", "convnet"), default="mlp")
    p.add_argument("--quick", action="store_true", help="4 runs of 8 steps (smoke test)")
    a = p.parse_args(argv)
    runs, steps = (4, 8) if a.quick else (a.runs, a.steps)
    return optimizer_validation(a.out, runs=runs, steps=steps, model=a.model)


if __name__ == "__main__":
    main()
