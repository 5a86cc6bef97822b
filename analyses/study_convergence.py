"""Study 2 (paper Fig. 3): a long run toward convergence; which drift term dominates late.

    python analyses/study_convergence.py --out studies/convergence          # 3000 steps
    python analyses/study_convergence.py --out studies/convergence --quick  # seconds

Writes convergence.json and convergence*_<run>.png into --out. Logic: trajlab.studies.paper.
"""

from __future__ import annotations

from trajlab.studies.cli import study_config, study_kwargs, study_parser
from trajlab.studies.paper import convergence


def main(argv: list[str] | None = None) -> dict:
    p = study_parser(__doc__, steps=3000)
    p.add_argument("--late-fraction", type=float, default=0.5,
                   help="last fraction of the steps that is the late phase (default: 0.5)")
    p.add_argument("--window", type=int, default=100,
                   help="moving-average window in steps (default: 100)")
    a = p.parse_args(argv)
    cfg = study_config(a, lr=0.1)
    if a.quick:
        cfg = cfg.replace(steps=60)
    return convergence(a.out, config=cfg, late_fraction=a.late_fraction, window=a.window,
                       **study_kwargs(a))


if __name__ == "__main__":
    main()
