"""The progress display of a training run: a live bar on a terminal, plain lines elsewhere."""
from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.progress import Progress as RichProgress


def describe(record: dict, records: list[dict]) -> str:
    """One line: loss, last validation loss, tokens/s, mean drop rate."""
    evals = [r for r in records if r["kind"] == "eval"]
    parts = [f"loss {record['loss']:.3f}"]
    if evals:
        parts.append(f"val {evals[-1]['val_loss']:.3f} (ppl {math.exp(evals[-1]['val_loss']):.1f})")
    parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    parts.append(f"MFU {record['mfu']:.1%}" if "mfu" in record
                 else f"{record['model_flops_per_s'] / 1e9:.1f} GFLOP/s")
    if record["drop_rate"]:
        parts.append(f"drop {sum(record['drop_rate']) / len(record['drop_rate']):.1%}")
    return "  ".join(parts)


class Progress:
    """``with Progress(total, start, enabled) as p: p.update(step, record, records)``."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.total, self.start, self.enabled = total, start, enabled
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.bar = None
        self.started = time.perf_counter()
        # Off a terminal: about ten lines per run.
        self.print_every = max((total - start) // 10, 1)

    def __enter__(self):
        if self.live:
            self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                    TextColumn("eta"), TimeRemainingColumn(),
                                    console=self.console)
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, completed=self.start,
                                          info="")
        return self

    def update(self, step: int, record: dict, records: list[dict]) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=describe(record, records))
        elif self.enabled and (step % self.print_every == 0 or step == self.total):
            elapsed = time.perf_counter() - self.started
            eta = elapsed / (step - self.start) * (self.total - step)
            self.console.print(f"step {step}/{self.total}  {describe(record, records)}  "
                               f"eta {eta:.0f}s", highlight=False, soft_wrap=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
