"""The command line: ``python -m core COMMAND ...`` (run ``python -m core --help``).

Every command prints problems the user can fix (any ``core.errors.ProtoscopeError``, an ``OSError`` such as
a folder without write permission or a full disk, running out of memory) as one ``error: ...`` line on
stderr and exits with status 2 (no traceback); progress goes to stderr, results to stdout or files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from core import __version__
from core.cli import experiments, io, pipeline, refine
from core.errors import ProtoscopeError
from core.io.atomic import output_name_of


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes (an unknown option, a missing argument, ``--channel abc``) are one
    ``error: ...`` line and exit status 2, like every other problem a user can fix; ``--help`` shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m core",
        description=(
            "Protoscope: segment fluorescence microscopy stacks from a few clicked points with "
            "prototype similarity on DINOv2 or filter-bank features."
        ),
    )
    parser.add_argument("--version", action="version", version=f"protoscope {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in (io, pipeline, experiments, refine):
        module.register(subparsers)
    return parser


def error_line(error: BaseException) -> str:
    """``error: <message>`` on one line (a multi-line message is joined with '; ')."""
    if isinstance(error, OSError) and not isinstance(error, ProtoscopeError):
        reason = error.strerror or str(error) or type(error).__name__
        if error.filename is None:
            text = reason
        else:  # name the output, not the temp file core.io.atomic writes beside it
            path = Path(error.filename)
            text = f"cannot use '{path.with_name(output_name_of(path.name))}': {reason}"
    elif isinstance(error, MemoryError):
        text = ("out of memory: the slices or the result are too large for this machine; select fewer slices "
                "(--z) or use a machine with more RAM")
    else:
        text = str(error) or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "error: " + "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 done, 2 a problem the user can fix, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ProtoscopeError, OSError, MemoryError) as error:
        # OSError: an output folder without write permission, a full disk, a file that vanished mid-run
        print(error_line(error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
