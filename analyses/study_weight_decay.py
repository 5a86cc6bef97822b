"""Study 7: weight decay vs the growth of K, and what the theory terms include.

    python analyses/study_weight_decay.py --out studies/weight_decay
    python analyses/study_weight_decay.py --out studies/weight_decay --quick
    python analyses/study_weight_decay.py --out my --runs my_sweep_dir/

Writes weight_decay.json, weight_decay.png and weight_decay_drift.png into --out.
Logic: trajlab.studies.paper.
"""

from __future__ import annotations

from trajlab.studies.cli import study_config, study_kwargs, study_parser, values
from trajlab.studies.paper import weight_decay_sweep


def main(argv: list[str] | None = None) -> dict:
    p = study_parser(__doc__, steps=600)
    p.add_argument("--weight-decays", type=float, nargs="+", default=[0, 0.001, 0.01],
                   help="swept values (default: %(default)s)")
    a = p.parse_args(argv)
    swept = values(a.weight_decays, [0.0, 0.01], a.quick)
    return weight_decay_sweep(a.out, config=study_config(a), decays=swept, **study_kwargs(a))


if __name__ == "__main__":
    main()
