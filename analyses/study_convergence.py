#!/usr/bin/env python3
"""Study 2 (paper Fig. 3): a long run toward convergence; which drift term dominates late.

    python analyses/study_convergence.py --out studies/convergence          # 3000 steps
    python analyses/study_convergence.py --out studies/convergence --quick  # seconds

Writes convergence.json and convergence*_<run>.png into --out.

A thin entry point: the study is trajlab.studies.convergence (also ``trajlab study convergence``).
"""

from __future__ import annotations

from trajlab.studies.registry import run_study


def main(argv: list[str] | None = None) -> dict:
    return run_study("convergence", argv)


if __name__ == "__main__":
    main()
