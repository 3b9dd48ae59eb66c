#!/usr/bin/env python3
"""What the expert matmuls cost beside the dense floor's, pass by pass, and how much of it is
the weights streaming from memory. All in one run, as ratios to the floor's matmuls.

    python benchmarks/expert_gemms.py                  # E=64, k=2, F=1024, H=512, T=4096, fp32
    python benchmarks/expert_gemms.py --experts 8

Each pass (forward, input gradient, weight gradient) is timed four ways, taking turns within
every repetition (medians):
- floor: the dense floor's three matmuls (SwiGLU of width k * F over the T tokens);
- grouped: the layer's two grouped matmuls over the T * k routed rows (balanced experts, or
  with --random-counts new random counts at every call);
- per expert: the same products issued one expert at a time (torch.mm), distinct weights;
- per expert, cached: the same calls, every expert using expert 0's weight (and, for the
  weight gradient, writing into one buffer), so that no weight streams from memory.
"per expert" against "cached" is what the E distinct weights cost; "cached" against the floor
is what the small row blocks cost.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moekit.devices import retain_freed_cpu_memory

PASSES = ("forward", "input gradient", "weight gradient")


def floor_products(tokens, hidden, width):
    """The floor's matmuls per pass: (a, b) pairs whose products it computes."""
    x, w1, w3 = torch.randn(tokens, hidden), torch.randn(hidden, width), torch.randn(hidden, width)
    act, w2 = torch.randn(tokens, width), torch.randn(width, hidden)
    grad_h, grad_y = torch.randn(tokens, width), torch.randn(tokens, hidden)
    # Weights live as nn.Linear stores them ([out, in]): the forward multiplies by their transpose.
    w1, w3, w2 = (w.t().contiguous().t() for w in (w1, w3, w2))
    return {
        "forward": [(x, w1), (x, w3), (act, w2)],
        "input gradient": [(grad_h, w1.t()), (grad_h, w3.t()), (grad_y, w2.t())],
        "weight gradient": [(x.t(), grad_h), (x.t(), grad_h), (act.t(), grad_y)],
    }


def expert_operands(rows, experts, hidden, ffn):
    """Operands of the two expert projections (gate+up fused [E, H, 2F], down [E, F, H]), the
    weights held output-major in memory as GroupedExperts holds them."""
    return {"x": torch.randn(rows, hidden), "act": torch.randn(rows, ffn),
            "grad_h": torch.randn(rows, 2 * ffn), "grad_y": torch.randn(rows, hidden),
            "gate_up": torch.randn(experts, 2 * ffn, hidden).transpose(1, 2) * 0.02,
            "down": torch.randn(experts, hidden, ffn).transpose(1, 2) * 0.02}


def grouped_pass(ops, offsets):
    """The layer's grouped matmuls per pass; ``offsets()`` gives each call's row offsets."""
    def run(*products):
        def both():
            offs = offsets()
            return [F.grouped_mm(a, b, offs=offs) for a, b in products]
        return both

    return {
        "forward": run((ops["x"], ops["gate_up"]), (ops["act"], ops["down"])),
        "input gradient": run((ops["grad_h"], ops["gate_up"].transpose(1, 2)),
                              (ops["grad_y"], ops["down"].transpose(1, 2))),
        "weight gradient": run((ops["x"].t(), ops["grad_h"]), (ops["act"].t(), ops["grad_y"])),
    }


def random_offsets(rows, experts, generator):
    """Offsets of rows spread over the experts at random, new at every call (as in training)."""
    def draw():
        ids = torch.randint(experts, (rows,), generator=generator)
        return torch.bincount(ids, minlength=experts).cumsum(0).to(torch.int32)
    return draw


def per_expert_pass(ops, experts, rows_each, cached):
    """The same products one expert at a time; cached: every expert reuses expert 0's weight
    (weight gradient: one output buffer), so only the row blocks move through memory."""
    weight = (lambda name, e: ops[name][0]) if cached else (lambda name, e: ops[name][e])
    grads = {name: torch.empty_like(ops[name][:1] if cached else ops[name])
             for name in ("gate_up", "down")}

    def grad_out(name, e):
        return grads[name][0] if cached else grads[name][e]

    def rows(name, e):
        return ops[name][e * rows_each:(e + 1) * rows_each]

    def run(products):
        def each_expert():
            for e in range(experts):
                for product in products:
                    product(e)
        return each_expert

    return {
        "forward": run([lambda e: rows("x", e) @ weight("gate_up", e),
                        lambda e: rows("act", e) @ weight("down", e)]),
        "input gradient": run([lambda e: rows("grad_h", e) @ weight("gate_up", e).t(),
                               lambda e: rows("grad_y", e) @ weight("down", e).t()]),
        "weight gradient": run([
            lambda e: torch.mm(rows("x", e).t(), rows("grad_h", e), out=grad_out("gate_up", e)),
            lambda e: torch.mm(rows("act", e).t(), rows("grad_y", e), out=grad_out("down", e))]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--random-counts", action="store_true",
                        help="grouped: a new random number of rows per expert at every call, as "
                        "routing gives in training (default: balanced, the same every call)")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="keep glibc's allocator settings (by default freed memory is reused, "
                        "as in moe_layer.py: moekit.devices.retain_freed_cpu_memory)")
    args = parser.parse_args()
    routed = args.tokens * args.top_k
    if routed % args.experts:
        parser.error(f"tokens * top_k = {routed} must divide evenly over {args.experts} experts")
    if not args.malloc_defaults:
        retain_freed_cpu_memory()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    rows_each = routed // args.experts
    floor = floor_products(args.tokens, args.hidden, args.top_k * args.ffn)
    ops = expert_operands(routed, args.experts, args.hidden, args.ffn)
    balanced = torch.full((args.experts,), rows_each).cumsum(0).to(torch.int32)
    offsets = (random_offsets(routed, args.experts, torch.Generator().manual_seed(0))
               if args.random_counts else lambda: balanced)
    ways = {
        "floor": {p: (lambda pairs=floor[p]: [a @ b for a, b in pairs]) for p in PASSES},
        "grouped": grouped_pass(ops, offsets),
        "per expert": per_expert_pass(ops, args.experts, rows_each, cached=False),
        "per expert, cached": per_expert_pass(ops, args.experts, rows_each, cached=True),
    }
    times = {(way, p): [] for way in ways for p in PASSES}
    for rep in range(args.reps + 1):
        for p in PASSES:
            for way, passes in ways.items():
                start = time.perf_counter()
                passes[p]()
                if rep:  # the first round warms up
                    times[way, p].append(time.perf_counter() - start)
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"E={args.experts} k={args.top_k} H={args.hidden} F={args.ffn} T={args.tokens} {args.dtype} "
          f"torch {torch.__version__} threads {torch.get_num_threads()}: "
          f"{rows_each} rows per expert; ratio to the floor's matmuls (median s)")
    print(f"{'':20s}" + "".join(f"{p:>22s}" for p in (*PASSES, "all three")))
    for way in ways:
        total = sum(median[way, p] for p in PASSES)
        floor_total = sum(median["floor", p] for p in PASSES)
        cells = [f"{median[way, p] / median['floor', p]:.2f} ({median[way, p]:.3f})"
                 for p in PASSES] + [f"{total / floor_total:.2f} ({total:.3f})"]
        print(f"{way:20s}" + "".join(f"{cell:>22s}" for cell in cells))


if __name__ == "__main__":
    main()
