"""The study registry: every module of :mod:`trajlab.studies` that defines ``STUDY`` (a
:class:`Study`) is a study, listed in :data:`STUDIES` and run by ``trajlab study NAME`` or
:func:`run_study`.

A new study is one file here defining its function and ``STUDY``, plus its test; nothing else
lists it. The command line is built like the CLI's ``COMMANDS``: each study adds its options
to a parser (``add_arguments``) and runs from the parsed options (``run``).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["STUDIES", "Study", "build_parser", "run_study"]


@dataclass(frozen=True)
class Study:
    """One registered study.

    Attributes
    ----------
    name : ``trajlab study NAME``; also the stem of its JSON file where it writes one.
    summary : one line (the paper figure or issue it tests).
    add_arguments : adds the study's options to an argparse parser.
    run : runs the study from the parsed options; returns its result dict.
    usage : example command lines and what is written (shown after the options).
    """

    name: str
    summary: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict[str, Any]]
    usage: str = ""


def _discover() -> dict[str, Study]:
    import trajlab.studies as package

    found: dict[str, Study] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "registry":
            continue
        study = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "STUDY",
                        None)
        if isinstance(study, Study):
            if study.name in found:
                raise RuntimeError(f"two studies are named {study.name!r} "
                                   f"(trajlab.studies.{info.name} and another); rename one")
            found[study.name] = study
    return found


class _Table(Mapping[str, Study]):
    """name -> :class:`Study`, found on first use rather than at import (the study modules
    import this one)."""

    def __init__(self) -> None:
        self._found: dict[str, Study] | None = None

    def _studies(self) -> dict[str, Study]:
        if self._found is None:
            self._found = _discover()
        return self._found

    def __getitem__(self, name: str) -> Study:
        return self._studies()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._studies())

    def __len__(self) -> int:
        return len(self._studies())


#: name -> :class:`Study`: every study of the package, by name.
STUDIES: Mapping[str, Study] = _Table()


def build_parser(study: Study, parser: argparse.ArgumentParser | None = None
                 ) -> argparse.ArgumentParser:
    """A parser for ``study`` (or ``parser`` given its options)."""
    if parser is None:
        parser = argparse.ArgumentParser(prog=f"trajlab study {study.name}",
                                         description=study.summary, epilog=study.usage,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_arguments(parser)
    return parser


def run_study(name: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the study ``name`` with command-line arguments ``argv`` (default: sys.argv)."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)} "
                         "(trajlab study --help lists them)")
    study = STUDIES[name]
    return study.run(build_parser(study).parse_args(argv))
