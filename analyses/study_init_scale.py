#!/usr/bin/env python3
"""Study 6: initialisation scale vs K trajectories and drift terms.

    python analyses/study_init_scale.py --out studies/init_scale
    python analyses/study_init_scale.py --out studies/init_scale --quick
    python analyses/study_init_scale.py --out my --runs my_sweep_dir/

Writes init_scale.json, init_scale.png and init_scale_drift.png into --out.

A thin entry point: the study is trajlab.studies.init_scale (also ``trajlab study init_scale``).
"""

from __future__ import annotations

from trajlab.studies.registry import run_study


def main(argv: list[str] | None = None) -> dict:
    return run_study("init_scale", argv)


if __name__ == "__main__":
    main()
