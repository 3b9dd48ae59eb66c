#!/usr/bin/env python3
"""What decoding's weight reads cost on this machine, in one run:

1. the expert GEMMs of a decoding step (4 layers x 8 experts, H 512, F 1024, 4 rows per
   expert, as batch 16 top-2 gives) with weights input-major [E, D, 2F] in memory and
   output-major [E, 2F, D] (transformers' and moekit's), fp32 and bf16;
2. converting 2M quantized weights to bf16: int8, e4m3 by torch, e4m3 by moekit's table.

    python benchmarks/weight_formats.py --reps 20

Medians of --reps; the variants take turns.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moekit.quant.weights import convert

LAYERS, EXPERTS, HIDDEN, FFN, ROWS = 4, 8, 512, 1024, 4


def expert_gemms(dtype, output_major: bool):
    """A function running one decoding step's expert GEMMs in the given layout."""
    def weights(inputs, outputs):
        w = torch.randn(EXPERTS, outputs, inputs, dtype=dtype)
        return w.transpose(1, 2) if output_major else w.transpose(1, 2).contiguous()
    layers = [(weights(HIDDEN, 2 * FFN), weights(FFN, HIDDEN)) for _ in range(LAYERS)]
    x = torch.randn(EXPERTS * ROWS, HIDDEN, dtype=dtype)
    h = torch.randn(EXPERTS * ROWS, FFN, dtype=dtype)
    offsets = torch.arange(ROWS, EXPERTS * ROWS + 1, ROWS, dtype=torch.int32)

    def step():
        for gate_up, down in layers:
            F.grouped_mm(x, gate_up, offs=offsets)
            F.grouped_mm(h, down, offs=offsets)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quantized = (torch.randn(2, HIDDEN, 2 * FFN) * 10).clamp(-100, 100)
    as_int8, as_e4m3 = quantized.to(torch.int8), quantized.to(torch.float8_e4m3fn)
    cases = {f"expert GEMMs {name}, {layout}": expert_gemms(dtype, layout == "output-major")
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
             for layout in ("input-major", "output-major")}
    cases |= {"int8 -> bf16": lambda: as_int8.to(torch.bfloat16),
              "e4m3 -> bf16, torch": lambda: as_e4m3.to(torch.bfloat16),
              "e4m3 -> bf16, table": lambda: convert(as_e4m3, torch.bfloat16)}
    times = {name: [] for name in cases}
    for run in cases.values():
        run()
    for _ in range(args.reps):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    for name, samples in times.items():
        print(f"{name:36} {statistics.median(samples) * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
