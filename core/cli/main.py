"""The command line: ``python -m core COMMAND ...`` (run ``python -m core --help``).

Every command prints problems the user can fix as one ``error: ...`` line on stderr and exits with
status 2 (no traceback); progress goes to stderr, results to stdout or files.
"""

from __future__ import annotations

import argparse
import sys

from core import __version__
from core.cli import experiments, io, pipeline, refine
from core.errors import ProtoscopeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ProtoscopeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
