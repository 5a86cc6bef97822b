#!/usr/bin/env python3
"""Study 3 (paper Fig. 4): one initialisation, several sampling orders; spread vs the band.

    python analyses/study_orders.py --out studies/orders --orders 8
    python analyses/study_orders.py --out studies/orders --quick

Writes orders.json and orders.png into --out.

A thin entry point: the study is trajlab.studies.orders (also ``trajlab study orders``).
"""

from __future__ import annotations

from trajlab.studies.registry import run_study


def main(argv: list[str] | None = None) -> dict:
    return run_study("orders", argv)


if __name__ == "__main__":
    main()
