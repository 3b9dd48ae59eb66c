"""The options through which a command reads and writes files, declared where the command adds
them, and checked by one rule (moekit.files.check_output) before any command runs.

A command adds its outputs with ``output_option`` (which also gives it ``--overwrite``) and its
inputs with ``input_option``; ``check_paths`` then refuses an output equal to, inside or around
an input, an existing one without ``--overwrite``, and one another process is writing. A command
whose documented job is to update its output in place names the flag that says so
(``in_place_when="resume"``): with it set, that output is the command's to update.
"""
from __future__ import annotations

import argparse

from moekit.files import check_output


def output_option(parser: argparse.ArgumentParser, flag: str, *, kind: str = "folder",
                  in_place_when: str | None = None, **options) -> argparse.Action:
    """Add ``flag`` naming a ``kind`` ("folder" or "file") the command writes."""
    action = parser.add_argument(flag, metavar="DIR" if kind == "folder" else "FILE", **options)
    action.writes, action.in_place_when = kind, in_place_when
    if not any("--overwrite" in other.option_strings for other in parser._actions):
        parser.add_argument("--overwrite", action="store_true",
                            help="replace an existing output (never an input)")
    return action


def input_option(parser: argparse.ArgumentParser, *flags: str, **options) -> argparse.Action:
    """Add an option naming files or folders the command reads."""
    action = parser.add_argument(*flags, **options)
    action.reads = True
    return action


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser of each subcommand of ``parser``, by name."""
    return {name: command for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
            for name, command in action.choices.items()}


def check_paths(command: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Apply moekit.files.check_output to every output option ``args`` gives a value to."""
    inputs = []
    for action in command._actions:
        values = getattr(args, action.dest, None)
        if getattr(action, "reads", False) and values is not None:
            inputs += [(action.option_strings[0], value)
                       for value in (values if isinstance(values, list) else [values])]
    for action in command._actions:
        output = getattr(args, action.dest, None)
        if not hasattr(action, "writes") or output is None:
            continue
        in_place = action.in_place_when
        if in_place and getattr(args, in_place):
            continue
        check_output(output, inputs, overwrite=args.overwrite, option=action.option_strings[0],
                     kind=action.writes, hint=f" (or --{in_place} to continue it)"
                     if in_place else "")
