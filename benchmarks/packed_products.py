#!/usr/bin/env python3
"""Few-row products on packed weights (``moekit.moe.packed``) beside ``F.linear``, per shape of
the generation benchmark's model, row count and dtype, and the memory the packed copies take.

    python benchmarks/packed_products.py                       # fp32 and bf16, 2 threads
    python benchmarks/packed_products.py --threads 1 --rows 1 4 16 --hints 1 16
    python benchmarks/packed_products.py --threads 1 --dtypes bf16 --step-batches 1 4 8 16

Each form multiplies a pass over ``--megabytes`` of distinct weights of a shape (as a decoding
step reads each weight once, not again from the core's cache), ``--rounds`` times; the figure
is the median microseconds per product, and the ratio F.linear's time over the packed one's
(above 1: packed is faster). Each packed weight is packed once for ``hint`` rows and then
multiplied by every row count: the hint is oneDNN's layout choice, not a limit. The memory line
is the anonymous resident memory (Linux RssAnon) that packing every matrix of the
benchmark's model added, beside the bytes of those matrices plain. ``--step-batches`` also
times an eager decoding step of that model (``benchmarks/generate.py``'s, imported from
transformers) packed for each batch beside the plain one: the fastest of ``--rounds`` rounds
of 16 steps after a 32-token prompt, the two taking turns in each round.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from generate import hf_mixtral
from moekit.convert.hf import transformer_from_hf
from moekit.model.decode_step import DecodeStep, StaticDecodeCache, cache_length
from moekit.model.generate import prefill
from moekit.model.packed import pack_for_decoding
from moekit.moe.packed import PackedWeight, packed_linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# [out, in] of benchmarks/generate.py's model: expert gate+up, expert down, q/o, k/v, head
SHAPES = [(2048, 512), (512, 1024), (512, 512), (128, 512), (8000, 512)]
# How many of each a step of that model multiplies: 8 experts x 4 layers, 2 per layer, 1 head
MODEL_COUNTS = [32, 32, 8, 8, 1]


def rss_anon_bytes() -> int:
    return int(Path("/proc/self/status").read_text().split("RssAnon:")[1].split()[0]) * 1024


def median_us(run, rounds: int, count: int) -> float:
    run()  # warm-up: oneDNN prepares a kernel per shape on its first call
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) / count * 1e6)
    return statistics.median(times)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--hints", type=int, nargs="+", default=[16])
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step-batches", type=int, nargs="*", default=[],
                        help="also time a decoding step of the model packed for each batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    held = [print_memory(name, DTYPES[name], args.hints[0]) for name in args.dtypes]
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; microseconds per "
          "product, F.linear / packed")
    for name in args.dtypes:
        dtype = DTYPES[name]
        for out_features, in_features in SHAPES:
            count = max(1, args.megabytes * 2**20 // (out_features * in_features * dtype.itemsize))
            weights = [torch.randn(out_features, in_features, dtype=dtype) for _ in range(count)]
            packed = {hint: [PackedWeight(w, hint) for w in weights] for hint in args.hints}
            for rows in args.rows:
                x = torch.randn(rows, in_features).to(dtype)
                plain = median_us(lambda: [F.linear(x, w) for w in weights], args.rounds, count)
                cells = [f"F.linear {plain:7.1f}"]
                for hint, packs in packed.items():
                    ours = median_us(lambda: [packed_linear(x, p) for p in packs], args.rounds,
                                     count)
                    cells.append(f"packed for {hint:2} rows {ours:7.1f} ({plain / ours:4.2f}x)")
                print(f"{name} {out_features:5} x {in_features:4}, {rows:2} rows: "
                      + ", ".join(cells), flush=True)
    del held
    for name in args.dtypes if args.step_batches else []:
        plain = transformer_from_hf(hf_mixtral(8000, 4)).eval().to(DTYPES[name])
        for batch in args.step_batches:
            print_step_times(plain, name, batch, args.rounds)


def step_seconds(model, prompts: list[list[int]], steps: int = 16) -> float:
    """Seconds per eager decoding step after a prefill of ``prompts``."""
    logits_B1V, cache = prefill(model, prompts,
                                cache_length(len(prompts[0]) + steps + 1, model.config.max_seq_len))
    cache = StaticDecodeCache(cache, torch.full((len(prompts),), len(prompts[0])))
    next_B, step = logits_B1V[:, -1].argmax(-1), DecodeStep(model)
    start = time.perf_counter()
    for _ in range(steps):
        next_B = step(next_B[:, None], cache).argmax(-1)
    return (time.perf_counter() - start) / steps


def print_step_times(plain, name: str, batch: int, rounds: int) -> None:
    packed = pack_for_decoding(copy.deepcopy(plain), batch)
    prompts = torch.randint(0, 8000, (batch, 32), generator=torch.Generator().manual_seed(1))
    best = {"plain": float("inf"), "packed": float("inf")}
    for model in (plain, packed):  # warm-up
        step_seconds(model, prompts.tolist(), 4)
    for _ in range(rounds):
        for label, model in (("plain", plain), ("packed", packed)):
            best[label] = min(best[label], step_seconds(model, prompts.tolist()))
    print(f"{name} step, batch {batch:2}: plain {best['plain'] * 1e3:.2f} ms, packed "
          f"{best['packed'] * 1e3:.2f} ms ({best['plain'] / best['packed']:.2f}x)", flush=True)


def print_memory(name: str, dtype: torch.dtype, hint: int) -> list:
    """Print what packing the model's matrices adds to the resident memory, measured before
    any timing (so that no freed memory is reused); return the packs, to be held until the
    other dtypes are measured."""
    matrices = [torch.randn(shape, dtype=dtype) for shape, number in zip(SHAPES, MODEL_COUNTS)
                for _ in range(number)]
    plain = sum(m.numel() * m.element_size() for m in matrices)
    before = rss_anon_bytes()
    packs = [PackedWeight(m, hint) for m in matrices]
    grown = rss_anon_bytes() - before
    print(f"{name}: the model's {len(packs)} matrices take {plain / 2**20:.1f} MiB plain; "
          f"packing them added {grown / 2**20:.1f} MiB resident ({grown / plain:.2f}x)",
          flush=True)
    return packs


if __name__ == "__main__":
    main()
