"""The ``trajlab`` command: demo, info, analyze, plot, export, estimate, study — thin shells over
the library.

Each command is one module with ``add_parser(subparsers)`` and ``run(args)``. Every failure is
reported as one line naming the problem and the fix, with exit status 2 and no traceback
(``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from trajlab.cli import analyze, demo, estimate, export, info, plot, study
from trajlab.cli.info import format_info

COMMANDS = [demo, info, analyze, plot, export, estimate, study]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="trajlab", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    return p


def describe_error(e: BaseException) -> str:
    """One line naming the problem and, where known, the fix."""
    from trajlab.errors import TrajlabError

    if isinstance(e, (TrajlabError, FileNotFoundError, FileExistsError)):
        return str(e)
    if isinstance(e, PermissionError):
        return (f"permission denied: {e.filename or e}; choose a location you can write "
                "(--out) or fix its permissions")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"no space left on device ({e.filename or 'while writing'}); free space or "
                "choose another location; committed steps and finished chunks are kept")
    if isinstance(e, (ValueError, KeyError, TypeError)):
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        return str(msg)
    if isinstance(e, ImportError):
        return f"{e}; install the missing optional dependency (pip install ...)"
    return (f"{type(e).__name__}: {e} — if a URL store is involved, check the URL, network and "
            "credentials (--storage-options JSON or @FILE, or the environment); rerun with "
            "--debug for the traceback")


def main(argv: list[str] | None = None) -> int:
    if "MPLBACKEND" not in os.environ:
        import matplotlib

        matplotlib.use("Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"trajlab {args.command}: interrupted; committed work is kept (rerun to resume)",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI reports every failure as one line
        if args.debug:
            raise
        text = " ".join(describe_error(e).split())
        print(f"trajlab {args.command}: error: {text}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "format_info", "main"]

if __name__ == "__main__":
    sys.exit(main())
