"""Study 1 (paper Fig. 2): measured K per layer and K_net vs the SDE prediction and pathwise.

    python analyses/study_theory.py --out studies/theory            # one 600-step run
    python analyses/study_theory.py --out studies/theory --quick    # seconds
    python analyses/study_theory.py --out my --runs runs/cifar10.zarr

Writes theory.json and theory_<run>.png into --out. Logic: trajlab.studies.paper.
"""

from __future__ import annotations

from trajlab.studies.cli import study_config, study_kwargs, study_parser
from trajlab.studies.paper import theory_vs_measurement


def main(argv: list[str] | None = None) -> dict:
    a = study_parser(__doc__, steps=600).parse_args(argv)
    return theory_vs_measurement(a.out, config=study_config(a), **study_kwargs(a))


if __name__ == "__main__":
    main()
