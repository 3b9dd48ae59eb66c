#!/usr/bin/env python3
"""What the router-health statistics cost a training step: steps with the statistics on and
off, interleaved in one run (at least 20 of each), and the expert-similarity pass apart.

    python benchmarks/router_health.py                     # the tiny preset, 24 steps each
    python benchmarks/router_health.py --preset tiny --steps 40 --batch-size 16 --seq-len 128

"On" is the default step (each MoE layer's entropy, max1/max2 and max2/max3 sums per forward,
summed over the micro-batches and read once with the step's figures); "off" sets every layer's
``collect_health`` to False, so that the layers skip those sums (the step's few bookkeeping
operations on them remain in both columns). The same batch is used for every step. The
similarity pass (``train.health.expert_similarities``) runs every ``similarity_every`` steps
(default 50), so its cost per step is its time divided by that. Target: statistics <= 5% of
the median step. Medians; machines are shared, so compare within one run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit.config import TrainConfig, preset
from moekit.devices import retain_freed_cpu_memory
from moekit.model import Transformer
from moekit.parallel.mesh import Mesh
from moekit.train.health import expert_similarities
from moekit.train.optim import build_optimizer
from moekit.train.step import moe_layers, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=24, help="steps of each kind (>= 20)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's); 1 on a contended machine")
    args = parser.parse_args()
    if args.steps < 20:
        parser.error(f"--steps {args.steps} is not allowed: at least 20 of each kind")
    retain_freed_cpu_memory(training=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_config = preset(args.preset)
    model = Transformer(model_config).train()
    config = TrainConfig(batch_size=args.batch_size, grad_accum=args.grad_accum,
                         seq_len=args.seq_len)
    optimizer = build_optimizer(model, config)
    tokens = torch.randint(0, model_config.vocab_size, (args.batch_size, args.seq_len + 1))
    layers = moe_layers(model)

    def step(collect: bool) -> float:
        for layer in layers:
            layer.collect_health = collect
        started = time.perf_counter()
        train_step(model, optimizer, tokens[:, :-1], tokens[:, 1:], config, Mesh())
        return time.perf_counter() - started

    step(True), step(False)  # warm-up
    times = {True: [], False: []}
    for pair in range(args.steps):  # on, off, then off, on: neither kind always goes first
        for collect in ((True, False) if pair % 2 == 0 else (False, True)):
            times[collect].append(step(collect))
    similarity = []
    for _ in range(20):
        started = time.perf_counter()
        expert_similarities(model)
        similarity.append(time.perf_counter() - started)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    spread = [statistics.median(times[flag][half::2]) for flag in (True, False) for half in (0, 1)]
    print(f"{args.preset}: {torch.get_num_threads()} threads, {len(layers)} MoE layers, E = {model_config.moe.num_experts}, "
          f"{args.batch_size} x {args.seq_len} tokens in {args.grad_accum} micro-batches, "
          f"{args.steps} steps each, interleaved")
    print(f"{'median step, stats on':>32}: {on * 1e3:8.1f} ms")
    print(f"{'median step, stats off':>32}: {off * 1e3:8.1f} ms")
    print(f"{'on / off':>32}: {on / off:8.3f}  (target <= 1.05)")
    print(f"{'halves of each column (ms)':>32}: on {spread[0] * 1e3:.1f} / {spread[1] * 1e3:.1f}, "
          f"off {spread[2] * 1e3:.1f} / {spread[3] * 1e3:.1f}")
    sim = statistics.median(similarity)
    print(f"{'similarity pass / median step':>32}: {sim / off:8.4f}  "
          f"({sim / off / 50:.5f} per step at similarity_every = 50)")


if __name__ == "__main__":
    main()
