"""`moekit <command>`: a thin layer over the library. Bad input is one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import sys

from moekit import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit",
        description="Build, convert, train, plan and serve Mixture-of-Experts language models.")
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
