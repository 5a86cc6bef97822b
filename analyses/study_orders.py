"""Study 3 (paper Fig. 4): one initialisation, several sampling orders; spread vs the band.

    python analyses/study_orders.py --out studies/orders --orders 8
    python analyses/study_orders.py --out studies/orders --quick

Writes orders.json and orders.png into --out. Logic: trajlab.studies.paper.
"""

from __future__ import annotations

from trajlab.studies.cli import study_config, study_kwargs, study_parser
from trajlab.studies.paper import sampling_orders


def main(argv: list[str] | None = None) -> dict:
    p = study_parser(__doc__, steps=400)
    p.add_argument("--orders", type=int, default=8,
                   help="sampling orders (sampling seeds 0..n-1; default: 8)")
    a = p.parse_args(argv)
    return sampling_orders(a.out, config=study_config(a), orders=3 if a.quick else a.orders,
                           **study_kwargs(a))


if __name__ == "__main__":
    main()
