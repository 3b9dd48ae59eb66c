"""`moekit <command>`: a thin layer over the library.

Each command lives in its own module of this package with ``register(subcommands)``, which adds
its parser and sets ``run(args) -> int``. Bad input (a ValueError from the library or the command)
is one line on stderr and exit code 2; Ctrl-C is exit code 130. Before a command runs, the paths
it reads and writes are checked by one rule (moekit.cli.paths).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from moekit import __version__
from moekit.cli.paths import check_paths, command_parsers
from moekit.devices import retain_freed_cpu_memory

# Modules of moekit.cli, one per command group, in the order `moekit --help` lists them.
COMMAND_MODULES: tuple[str, ...] = ("train", "post_train", "health", "check", "convert", "plan",
                                    "quantize", "serve")


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moekit",
        description="Build, convert, train, plan and serve Mixture-of-Experts language models.")
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"moekit.cli.{name}").register(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc runs again
    if args.command is None:
        parser.print_help()
        return 0
    retain_freed_cpu_memory()  # this process is ours: large CPU tensors reuse freed memory
    try:
        check_paths(command_parsers(parser)[args.command], args)
        return args.run(args)
    except ValueError as error:  # the config, file and CLI layers name the bad value
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per process
            print(f"moekit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moekit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`moekit plan --json | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
