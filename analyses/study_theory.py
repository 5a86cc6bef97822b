#!/usr/bin/env python3
"""Study 1 (paper Fig. 2): measured K per layer and K_net vs the SDE prediction and pathwise.

    python analyses/study_theory.py --out studies/theory            # one 600-step run
    python analyses/study_theory.py --out studies/theory --quick    # seconds
    python analyses/study_theory.py --out my --runs runs/cifar10.zarr

Writes theory.json and theory_<run>.png into --out.

A thin entry point: the study is trajlab.studies.theory (also ``trajlab study theory``).
"""

from __future__ import annotations

from trajlab.studies.registry import run_study


def main(argv: list[str] | None = None) -> dict:
    return run_study("theory", argv)


if __name__ == "__main__":
    main()
