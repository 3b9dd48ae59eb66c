#!/usr/bin/env python3
"""Where a decoding step's time goes: ``torch.profiler`` over moekit's step and transformers'
on the model of benchmarks/generate.py, the operators that took the most time first.

    python benchmarks/decode_profile.py --batch 16 --dtype fp32 --threads 1
    python benchmarks/decode_profile.py --batch 1 --dtype bf16 --compile

After a 32-token prompt, each engine decodes ``--steps`` greedy tokens (after 4 unprofiled
ones): moekit through its ``DecodeStep`` over the fixed-size cache (eager, or compiled with
``--compile``), transformers through its model's forward with a ``DynamicCache``, one token at a
time (what ``generate`` runs per step, without its logits processors). Each table is the
share of the profiled steps' CPU time per operator (self time: a grouped matmul's products
count under aten::mm), then the matrix products by shape: calls and milliseconds per step,
their rate in GFLOP/s and in GB/s of the right operand (the weight, read once per call), beside
the peak rate of a large product in the same dtype and thread count measured here.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from generate import DTYPES, hf_mixtral
from moekit.convert.hf import transformer_from_hf
from moekit.model.decode_step import DecodeStep, StaticDecodeCache, cache_length
from moekit.model.generate import prefill


def moekit_steps(model, prompts_BS: torch.Tensor, steps: int, step: DecodeStep):
    """A function decoding ``steps`` tokens after a fresh prefill."""
    prompt = prompts_BS.shape[1]

    def run(count: int = steps) -> None:
        logits_B1V, cache = prefill(model, prompts_BS.tolist(),
                                    cache_length(prompt + count + 1, model.config.max_seq_len))
        cache = StaticDecodeCache(cache, torch.full((len(prompts_BS),), prompt))
        next_B = logits_B1V[:, -1].argmax(-1)
        for _ in range(count):
            next_B = step(next_B[:, None], cache).argmax(-1)
    return run


def hf_steps(model, prompts_BS: torch.Tensor, steps: int):
    from transformers import DynamicCache

    def run(count: int = steps) -> None:
        cache = DynamicCache()
        out = model(prompts_BS, cache=cache, use_cache=True)
        next_B1 = out.logits[:, -1:].argmax(-1)
        for _ in range(count):
            next_B1 = model(next_B1, cache=cache, use_cache=True).logits.argmax(-1)
    return run


PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")


def peak_gflops(dtype: torch.dtype, size: int = 1024, reps: int = 20) -> float:
    """The rate of a large square product: what the cores reach when compute-bound."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size ** 3 * reps / (time.perf_counter() - start) / 1e9


def product_shapes(events, steps: int, itemsize: int) -> list[str]:
    """One line per matrix-product shape, the most time first: calls and ms per step (self
    time, the profiled run's prefill included), GFLOP/s, and GB/s of the right operand (the
weight, for x W^T)."""
    rows = []
    for event in events:
        shapes = event.input_shapes
        if event.key not in PRODUCTS or not shapes:
            continue
        left, right = (shapes[1], shapes[2]) if event.key == "aten::addmm" else shapes[:2]
        if len(left) < 2 or len(right) < 2:
            continue
        batch = left[0] if event.key == "aten::bmm" else 1
        m, k, n = left[-2], left[-1], right[-1]
        seconds = event.self_cpu_time_total / 1e6
        flops = 2 * batch * m * k * n * event.count
        weight_bytes = batch * k * n * itemsize * event.count
        rows.append((seconds, f"  {event.key:10} {batch:2d} x [{m:4d} x {k:4d}] x [{k:4d} x "
                     f"{n:5d}] {event.count / steps:6.1f}/step {seconds / steps * 1e3:7.3f} "
                     f"ms/step {flops / seconds / 1e9:7.1f} GFLOP/s "
                     f"{weight_bytes / seconds / 1e9:6.1f} GB/s"))
    return [line for _, line in sorted(rows, key=lambda row: -row[0])]


def profiled(label: str, run, steps: int, rows: int, itemsize: int) -> None:
    run(4)  # warm-up: first calls of a shape pay one-off costs
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    print(f"\n{label}: {seconds / steps * 1e3:.1f} ms per step (prefill included, unprofiled)")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"  {event.self_cpu_time_total / total:6.1%} {event.count // steps:5d}/step  "
              f"{event.key[:70]}")
    print("  matrix products by shape:")
    for line in product_shapes(prof.key_averages(group_by_input_shape=True), steps,
                               itemsize)[:rows]:
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=12, help="operators shown per engine")
    parser.add_argument("--compile", action="store_true", help="moekit's compiled step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf = hf_mixtral(8000, 4).to(DTYPES[args.dtype])
    ours = transformer_from_hf(hf).eval()
    prompts_BS = torch.randint(0, 8000, (args.batch, 32),
                               generator=torch.Generator().manual_seed(1))
    step = DecodeStep(ours, compile=args.compile)
    step.prepare(args.batch, 32 + args.steps + 1)
    dtype = DTYPES[args.dtype]
    print(f"batch {args.batch}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; peak of a 1024^3 product here: "
          f"{peak_gflops(dtype):.0f} GFLOP/s")
    itemsize = torch.finfo(dtype).bits // 8
    with torch.inference_mode():
        profiled("moekit" + (" --compile" if args.compile else ""),
                 moekit_steps(ours, prompts_BS, args.steps, step), args.steps, args.rows,
                 itemsize)
        profiled("transformers", hf_steps(hf, prompts_BS, args.steps), args.steps, args.rows,
                 itemsize)


if __name__ == "__main__":
    main()
