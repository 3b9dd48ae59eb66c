#!/usr/bin/env python3
"""BASE layers' exact balanced assignment (moekit.moe.balanced_assignment) beside scipy's
linear_sum_assignment on the same problem written as a square assignment, and a training
forward+backward of a "base" layer beside the same layer with a plain top-1 ("switch") gate, in
one run; both solvers are checked to agree first.

    python benchmarks/balanced_assignment.py
    python benchmarks/balanced_assignment.py --reps 7

Scores are N(0, 1) with 3 added to expert 0, so that most tokens prefer one expert and the
solver has to move most of them (an untrained router's case); the layers see N(0, 1) inputs
(D = 256, F = 512). Medians after one warm-up; compare within one run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from moekit import MoEConfig, MoELayer
from moekit.moe import balanced_assignment

SHAPES = ((2048, 8), (512, 64), (2048, 64))  # (tokens, experts)


def square_problem(scores_TE: np.ndarray) -> np.ndarray:
    """The balanced problem as a square cost matrix: floor(T/E) slots per expert plus one more,
    which E - T mod E phantom tokens may alone take when they are not used."""
    num_tokens, num_experts = scores_TE.shape
    share, extras = divmod(num_tokens, num_experts)
    slots = share + 1
    cost = np.zeros((num_tokens + num_experts - extras, num_experts * slots))
    cost[:num_tokens] = np.repeat(-scores_TE, slots, axis=1)
    cost[num_tokens:] = 1e12
    cost[num_tokens:, slots - 1::slots] = 0.0
    return cost


def scipy_assignment(scores_TE: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment
    num_tokens, num_experts = scores_TE.shape
    rows, columns = linear_sum_assignment(square_problem(scores_TE))
    experts = np.empty(num_tokens, dtype=np.int64)
    real = rows < num_tokens
    experts[rows[real]] = columns[real] // (num_tokens // num_experts + 1)
    return experts


def median_seconds(run, reps: int) -> float:
    run()  # warm-up: first calls of a shape allocate and pick kernels
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'T x E':>10} {'moekit s':>9} {'scipy s':>8} {'scipy/moekit':>12} "
          f"{'base/switch layer':>16}")
    for num_tokens, num_experts in SHAPES:
        scores = torch.randn(num_tokens, num_experts, dtype=torch.float64)
        scores[:, 0] += 3
        if not np.array_equal(balanced_assignment(scores).numpy(), scipy_assignment(scores.numpy())):
            raise SystemExit(f"{num_tokens} x {num_experts}: the solvers disagree")
        ours = median_seconds(lambda: balanced_assignment(scores), args.reps)
        theirs = median_seconds(lambda: scipy_assignment(scores.numpy()), args.reps)
        layer_times = {}
        for router in ("base", "switch"):
            layer = MoELayer(MoEConfig(hidden_size=256, ffn_size=512, num_experts=num_experts,
                                       top_k=1, router=router, aux_loss="none"))
            x = torch.randn(num_tokens, 256)
            layer_times[router] = median_seconds(lambda: layer(x)[0].sum().backward(), args.reps)
        print(f"{num_tokens:>5} x {num_experts:<3} {ours:9.3f} {theirs:8.3f} {theirs / ours:12.2f} "
              f"{layer_times['base'] / layer_times['switch']:16.2f}")


if __name__ == "__main__":
    main()
