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
    parser.parse_args(argv)
    parser.print_help()  # commands (train, generate, plan, ...) arrive with their issues
    return 0


if __name__ == "__main__":
    sys.exit(main())
