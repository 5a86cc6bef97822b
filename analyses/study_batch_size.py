#!/usr/bin/env python3
"""Study 4 (paper Fig. 5): batch size vs the variance of K (sigma_Z^2 ∝ 1/B?).

    python analyses/study_batch_size.py --out studies/batch_size
    python analyses/study_batch_size.py --out studies/batch_size --quick
    python analyses/study_batch_size.py --out my --runs my_sweep_dir/

Writes batch_size.json, batch_size.png and batch_size_drift.png into --out.

A thin entry point: the study is trajlab.studies.batch_size (also ``trajlab study batch_size``).
"""

from __future__ import annotations

from trajlab.studies.registry import run_study


def main(argv: list[str] | None = None) -> dict:
    return run_study("batch_size", argv)


if __name__ == "__main__":
    main()
