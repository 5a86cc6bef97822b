#!/usr/bin/env python3
"""Optimizer validation (issue 23): coverage of the forward prediction's 95% band per optimizer.

    python analyses/study_optimizers.py --out studies/optimizers
    python analyses/study_optimizers.py --out studies/optimizers --quick

R runs from one initialisation (sampling seeds 0..R-1) for SGD (probe every step, every 10
steps, none), momentum 0.9, Adam and AdamW on the digits MLP; writes optimizer_validation.json.

A thin entry point: the study is trajlab.studies.optimizers (also ``trajlab study optimizers``).
"""

from __future__ import annotations

from trajlab.studies.registry import run_study


def main(argv: list[str] | None = None) -> dict:
    return run_study("optimizers", argv)


if __name__ == "__main__":
    main()
