#!/usr/bin/env python3
"""Study 7: weight decay vs the growth of K, and what the theory terms include.

    python analyses/study_weight_decay.py --out studies/weight_decay
    python analyses/study_weight_decay.py --out studies/weight_decay --quick
    python analyses/study_weight_decay.py --out my --runs my_sweep_dir/

Writes weight_decay.json, weight_decay.png and weight_decay_drift.png into --out.

A thin entry point: the study is trajlab.studies.weight_decay (also ``trajlab study weight_decay``).
"""

from __future__ import annotations

from trajlab.studies.registry import run_study


def main(argv: list[str] | None = None) -> dict:
    return run_study("weight_decay", argv)


if __name__ == "__main__":
    main()
