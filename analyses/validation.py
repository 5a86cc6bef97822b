#!/usr/bin/env python3
"""The validation study of issue 4 (MATH.md §4a): many runs differing only in sampling order.

    python analyses/validation.py --out validation-out            # full size (minutes)
    python analyses/validation.py --out validation-quick --quick  # a smoke run (seconds)

Writes ``validation.json`` and ``validation.png`` into ``--out`` and prints the verdict.

A thin entry point: the study is trajlab.studies.validation (also ``trajlab study validation``).
"""

from __future__ import annotations

from trajlab.studies.registry import run_study


def main(argv: list[str] | None = None) -> dict:
    return run_study("validation", argv)


if __name__ == "__main__":
    main()
