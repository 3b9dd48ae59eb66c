#!/usr/bin/env python3
"""Training-step time of each parallel layout, side by side, and the bytes each moves.

    python benchmarks/parallel.py                  # tiny preset, 2 processes, 3 rounds
    python benchmarks/parallel.py --rounds 5 --steps 8
    python benchmarks/parallel.py --pipeline-split  # Skywork's split against the even one

Columns (real gloo processes, forked; each process 1 thread unless said):
  1 proc x 1 thread   the reference for data parallelism's speed-up
  1 proc x 2 threads  the same cores used by one process (no target)
  DP 2                data parallel, 2 processes
  DP 2, no all-reduce the same without the gradient all-reduce: the most DP can give here
  EP 2                expert parallel, 2 processes (each holds half of every layer's experts)
With --pipeline-split, the columns are instead two pipelines of 2 stages (1 thread each) on
the tiny preset at 8 layers and a vocabulary of 8,192, over 8 micro-batches (1F1B): the even
split (4 + 4 layers) and ``moekit.plan.plan_stages``' split, whose last stage, which also
computes the output projection and the loss, holds fewer layers: planned from FLOPs, and (a
third column where it differs) from times measured here first, a layer's and the rest's.
The columns take turns within each round (one column after another gave figures that depend
on the order on these machines); figures are medians over rounds of the mean step time of
``--steps`` steps after one warm-up step. Bytes per step and rank: what the all-to-alls send
to other ranks (counted at the call), and the gradient bytes DDP all-reduces (its payload;
a ring moves about 2 (R - 1) / R of it each way). "In all-to-all ms": the seconds per step
spent inside the all-to-all calls, on the rank that spent the least and the most; "waiting
ms" the part of them the most waiting rank spent before the other rank arrived (its calls'
start against the other's, on one clock), "together ms" the part with both ranks inside (the
transfers). The simulator's predictions follow, fed the matmul rate, row-gather rate and
gloo bandwidths (an all-reduce's, and an all-to-all's with EP 2's message size, each call
after a burst of compute as in a step) measured here and EP 2's routing loads (per layer, the rows the busiest rank computed over the mean).
Targets (issue "Distributed training with torchrun"): DP 2 >= 1.7x one process of 1 thread
in tokens/s; EP step time <= 1.2x DP's; all-to-all bytes = rows sent to other ranks x D x
bytes per number; the planned split >= 1.10x the even split's tokens/s.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import time
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.distributed as dist

from moekit.config import TrainConfig, preset
from moekit.devices import retain_freed_cpu_memory
from moekit.model import Transformer
from moekit.parallel.expert_parallel import expert_parameters
from moekit.parallel.mesh import world_mesh
from moekit.parallel.parallelize import parallelize
from moekit.parallel.processes import run_on_ranks
from moekit.plan import Layout
from moekit.plan.pipeline import plan_stages
from moekit.plan.simulate import Link, Machine, simulate_step
from moekit.train.optim import build_optimizer
from moekit.train.step import train_step


class Column(NamedTuple):
    processes: int
    threads: int  # per process
    expert: int = 1  # expert-parallel degree
    stages: tuple[int, ...] | None = None  # layers per pipeline stage
    reduce_gradients: bool = True


COLUMNS = {
    "1 proc x 1 thread": Column(1, 1),
    "1 proc x 2 threads": Column(1, 2),
    "DP 2": Column(2, 1),
    # DP's ceiling on these cores: every rank's own work and every other collective, the
    # gradient all-reduce skipped (DDP's no_sync); not a training run (the ranks drift apart).
    "DP 2, no all-reduce": Column(2, 1, reduce_gradients=False),
    "EP 2": Column(2, 1, expert=2),
}


class AllToAllCounter:
    """Counts what ``dist.all_to_all_single`` sends to other ranks, at the call, and when each
    call began and ended (``time.perf_counter``: the same clock in every process here)."""

    def __init__(self):
        self.sent = 0
        self.calls: list[tuple[float, float]] = []
        self._original = dist.all_to_all_single

    def __enter__(self):
        def counting(output, input, output_split_sizes=None, input_split_sizes=None,
                     group=None, **options):
            peers, me = dist.get_world_size(group), dist.get_rank(group)
            splits = input_split_sizes or [len(input) // peers] * peers
            row_bytes = input[0].numel() * input.element_size() if len(input) else 0
            self.sent += row_bytes * sum(rows for peer, rows in enumerate(splits) if peer != me)
            started = time.perf_counter()
            result = self._original(output, input, output_split_sizes, input_split_sizes,
                                    group=group, **options)
            self.calls.append((started, time.perf_counter()))
            return result
        dist.all_to_all_single = counting
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._original


def split_exchange_time(calls_per_rank: list[list[tuple[float, float]]]) -> dict:
    """The seconds every rank spent inside its all-to-all calls (the i-th call of each rank
    is the same exchange), split into the wait for the last rank to arrive (the wait of the
    rank that waited most) and the time with every rank inside (the transfer)."""
    waits = [0.0] * len(calls_per_rank)
    together = 0.0
    for same_call in zip(*calls_per_rank):
        last_arrival = max(start for start, _ in same_call)
        for rank, (start, _) in enumerate(same_call):
            waits[rank] += last_arrival - start
        together += max(max(end for _, end in same_call) - last_arrival, 0.0)
    return {"inside": [sum(end - start for start, end in calls) for calls in calls_per_rank],
            "waits": waits, "together": together}


def _column(rank, world, threads, expert, stages, reduce_gradients, config, steps,
            profile_to=None):
    torch.set_num_threads(threads)
    retain_freed_cpu_memory(training=True)  # as `moekit train` runs
    torch.manual_seed(0)
    mesh = world_mesh(expert=expert, pipeline=len(stages) if stages else 1, stage_layers=stages)
    model = Transformer(config["model"]).train()
    parallel_model = parallelize(model, mesh)
    optimizer = build_optimizer(model, config["train"])
    sharded = {id(p) for _, p in expert_parameters(model)}
    reduced_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                        if id(p) not in sharded) if world > 1 and reduce_gradients else 0
    tokens = torch.randint(0, config["model"].vocab_size,
                           (steps + 1, config["train"].batch_size, config["train"].seq_len + 1),
                           generator=torch.Generator().manual_seed(1))
    times, loads = [], []
    # With --profile: torch.profiler over the timed steps, each rank's table to a file.
    profiler = torch.profiler.profile() if profile_to else None
    with AllToAllCounter() as counter:
        for step in range(steps + 1):
            started = time.perf_counter()
            with contextlib.nullcontext() if reduce_gradients else parallel_model.no_sync():
                record = train_step(parallel_model, optimizer, tokens[step, :, :-1],
                                    tokens[step, :, 1:], config["train"], mesh)
            times.append(time.perf_counter() - started)
            loads.append(busiest_rank_loads(record["tokens_per_expert"], expert))
            if step == 0:
                counter.sent, counter.calls = 0, []  # the warm-up step is not counted
                if profiler is not None:
                    profiler.start()
    if profiler is not None:
        profiler.stop()
        with open(f"{profile_to}.rank{rank}.txt", "w") as table:
            table.write(profiler.key_averages().table(sort_by="self_cpu_time_total",
                                                      row_limit=40))
    return {"step_s": statistics.mean(times[1:]), "all_to_all_bytes": counter.sent / steps,
            "all_to_all_calls": counter.calls,
            "all_reduce_bytes": reduced_bytes,
            "expert_load": [statistics.mean(layer) for layer in zip(*loads[1:])]}


def busiest_rank_loads(tokens_per_expert: list[list[int]], ranks: int) -> list[float]:
    """Per MoE layer, the rows the busiest of ``ranks`` expert-parallel ranks computes (its
    block of consecutive experts) over the ranks' mean: the simulator's ``expert_load``."""
    loads = []
    for counts in tokens_per_expert:
        per_rank = torch.tensor(counts, dtype=torch.float64).view(ranks, -1).sum(1)
        loads.append(float(per_rank.max() / per_rank.mean()) if per_rank.sum() else 1.0)
    return loads


def _median_ms(runs: list[dict], key: str) -> float:
    return 1e3 * statistics.median(r[key] for r in runs)


def _matmul_rate(threads: int = 1, size: int = 1024, reps: int = 20) -> float:
    """This machine's fp32 matmul FLOP/s on ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size ** 3 * reps / (time.perf_counter() - started)


def _copy_rate(rows: int = 2048, tokens: int = 1024, width: int = 128, reps: int = 50) -> float:
    """Bytes per second a row gather reads and writes on one thread (the dispatch's copies:
    ``rows`` fp32 rows of ``width`` picked from ``tokens``, as a permutation does)."""
    torch.set_num_threads(1)
    x = torch.randn(tokens, width)
    index = torch.randint(0, tokens, (rows,), generator=torch.Generator().manual_seed(3))
    x.index_select(0, index)
    started = time.perf_counter()
    for _ in range(reps):
        x.index_select(0, index)
    return 2 * rows * width * 4 * reps / (time.perf_counter() - started)


def _gloo_bandwidth(rank, world, nbytes=8 << 20, reps=10):
    """Seconds per byte of a 2-rank all-reduce of ``nbytes`` (ring: each rank sends half of it
    twice), and per message, from a large and a tiny one."""
    torch.set_num_threads(1)
    big, tiny = torch.zeros(nbytes // 4), torch.zeros(1)
    for tensor in (big, tiny):
        dist.all_reduce(tensor)
    timings = []
    for tensor in (big, tiny):
        started = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(tensor)
        timings.append((time.perf_counter() - started) / reps)
    latency = timings[1] / 2  # a 2-rank ring all-reduce is 2 messages
    return {"bandwidth": nbytes / max(timings[0] - 2 * latency, 1e-9), "latency": latency}


LAYOUTS = {"1 proc x 1 thread": Layout(), "DP 2": Layout(data=2),
           "EP 2": Layout(data=2, expert=2)}


def _gloo_all_to_all_calls(rank, world, rows_per_peer, width, reps=30):
    """gloo's all-to-all with the dispatcher's messages (``rows_per_peer`` fp32 rows of
    ``width`` to each peer) and with one row, each call after a burst of compute as in a step
    (back to back they ran faster than a step's): every call's start and end."""
    torch.set_num_threads(1)
    burst = torch.randn(256, 256)
    calls = {}
    for rows in (rows_per_peer, 1):
        calls[rows] = []
        for _ in range(reps + 1):
            for _ in range(10):  # about 2 ms of matmuls, between two exchanges of a step
                burst @ burst
            x = torch.randn(rows * world, width)
            out = torch.empty_like(x)
            started = time.perf_counter()
            dist.all_to_all_single(out, x)
            calls[rows].append((started, time.perf_counter()))
        calls[rows] = calls[rows][1:]  # the first call sets the exchange up
    return calls


def _all_to_all_link(rows_per_peer: int, width: int) -> Link:
    """The link of the dispatcher's all-to-all on 2 processes, from the time per call with
    both ranks inside (their waits for each other left out): the one-row calls' median as the
    latency (their mean swings with a few slow calls), and the dispatcher-size calls' mean,
    slow calls and all, less that latency, over the bytes sent to the other rank."""
    outcome = run_on_ranks(_gloo_all_to_all_calls, 2, rows_per_peer, width)

    def together(rows: int) -> list[float]:
        return [split_exchange_time([[rank[rows][call]] for rank in outcome])["together"]
                for call in range(len(outcome[0][rows]))]

    latency = statistics.median(together(1))
    sent = rows_per_peer * width * 4
    return Link(bandwidth=sent / max(statistics.mean(together(rows_per_peer)) - latency, 1e-9),
                latency=latency)


def _predictions(config, args, machine: Machine, expert_load: list[float]) -> dict:
    return {name: simulate_step(config["model"], layout, machine, args.batch_size // layout.data,
                                args.seq_len, 1, bytes_per_number=4,
                                expert_load=expert_load if layout.expert > 1 else 1.0)
            for name, layout in LAYOUTS.items()}


def _cpu() -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if "Model name" in line), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per column and round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--profile", metavar="FOLDER",
                        help="afterwards, run DP 2 and EP 2 once more under torch.profiler and "
                        "write each rank's table of operators (self CPU time) to FOLDER")
    parser.add_argument("--pipeline-split", action="store_true",
                        help="compare the planned pipeline split with the even one instead")
    args = parser.parse_args()
    model_config = preset("tiny")
    model_config = replace(model_config, moe=replace(model_config.moe, capacity_factor=None))
    columns, accumulation = COLUMNS, 1
    if args.pipeline_split:
        model_config = replace(model_config, num_layers=8, vocab_size=8192)
        accumulation = 8
        planned = plan_stages(model_config, 2, args.seq_len).stage_layers
        layer_s, head_s = _measured_costs(model_config, args.batch_size // accumulation,
                                          args.seq_len)
        timed = plan_stages(model_config, 2, args.seq_len, layer_times=[layer_s] * 8,
                            head_time=head_s).stage_layers
        print(f"timed on 1 thread, forward + backward of a micro-batch: a layer {layer_s * 1e3:.1f}"
              f" ms, the rest (embedding, output projection, loss) {head_s * 1e3:.1f} ms "
              f"({head_s / layer_s:.1f} layers)")
        columns = {"PP 2 even (4 + 4)": Column(2, 1, stages=(4, 4)),
                   f"PP 2 planned ({planned[0]} + {planned[1]})": Column(2, 1, stages=planned)}
        if timed not in (planned, (4, 4)):
            columns[f"PP 2 timed ({timed[0]} + {timed[1]})"] = Column(2, 1, stages=timed)
    config = {"model": model_config,
              "train": TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len,
                                   grad_accum=accumulation, lb_scope="global")}
    print(f"CPU: {_cpu()}; load before: {os.getloadavg()[0]:.2f}; torch {torch.__version__}; "
          f"tiny preset{' at 8 layers, vocabulary 8192' if args.pipeline_split else ''}, "
          f"dropless, batch {args.batch_size} x {args.seq_len} in {accumulation} "
          f"micro-batch(es), fp32")
    results = {name: [] for name in columns}
    for _ in range(args.rounds):
        for name, column in columns.items():
            outcome = run_on_ranks(_column, *column, config, args.steps, timeout=600)
            exchange = split_exchange_time([rank["all_to_all_calls"] for rank in outcome])
            results[name].append({
                **{key: max(rank[key] for rank in outcome) for key in ("step_s",
                   "all_to_all_bytes", "all_reduce_bytes")},
                "expert_load": outcome[0]["expert_load"],
                **{key: value / args.steps for key, value in (
                    ("all_to_all_s_least", min(exchange["inside"], default=0.0)),
                    ("all_to_all_s", max(exchange["inside"], default=0.0)),
                    ("wait_s", max(exchange["waits"], default=0.0)),
                    ("together_s", exchange["together"]))}})
    tokens = args.batch_size * args.seq_len
    if args.pipeline_split:
        _print_split(results, tokens)
        return
    base = statistics.median(r["step_s"] for r in results["1 proc x 1 thread"])
    dp = statistics.median(r["step_s"] for r in results["DP 2"])
    print(f"{'column':20} {'step s (median)':>16} {'tokens/s':>10} {'vs 1x1':>7} {'vs DP':>6} "
          f"{'all-to-all B':>13} {'all-reduce B':>13} {'in all-to-all ms':>17} "
          f"{'waiting ms':>10} {'together ms':>11}")
    for name, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        spread = f"[{min(r['step_s'] for r in runs):.3f}-{max(r['step_s'] for r in runs):.3f}]"
        print(f"{name:20} {step:7.3f} {spread:>8} {tokens / step:10.0f} {base / step:7.2f} "
              f"{step / dp:6.2f} {runs[0]['all_to_all_bytes']:13.0f} "
              f"{runs[0]['all_reduce_bytes']:13.0f} "
              f"{_median_ms(runs, 'all_to_all_s_least'):>8.1f}-{_median_ms(runs, 'all_to_all_s'):<8.1f}"
              f" {_median_ms(runs, 'wait_s'):10.1f} {_median_ms(runs, 'together_s'):11.1f}")
    # The simulator (moekit/plan/simulate.py), fed this machine's measured matmul rate, row
    # gather rate and gloo bandwidth, and the EP column's measured routing loads; its compute
    # efficiency is the one the 1-process column shows once its dispatch copies are taken
    # out, so the other columns are predictions.
    rate, copy_rate = _matmul_rate(), _copy_rate()
    link = Link(**run_on_ranks(_gloo_bandwidth, 2)[0])
    # EP 2's messages: each rank's tokens' routes, half of them to the other rank.
    rows_per_peer = args.batch_size // 2 * args.seq_len * model_config.moe.top_k // 2
    exchange = _all_to_all_link(rows_per_peer, model_config.hidden_size)
    machine = Machine(flops=rate, efficiency=1.0, devices_per_node=8, inside_node=link,
                      between_nodes=link, copy_bandwidth=copy_rate, all_to_all=exchange)
    expert_load = results["EP 2"][0]["expert_load"]  # the same routing in every round
    at_peak = _predictions(config, args, machine, expert_load)["1 proc x 1 thread"]
    efficiency = min(at_peak.compute / (base - at_peak.dispatch), 1.0)
    predicted = _predictions(config, args, replace(machine, efficiency=efficiency), expert_load)
    print(f"simulator: matmul {rate / 1e9:.1f} GFLOP/s on 1 thread, model FLOPs at "
          f"{efficiency:.1%} of it (from the 1-process column), row gathers "
          f"{copy_rate / 1e9:.1f} GB/s, gloo {link.bandwidth / 1e9:.2f} GB/s + "
          f"{link.latency * 1e6:.0f} us per message (all-reduce), {exchange.bandwidth / 1e9:.2f}"
          f" GB/s + {exchange.latency * 1e6:.0f} us (all-to-all of {rows_per_peer} rows a peer);"
          f" EP 2's busiest rank computes "
          f"{', '.join(f'{load:.2f}' for load in expert_load)}x the mean rows (per layer)")
    for name, step in predicted.items():
        measured = statistics.median(r["step_s"] for r in results[name])
        print(f"  {name:20} predicted {step.step:.3f} s (dispatch copies "
              f"{step.dispatch * 1e3:.1f} ms, imbalance {step.imbalance * 1e3:.1f} ms), "
              f"measured {measured:.3f} s ({step.step / measured - 1:+.0%})")
    if args.profile:
        _profile(args, config)
    print(f"load after: {os.getloadavg()[0]:.2f}")


def _profile(args, config) -> None:
    """DP 2 and EP 2 once more, each rank under torch.profiler (not timed: the profiler
    slows the many small operators more than the matmuls)."""
    os.makedirs(args.profile, exist_ok=True)
    for name in ("DP 2", "EP 2"):
        prefix = os.path.join(args.profile, name.replace(" ", "").lower())
        run_on_ranks(_column, *COLUMNS[name], config, args.steps, prefix, timeout=600)
        print(f"profiled {name}: {prefix}.rank0.txt, {prefix}.rank1.txt")


def _measured_costs(model_config, micro_batch: int, seq_len: int, reps: int = 20):
    """Seconds of one forward + backward on one thread: per layer, and of the rest of the
    model (the embedding, the output projection and the loss), from the model at its depth and
    at half of it (the fastest of ``reps``: a difference of two times amplifies their noise,
    and other processes only ever add to a time)."""
    torch.set_num_threads(1)
    ids = torch.randint(0, model_config.vocab_size, (micro_batch, seq_len + 1),
                        generator=torch.Generator().manual_seed(2))
    seconds = {}
    for layers in (model_config.num_layers, model_config.num_layers // 2):
        model = Transformer(replace(model_config, num_layers=layers)).train()

        def step():
            logits = model(ids[:, :-1]).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        step()
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        seconds[layers] = min(times)
    full, half = model_config.num_layers, model_config.num_layers // 2
    layer = (seconds[full] - seconds[half]) / (full - half)
    return layer, seconds[full] - full * layer


def _print_split(results: dict, tokens: int) -> None:
    even_name = next(iter(results))
    even = statistics.median(r["step_s"] for r in results[even_name])
    print(f"{'column':24} {'step s (median)':>16} {'tokens/s':>10} {'vs even':>8}")
    for name, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        spread = f"[{min(r['step_s'] for r in runs):.3f}-{max(r['step_s'] for r in runs):.3f}]"
        print(f"{name:24} {step:7.3f} {spread:>8} {tokens / step:10.0f} {even / step:8.2f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
