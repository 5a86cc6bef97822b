"""Study 5: label-noise fraction vs gradient noise and Lipschitz growth.

    python analyses/study_label_noise.py --out studies/label_noise
    python analyses/study_label_noise.py --out studies/label_noise --quick
    python analyses/study_label_noise.py --out my --runs my_sweep_dir/

Writes label_noise.json, label_noise.png and label_noise_drift.png into --out.
Logic: trajlab.studies.paper.
"""

from __future__ import annotations

from trajlab.studies.cli import study_config, study_kwargs, study_parser, values
from trajlab.studies.paper import label_noise_sweep


def main(argv: list[str] | None = None) -> dict:
    p = study_parser(__doc__, steps=600)
    p.add_argument("--label-noise", type=float, nargs="+", default=[0, 0.2, 0.4],
                   help="swept values (default: %(default)s)")
    a = p.parse_args(argv)
    swept = values(a.label_noise, [0.0, 0.4], a.quick)
    return label_noise_sweep(a.out, config=study_config(a), fractions=swept, **study_kwargs(a))


if __name__ == "__main__":
    main()
