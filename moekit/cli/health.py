"""`moekit plot` (redraw a run's PNGs) and `moekit inspect` (a checkpoint's router health)."""
from __future__ import annotations

from pathlib import Path

from moekit.cli.paths import input_option
from moekit.cli.values import positive_int


def run_plot(args) -> int:
    from moekit.train.loop import METRICS_FILE
    from moekit.train.plots import plot_run, read_records
    run = Path(args.run_dir)
    if not (run / METRICS_FILE).is_file():
        raise ValueError(f"{run}: not a moekit run folder (no {METRICS_FILE}); give the folder "
                         "that `moekit train --out` wrote")
    records = read_records(run / METRICS_FILE)
    if not any(r["kind"] == "train" for r in records):
        raise ValueError(f"{run / METRICS_FILE}: no training steps logged yet")
    for path in plot_run(records, run / "plots"):
        print(path)
    return 0


def _number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from moekit.train.health import CollapseThresholds
    from moekit.train.inspect import inspect_checkpoint
    thresholds = CollapseThresholds(args.min_expert_tokens, args.min_max1_over_max2,
                                    args.max_load_over_mean)
    found = inspect_checkpoint(args.checkpoint, args.data, batches=args.batches,
                               thresholds=thresholds)
    console = Console()
    console.print(f"{found.checkpoint}: {found.num_tokens} tokens of {found.source}")
    collapsing = 0
    for layer in found.layers:
        counts = layer["tokens_per_expert"]
        total = max(sum(counts), 1)
        table = Table(title=f"MoE layer {layer['layer']}", title_justify="left")
        for column in ("expert", "tokens", "share"):
            table.add_column(column, justify="right")
        for expert, count in enumerate(counts):
            flagged = count < thresholds.min_expert_tokens
            table.add_row(str(expert), f"[red]{count}[/]" if flagged else str(count),
                          f"{count / total:.3f}")
        console.print(table)
        console.print(
            f"layer {layer['layer']}: load cv {_number(layer['load_cv'])}, max/mean {_number(layer['load_max_over_mean'])}, "
            f"max/min {_number(layer['load_max_over_min'])}, entropy "
            f"{_number(layer['router_entropy'])} nats, max1/max2 "
            f"{_number(layer['max1_over_max2'])}, max2/max3 {_number(layer['max2_over_max3'])}, "
            f"expert similarity {_number(layer['expert_similarity'])}")
        if layer["flags"]:
            collapsing += 1
            console.print(f"[red]collapsing router[/]: {'; '.join(layer['flags'])}")
    console.print(f"{collapsing} of {len(found.layers)} MoE layers flagged (thresholds: "
                  f"fewer than {thresholds.min_expert_tokens} tokens for an expert, max1/max2 under "
                  f"{thresholds.min_max1_over_max2:g}, max/mean load over "
                  f"{thresholds.max_load_over_mean:g})")
    return 0


def register(subcommands) -> None:
    plot = subcommands.add_parser(
        "plot", help="redraw a training run's PNGs from its metrics.jsonl",
        description="Redraws RUN/plots/*.png from RUN/metrics.jsonl, at any time (also while "
        "the run trains: a last line still being written is left out), each file replaced "
        "whole: loss, drop rate and expert load, and per MoE layer the expert load over steps "
        "(load_layer_N.png), max1/max2 and max2/max3 (router_ratios.png), imbalance "
        "(imbalance.png) and expert similarity (expert_similarity.png). It updates the run "
        "folder in place, as `train --resume` does (docs/train.md).")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="the folder `moekit train --out` wrote")
    plot.set_defaults(run=run_plot)

    inspect = subcommands.add_parser(
        "inspect", help="a checkpoint's router health on held-out text, collapse flagged",
        description="Runs the checkpoint in evaluation mode over held-out text (default: the "
        "validation split of the run it belongs to) and prints, per MoE layer, the tokens each "
        "expert got, the load's imbalance, the router's entropy, max1/max2 and max2/max3, and "
        "the experts' mean pairwise cosine similarity; a layer crossing a threshold below is "
        "flagged as a collapsing router (docs/train.md). Writes nothing.")
    inspect.add_argument("checkpoint", metavar="CHECKPOINT",
                         help="a checkpoint folder, or a run folder (its newest checkpoint)")
    input_option(inspect, "--data", metavar="FILE",
                 help="held-out text instead of the run's validation split: a .txt, .md or "
                      ".jsonl file, or a folder of them")
    inspect.add_argument("--batches", type=positive_int, default=8,
                         help="batches of 8 windows to read (default 8)")
    inspect.add_argument("--min-expert-tokens", type=int, default=1,
                         help="flag an expert with fewer tokens than this (default 1: none)")
    inspect.add_argument("--min-max1-over-max2", type=float, default=1.05,
                         help="flag a mean top-1 / top-2 probability under this: a flat gate "
                              "(default 1.05)")
    inspect.add_argument("--max-load-over-mean", type=float, default=2.0,
                         help="flag a max load over this times the mean load (default 2)")
    inspect.set_defaults(run=run_inspect)
