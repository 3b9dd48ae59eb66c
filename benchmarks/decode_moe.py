#!/usr/bin/env python3
"""The MoE layer at decoding sizes: the small-batch path (each route through its own
expert's weights) beside the grouped path (sort, grouped matmul, un-permute), as ratios
measured in one run. It sets ``moekit.moe.layer.SMALL_BATCH_ROUTES``.

    python benchmarks/decode_moe.py                  # 1 to 8 tokens, fp32 and bf16
    python benchmarks/decode_moe.py --threads 1 --reps 300

The layer is the one of benchmarks/generate.py's model (H 512, F 1024, 8 experts top-2), in
eval mode under inference_mode, weights N(0, 0.02); the paths take turns call by call and
each figure is the median of ``--reps`` calls.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit import MoEConfig, MoELayer
from moekit.moe import layer as moe_layer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; median ms per "
          "forward, and the small-batch path's time over the grouped path's")
    print(f"{'dtype':5} {'tokens':>6} {'routes':>6} {'grouped':>9} {'by route':>9} {'ratio':>6}")
    for name, dtype in DTYPES.items():
        layer = MoELayer(MoEConfig(hidden_size=512, ffn_size=1024, num_experts=8, top_k=2))
        layer.experts.reset_parameters(0.02)
        layer = layer.to(dtype).eval()
        for tokens in args.tokens:
            x_TD = torch.randn(tokens, 512, dtype=dtype)
            times = {"grouped": [], "by route": []}
            with torch.inference_mode():
                for _ in range(args.reps):
                    for path, limit in (("grouped", 0), ("by route", 2 * tokens)):
                        moe_layer.SMALL_BATCH_ROUTES = limit
                        start = time.perf_counter()
                        layer(x_TD)
                        times[path].append(time.perf_counter() - start)
            grouped, by_route = (statistics.median(times[p]) * 1e3 for p in times)
            print(f"{name:5} {tokens:6} {2 * tokens:6} {grouped:9.3f} {by_route:9.3f} "
                  f"{by_route / grouped:6.2f}", flush=True)


if __name__ == "__main__":
    main()
