#!/usr/bin/env python3
"""The MoE layer at decoding sizes: the small-batch path (each route through its own
expert's weights) and the mid-batch path (every expert on every token) beside the grouped
path (sort, grouped matmul, un-permute), as ratios measured in one run. It sets
``moekit.moe.layer.SMALL_BATCH_ROUTES`` and the ``DENSE_BATCH_*`` limits (the dense path is
timed in float32 too, and from one route per expert, where the layer does not take it).

    python benchmarks/decode_moe.py                  # 1 to 64 tokens, fp32 and bf16
    python benchmarks/decode_moe.py --threads 1 --reps 300 --experts 64
    python benchmarks/decode_moe.py --threads 1 --hidden 128 --ffn 128   # the tiny preset's

The layer is by default the one of benchmarks/generate.py's model (H 512, F 1024, 8 experts
top-2; ``--hidden``, ``--ffn``), in
eval mode under inference_mode, weights N(0, 0.02). As in the model, ``--layers`` such layers
(4) run one after another, so that each layer's weights have left the caches by its next
call (one layer's 48 MB in fp32 stay in this CPU's L3 when called alone, and decoding then
looks faster than it is). Every pass has new tokens, so that the routes, and with them the
grouped path's rows per expert, change from pass to pass as they do from one decoding step to
the next (oneDNN prepares a bf16 product per shape). A figure is per layer, the median over
``--reps`` passes, the paths taking turns pass by pass. A path is shown only for the sizes it takes
(by route: at least one route; dense: routes reaching every expert).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit import MoEConfig, MoELayer
from moekit.moe import layer as moe_layer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (SMALL_BATCH_ROUTES, DENSE_BATCH_ROWS) that send a forward down each path.
EVERYTHING = 2**62
PATHS = {"grouped": (0, 0), "by route": (EVERYTHING, 0), "dense": (0, EVERYTHING)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024, help="each expert's inner size")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    top_k = 2
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, H {args.hidden}, "
          f"F {args.ffn}, {args.experts} experts top-2; median ms per forward, and each path's time over the grouped path's")
    print(f"{'dtype':5} {'tokens':>6} {'grouped':>8} " +
          " ".join(f"{p:>16}" for p in PATHS if p != "grouped"))
    saved = (moe_layer.SMALL_BATCH_ROUTES, moe_layer.DENSE_BATCH_ROWS,
             moe_layer.DENSE_BATCH_DTYPES, moe_layer.DENSE_BATCH_ROUTES_PER_EXPERT)
    for name, dtype in DTYPES.items():
        layers = [MoELayer(MoEConfig(hidden_size=args.hidden, ffn_size=args.ffn,
                                     num_experts=args.experts, top_k=top_k)).to(dtype).eval()
                  for _ in range(args.layers)]
        for layer in layers:
            layer.experts.reset_parameters(0.02)
        for tokens in args.tokens:
            inputs = [torch.randn(tokens, args.hidden, dtype=dtype) for _ in range(args.reps)]
            paths = [p for p in PATHS if p != "dense" or tokens * top_k >= args.experts]
            times = {path: [] for path in paths}
            with torch.inference_mode():
                for x_TD in inputs:
                    for path in paths:
                        moe_layer.SMALL_BATCH_ROUTES, moe_layer.DENSE_BATCH_ROWS = PATHS[path]
                        moe_layer.DENSE_BATCH_DTYPES = (dtype,)
                        moe_layer.DENSE_BATCH_ROUTES_PER_EXPERT = 1
                        start = time.perf_counter()
                        for layer in layers:
                            layer(x_TD)
                        times[path].append(time.perf_counter() - start)
            ms = {path: statistics.median(times[path]) * 1e3 / len(layers) for path in paths}
            cells = [f"{ms[p]:7.3f} ({ms[p] / ms['grouped']:4.2f}x)" if p in ms else "-"
                     for p in PATHS if p != "grouped"]
            print(f"{name:5} {tokens:6} {ms['grouped']:8.3f} " +
                  " ".join(f"{c:>16}" for c in cells), flush=True)
    (moe_layer.SMALL_BATCH_ROUTES, moe_layer.DENSE_BATCH_ROWS,
     moe_layer.DENSE_BATCH_DTYPES, moe_layer.DENSE_BATCH_ROUTES_PER_EXPERT) = saved


if __name__ == "__main__":
    main()
