#!/usr/bin/env python3
"""One row times a weight: ``torch.mv`` (W x) beside ``F.linear`` (x W^T), per dtype and shape.

    python benchmarks/row_products.py                 # 1 thread, the decoding benchmark's shapes
    python benchmarks/row_products.py --threads 2 --rounds 9
    python benchmarks/row_products.py --compiled      # and both forms compiled (inductor)

Decoding one sequence multiplies one row by each weight, so a product's time is its weight's
bytes over the rate it reads them. ``moekit.moe.row_products`` sends one-row bf16 products to
``torch.mv``; this script measures why, on the CPU it runs on: for each weight shape of
benchmarks/generate.py's model ([2F, D] and [D, F] experts, attention's [D, D] and [G*Dh, D],
the [V, D] head) and each dtype, the weight's GB/s through both forms, the two taking turns in
every round, and their ratio (median of the rounds; above 1: ``mv`` is faster). With
``--compiled``, two columns more: ``F.linear`` compiled by inductor, and the multiply-and-sum
(W * x).sum(-1) that moekit's compiled decoding step runs for a bf16 row, compiled. Each form
multiplies a pass over ``--megabytes`` of distinct weights of the shape, as a decoding step
reads each weight once: one weight timed again and again would stay in the core's cache.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(2048, 512), (512, 1024), (512, 512), (128, 512), (8000, 512)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seconds_per_weight(product, weights) -> float:
    start = time.perf_counter()
    for weight in weights:
        product(weight)
    return (time.perf_counter() - start) / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--megabytes", type=int, default=64,
                        help="weights per pass (this machine's L2 holds 2 MiB per core)")
    parser.add_argument("--compiled", action="store_true",
                        help="also time both forms compiled (inductor; seconds per shape)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; weight GB/s, median "
          f"of {args.rounds} rounds")
    compiled = ["compiled linear", "compiled sum"] if args.compiled else []
    print(f"{'weight':>12} {'dtype':>5} {'F.linear':>9} {'torch.mv':>9} {'mv / linear':>12}"
          + "".join(f" {name:>16}" for name in compiled))
    with torch.no_grad():
        for (rows, columns), (name, dtype) in ((s, d) for s in SHAPES for d in DTYPES.items()):
            size = rows * columns * dtype.itemsize
            weights = [torch.randn(rows, columns).to(dtype)
                       for _ in range(max(2, args.megabytes * 2 ** 20 // size))]
            x = torch.randn(1, columns).to(dtype)
            forms = {"linear": lambda w: F.linear(x, w), "mv": lambda w: torch.mv(w, x[0])}
            if args.compiled:
                forms["compiled linear"] = torch.compile(lambda w: F.linear(x, w))
                forms["compiled sum"] = torch.compile(lambda w: (w * x).sum(-1))
            times = {form: [] for form in forms}
            for form, product in forms.items():  # warm-up
                seconds_per_weight(product, weights)
            for _ in range(args.rounds):
                for form, product in forms.items():
                    times[form].append(seconds_per_weight(product, weights))
            rate = {form: size / statistics.median(t) / 1e9 for form, t in times.items()}
            print(f"{rows:>5} x {columns:<4} {name:>5} {rate['linear']:9.1f} {rate['mv']:9.1f} "
                  f"{rate['mv'] / rate['linear']:11.2f}x"
                  + "".join(f" {rate[name]:16.1f}" for name in compiled))


if __name__ == "__main__":
    main()
