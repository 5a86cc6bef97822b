"""Study 4 (paper Fig. 5): batch size vs the variance of K (sigma_Z^2 ∝ 1/B?).

    python analyses/study_batch_size.py --out studies/batch_size
    python analyses/study_batch_size.py --out studies/batch_size --quick
    python analyses/study_batch_size.py --out my --runs my_sweep_dir/

Writes batch_size.json, batch_size.png and batch_size_drift.png into --out.
Logic: trajlab.studies.paper.
"""

from __future__ import annotations

from trajlab.studies.cli import study_config, study_kwargs, study_parser, values
from trajlab.studies.paper import batch_size_sweep


def main(argv: list[str] | None = None) -> dict:
    p = study_parser(__doc__, steps=600)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128],
                   help="swept values (default: %(default)s)")
    a = p.parse_args(argv)
    swept = values(a.batch_sizes, [8, 32], a.quick)
    return batch_size_sweep(a.out, config=study_config(a), batch_sizes=swept, **study_kwargs(a))


if __name__ == "__main__":
    main()
