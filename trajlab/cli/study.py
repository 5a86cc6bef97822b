"""trajlab study NAME: run one registered study (the STUDIES table of trajlab.studies.registry).

Each study adds its own options (``trajlab study NAME --help``); the list of names comes from
the registry, so a new study needs no change here.
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from trajlab.studies.registry import STUDIES, build_parser

    p = sub.add_parser("study", help="run one of trajlab's studies (the paper's figures, "
                                     "validations); trajlab study NAME --help",
                       description=__doc__.splitlines()[0])
    names = p.add_subparsers(dest="study", required=True, metavar="NAME",
                             parser_class=type(p))
    for study in STUDIES.values():
        build_parser(study, names.add_parser(
            study.name, help=study.summary.replace("%", "%%"), description=study.summary,
            epilog=study.usage,
            formatter_class=argparse.RawDescriptionHelpFormatter))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trajlab.studies.registry import STUDIES

    STUDIES[args.study].run(args)
    return 0
