"""Study 6: initialisation scale vs K trajectories and drift terms.

    python analyses/study_init_scale.py --out studies/init_scale
    python analyses/study_init_scale.py --out studies/init_scale --quick
    python analyses/study_init_scale.py --out my --runs my_sweep_dir/

Writes init_scale.json, init_scale.png and init_scale_drift.png into --out.
Logic: trajlab.studies.paper.
"""

from __future__ import annotations

from trajlab.studies.cli import study_config, study_kwargs, study_parser, values
from trajlab.studies.paper import init_scale_sweep


def main(argv: list[str] | None = None) -> dict:
    p = study_parser(__doc__, steps=600)
    p.add_argument("--init-scales", type=float, nargs="+", default=[0.5, 1, 2],
                   help="swept values (default: %(default)s)")
    a = p.parse_args(argv)
    swept = values(a.init_scales, [0.5, 2.0], a.quick)
    return init_scale_sweep(a.out, config=study_config(a), scales=swept, **study_kwargs(a))


if __name__ == "__main__":
    main()
