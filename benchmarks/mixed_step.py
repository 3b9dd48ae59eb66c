#!/usr/bin/env python3
"""What a new request's prompt costs the running streams: a decoding step with the prompt folded
in (``ModelRunner.mixed``) beside the decoding step and a prefill forward of its own.

    python benchmarks/mixed_step.py                      # eager, 16 decoding rows
    python benchmarks/mixed_step.py --compile --rows 16 --prompts 4 16 32 64

The tiny checkpoint of ``benchmarks/serve_load.py``, one torch thread (what ``moekit serve``
leaves its forwards on 2 cores), no server: ``--rows`` sequences sit in the paged cache at 32
positions each, and for each prompt length L the three forwards take turns ``--repeats`` times
(medians printed, in ms): the decoding step alone (``ModelRunner.decode``); the same step with
one request's L prompt tokens in it (``ModelRunner.mixed``: what the step costs the running
streams when a request arrives now); and the L tokens' prefill in a forward of its own
(``ModelRunner.prefill``, ``moekit serve --separate-prefill``), which the running streams wait
for on top of their step. The ratio is the gap a request's arrival makes in the others' streams,
mixed over separate: (mixed step) / (step + prefill). ``--compile``: the steps compiled as
``moekit serve --compile`` compiles them (the separate prefill stays eager, as it is served);
compile time printed. Timings: run it alone (``flock -x /tmp/bench.lock`` here).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from serve_load import build_checkpoint

from moekit.serve import load_engine

CACHED = 32  # positions each decoding row has cached


def median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="decoding rows")
    parser.add_argument("--prompts", type=int, nargs="+", default=[4, 16, 32, 64],
                        help="prompt lengths")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny"
        build_checkpoint(folder)
        engine = load_engine(folder, max_batch=args.rows, compile=args.compile, threads=1)
    try:
        runner, pool = engine.scheduler.runner, engine.pool
        longest = max(args.prompts)
        tables = [pool.allocate(pool.blocks_for(CACHED + 1)) for _ in range(args.rows)]
        prompt_blocks = pool.allocate(pool.blocks_for(longest))
        tokens, lengths = [1] * args.rows, [CACHED] * args.rows
        print(f"tiny preset, {args.rows} decoding rows at {CACHED} cached positions, 1 torch "
              f"thread, {'compiled' if args.compile else 'eager'} steps (compiled in "
              f"{engine.compile_seconds:.1f} s), torch {torch.__version__}; medians of "
              f"{args.repeats} in ms")
        print("| prompt tokens | decoding step | step with the prompt in it | prefill of its "
              "own | gap: mixed / (step + prefill) |")
        print("|---|---|---|---|---|")
        with torch.inference_mode():
            for length in args.prompts:
                prompt = [(7 * i) % 1000 for i in range(length)]
                forwards = {
                    "step": lambda: runner.decode(tokens, tables, lengths),
                    "mixed": lambda: runner.mixed(tokens, tables, lengths, prompt,
                                                  prompt_blocks, 0),
                    "prefill": lambda: runner.prefill([prompt], [prompt_blocks])}
                for forward in forwards.values():
                    forward()  # warm-up
                times = {name: [] for name in forwards}
                for _ in range(3):  # taking turns, so that the machine's load falls on all
                    for name, forward in forwards.items():
                        times[name].append(median_ms(forward, args.repeats // 3))
                step, mixed, prefill = (statistics.median(times[name]) for name in forwards)
                print(f"| {length} | {step:.2f} | {mixed:.2f} | {prefill:.2f} | "
                      f"{mixed / (step + prefill):.2f}x |")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
