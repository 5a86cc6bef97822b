#!/usr/bin/env python3
"""Study 5: label-noise fraction vs gradient noise and Lipschitz growth.

    python analyses/study_label_noise.py --out studies/label_noise
    python analyses/study_label_noise.py --out studies/label_noise --quick
    python analyses/study_label_noise.py --out my --runs my_sweep_dir/

Writes label_noise.json, label_noise.png and label_noise_drift.png into --out.

A thin entry point: the study is trajlab.studies.label_noise (also ``trajlab study label_noise``).
"""

from __future__ import annotations

from trajlab.studies.registry import run_study


def main(argv: list[str] | None = None) -> dict:
    return run_study("label_noise", argv)


if __name__ == "__main__":
    main()
