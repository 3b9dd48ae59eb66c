#!/usr/bin/env python3
"""A few rows times a weight: x W^T (``F.linear``'s form) beside W x^T, per dtype, shape and
row count.

    python benchmarks/decode_products.py --threads 2
    python benchmarks/decode_products.py --threads 1 --rows 4 16 --dtypes bf16

Decoding a batch of sequences multiplies a few rows (one per sequence) by each weight. The
two forms compute the same product, the weight read in its own [out, in] layout either way:
x W^T as torch's ``F.linear`` does, with the weight the right operand, or (W x^T)^T, with the
weight the left one, which the mid-batch experts' path (``moekit.moe.experts.dense_expert_mlp``)
runs. For each shape of benchmarks/generate.py's model that decoding multiplies by a few rows
([E x 2F, D]: every expert's input projection as one matrix; [E, D, F]: the output
projections, one batched product; attention's [D, D]; the [V, D] head) this prints the
microseconds per product through both forms, the two taking turns in every round, and their
ratio (median of the rounds; above 1: W x^T is faster). Each form multiplies a pass over
``--megabytes`` of distinct weights of the shape, as a decoding step reads each weight once.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from row_products import seconds_per_weight

# (label, weight shape): the batched [E, D, F] multiplies E blocks of rows, one per expert.
SHAPES = [("experts in, stacked", (16384, 512)), ("experts out, batched", (8, 512, 1024)),
          ("q, o", (512, 512)), ("head", (8000, 512))]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--megabytes", type=int, default=64,
                        help="weights per pass (this machine's L2 holds 2 MiB per core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; microseconds per "
          f"product, median of {args.rounds} rounds")
    print(f"{'weight':>22} {'shape':>16} {'dtype':>5} {'rows':>4} {'x W^T':>8} {'W x^T':>8} "
          f"{'ratio':>6}")
    with torch.no_grad():
        for (label, shape), name, rows in ((s, d, r) for s in SHAPES for d in args.dtypes
                                           for r in args.rows):
            dtype = DTYPES[name]
            size = torch.Size(shape).numel() * dtype.itemsize
            weights = [torch.randn(shape).to(dtype)
                       for _ in range(max(2, args.megabytes * 2 ** 20 // size))]
            x = torch.randn(*shape[:-2], rows, shape[-1]).to(dtype)
            forms = {"x W^T": lambda w: x @ w.transpose(-1, -2),
                     "W x^T": lambda w: w @ x.transpose(-1, -2)}
            times = {form: [] for form in forms}
            for product in forms.values():  # warm-up
                seconds_per_weight(product, weights)
            for _ in range(args.rounds):
                for form, product in forms.items():
                    times[form].append(seconds_per_weight(product, weights))
            micro = {form: statistics.median(t) * 1e6 for form, t in times.items()}
            print(f"{label:>22} {'x'.join(map(str, shape)):>16} {name:>5} {rows:4d} "
                  f"{micro['x W^T']:8.1f} {micro['W x^T']:8.1f} "
                  f"{micro['x W^T'] / micro['W x^T']:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
