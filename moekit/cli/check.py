"""`moekit check`: prove on this machine that every layout computes the single-process step."""
from __future__ import annotations

from moekit.cli.values import positive_int
from moekit.config import PRESETS, read_config_file


def run_check(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from moekit.cli.train import model_config_of
    from moekit.train.equivalence import TOLERANCES, run_matrix
    if args.config:
        file = read_config_file(args.config)
        if "model" not in file and "preset" not in file:
            raise ValueError(f"config file {args.config!r} holds no model configuration (a "
                             "[model] section or a preset)")
    else:
        file = {}
    model_config = model_config_of(args.preset, file)
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    console = Console()
    with console.status(f"running the layouts on up to {args.nproc} processes"):
        rows, changes = run_matrix(model_config, args.nproc, dtype)
    if changes:
        console.print("Checked a smaller copy of the model: " + "; ".join(changes))
    table = Table(title=f"One training step per layout against one process ({args.dtype}, "
                        f"lb_scope step, tolerance {TOLERANCES[dtype]:g} relative)")
    for column in ("layout", "check", "max difference", "tolerance", "result"):
        table.add_column(column)
    failed = 0
    for row in rows:
        if row.checks is None:
            table.add_row(row.layout, "", "", "", f"skipped: {row.note}")
            continue
        worst = max(row.checks, key=lambda check: check.difference / check.tolerance)
        failures = [check.name for check in row.checks if not check.passed]
        failed += bool(failures)
        table.add_row(row.layout, f"{len(row.checks)} figures (worst: {worst.name})",
                      f"{worst.difference:.1e}", f"{worst.tolerance:g}",
                      "[green]pass[/]" if not failures else f"[red]FAIL[/] {', '.join(failures)}")
    console.print(table)
    return 1 if failed else 0


def register(subcommands) -> None:
    parser = subcommands.add_parser(
        "check", help="prove that every parallel layout computes the single-process step",
        description="Runs one training step of your model configuration (shrunk in depth and "
        "width where it must be, and said so) under gradient accumulation, padding, "
        "recomputation, data and expert parallelism on up to --nproc local processes (gloo), and "
        "compares the loss, router losses, statistics and every gradient with one process on "
        "the same global batch (docs/correctness.md). Exit 0 only when all pass.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), help="model preset (default tiny)")
    source.add_argument("--config", help="config file (.toml, .yaml, .json) with a model")
    parser.add_argument("--nproc", type=positive_int, default=2,
                        help="processes to run the layouts on (default 2)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="float64 (default) shows summation order only; float32 as trained")
    parser.set_defaults(run=run_check)
