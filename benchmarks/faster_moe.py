#!/usr/bin/env python3
"""FasterMoE's smart schedule and shadowing against plain expert parallelism, side by side.

    python benchmarks/faster_moe.py                       # 2 and 4 processes, uniform and Zipf
    python benchmarks/faster_moe.py --world 2 --rounds 5 --zipf 1.2

One MoE layer (GroupedExperts, fp32, top-2, dropless) under expert parallelism on real gloo
processes of one thread each, forward + backward of a fixed routing: every token's two experts
drawn without replacement, uniformly or from a Zipf law (expert e with weight 1 / (e + 1)^s),
the same draw for every column. Columns, taking turns within each round:
  plain EP    the one all-to-all out and back (twice: the two plain columns' ratio is the
              spread of the measurement itself)
  overlap     the smart schedule (chunks per peer in ring order, compute on arrived chunks)
  shadow      hot experts' weights sent instead of their tokens (the cost model's choice)
  both        the two together
Time: median over rounds of the mean layer forward+backward of ``--steps`` steps after one
warm-up step, measured on rank 0 between barriers (so the slowest rank counts). Bytes: what
each rank sends to other ranks per forward+backward (rows, counts, broadcast weights, reduced
gradients), mean over ranks, counted at the calls. Ratios are to the first plain EP column;
"throughput" is its time over the column's. The busiest rank's CPU time (process time, gloo's
threads included; median over rounds of the largest rank's) moves less than the wall time
when other jobs share the cores: it is the work of the rank that the others wait for. All
ranks' CPU time together is what the run costs the machine: where the processes share too few
cores, the wall time follows that sum rather than the busiest rank.
Targets (issue 18): 2 processes x 1 thread, shadowing >= 1.25x plain EP's throughput under
Zipf; under uniform routing no slower than plain EP beyond the spread of the two plain columns.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from moekit import MoEConfig, MoELayer
from moekit.cli.values import positive_float, positive_int
from moekit.config import ExpertParallelConfig
from moekit.moe.router import Gate, Routing
from moekit.parallel.expert_parallel import shard_experts
from moekit.parallel.processes import run_on_ranks

COLUMNS = {
    "plain EP": ExpertParallelConfig(),
    "overlap": ExpertParallelConfig(overlap=True),
    "shadow": ExpertParallelConfig(shadow=True),
    "both": ExpertParallelConfig(overlap=True, shadow=True),
    "plain EP again": ExpertParallelConfig(),
}


class FixedRoutingGate(Gate):
    """Routes token t to the experts drawn for it beforehand; the weights are a linear gate's
    softmax at those experts, so that the router has a gradient as a real one does."""

    def __init__(self, hidden_size: int, expert_ids_TK: torch.Tensor, num_experts: int):
        super().__init__(num_experts, expert_ids_TK.shape[1])
        self.linear = torch.nn.Linear(hidden_size, num_experts, bias=False)
        self.register_buffer("expert_ids_TK", expert_ids_TK)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        probs_TE = self.linear(x_TD).softmax(-1)
        return Routing(self.expert_ids_TK, probs_TE.gather(-1, self.expert_ids_TK),
                       probs_TE=probs_TE)


def draw_routes(tokens: int, num_experts: int, zipf: float | None, seed: int) -> torch.Tensor:
    """Two distinct experts per token: uniformly (``zipf`` None) or with weight 1/(e+1)^zipf."""
    if zipf is not None and not zipf > 0:
        raise ValueError(f"zipf={zipf!r} is not allowed: the exponent must be > 0")
    weights_E = (torch.ones(num_experts) if zipf is None
                 else (torch.arange(num_experts) + 1.0) ** -zipf)
    return torch.multinomial(weights_E.expand(tokens, num_experts), 2, replacement=False,
                             generator=torch.Generator().manual_seed(seed))


class SentBytes:
    """Counts the bytes this rank sends to other ranks through the collectives the expert
    exchange uses, at the call."""

    def __init__(self):
        self.sent = 0
        self._originals = {}

    def _count(self, name, sent_bytes):
        original = getattr(dist, name)
        self._originals[name] = original

        def counting(*args, **kwargs):
            self.sent += sent_bytes(*args, **kwargs)
            return original(*args, **kwargs)
        setattr(dist, name, counting)

    def __enter__(self):
        def payload(tensor):
            return tensor.numel() * tensor.element_size()

        def others(group):
            return dist.get_world_size(group) - 1

        def all_to_all(output, input, output_split_sizes=None, input_split_sizes=None,
                       group=None, **_):
            me, peers = dist.get_rank(group), dist.get_world_size(group)
            splits = input_split_sizes or [len(input) // peers] * peers
            row = payload(input[0]) if len(input) else 0
            return row * sum(rows for peer, rows in enumerate(splits) if peer != me)

        self._count("all_to_all_single", all_to_all)
        self._count("isend", lambda tensor, *a, **k: payload(tensor))
        self._count("all_gather", lambda out, tensor, group=None, **k: payload(tensor)
                    * others(group))
        self._count("broadcast", lambda tensor, src, group=None, **k: payload(tensor)
                    * others(group) if dist.get_rank() == src else 0)
        self._count("reduce", lambda tensor, dst, group=None, **k: payload(tensor)
                    if dist.get_rank() != dst else 0)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _layer(args, routes_TK, rank, world, options):
    torch.manual_seed(0)
    config = MoEConfig(hidden_size=args.hidden, ffn_size=args.ffn, num_experts=args.experts,
                       top_k=2)
    layer = MoELayer(config, router=FixedRoutingGate(args.hidden, routes_TK, args.experts))
    shard_experts(layer, dist.group.WORLD, rank, world, options=options)
    return layer


def _step(layer, x_TD):
    y_TD, _ = layer(x_TD)
    y_TD.sum().backward()


def _columns(rank, world, args, zipf):
    tokens = args.tokens
    routes_TK = draw_routes(tokens * world, args.experts, zipf, seed=1)[
        rank * tokens:(rank + 1) * tokens]
    # Hidden states inside a model need their gradient: the exchanges carry it back.
    x_TD = torch.randn(tokens, args.hidden, generator=torch.Generator().manual_seed(rank),
                       requires_grad=True)
    layers = {name: _layer(args, routes_TK, rank, world, options)
              for name, options in COLUMNS.items()}
    times = {name: [] for name in COLUMNS}
    cpu = {name: [] for name in COLUMNS}
    sent = {}
    for _ in range(args.rounds):
        for name, layer in layers.items():
            _step(layer, x_TD)  # warm-up
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                _step(layer, x_TD)
            cpu[name].append((time.process_time() - start_cpu) / args.steps)
            dist.barrier()
            times[name].append((time.perf_counter() - start) / args.steps)
    for name, layer in layers.items():
        with SentBytes() as counter:
            _step(layer, x_TD)
        sent[name] = counter.sent
    return times, sent, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=positive_int, nargs="+", default=[2, 4],
                        help="numbers of processes (default 2 4)")
    parser.add_argument("--zipf", type=positive_float, default=1.2,
                        help="the Zipf exponent of the skewed routing (> 0; default 1.2)")
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--tokens", type=positive_int, default=2048, help="tokens per rank")
    parser.add_argument("--hidden", type=positive_int, default=256)
    parser.add_argument("--ffn", type=positive_int, default=512)
    parser.add_argument("--experts", type=positive_int, default=8)
    args = parser.parse_args()
    for world in args.world:
        if args.experts % world:
            parser.error(f"--experts {args.experts} is not allowed with --world {world}: the "
                         "processes must divide the experts")
    print(f"MoE layer D={args.hidden} F={args.ffn} E={args.experts} top-2 fp32, "
          f"{args.tokens} tokens per rank, 1 thread per rank, {args.rounds} rounds x "
          f"{args.steps} steps; median [range] of forward+backward")
    for world in args.world:
        for routing, zipf in (("uniform", None), (f"Zipf {args.zipf}", args.zipf)):
            results = run_on_ranks(_columns, world, args, zipf, timeout=1800)
            times = results[0][0]
            sent = {name: statistics.mean(r[1][name] for r in results) for name in COLUMNS}
            busiest = {name: statistics.median(max(r[2][name][i] for r in results)
                                               for i in range(args.rounds)) for name in COLUMNS}
            every = {name: statistics.median(sum(r[2][name][i] for r in results)
                                             for i in range(args.rounds)) for name in COLUMNS}
            plain_time = statistics.median(times["plain EP"])
            print(f"\n{world} processes, {routing} routing")
            print("| column | ms | throughput vs plain EP | busiest rank's CPU ms | vs plain EP "
                  "| all ranks' CPU ms | vs plain EP | MB sent / rank | bytes vs plain EP |")
            print("|---|---|---|---|---|---|---|---|---|")
            for name in COLUMNS:
                median = statistics.median(times[name])
                print(f"| {name} | {1e3 * median:.1f} [{1e3 * min(times[name]):.1f}-"
                      f"{1e3 * max(times[name]):.1f}] | {plain_time / median:.2f} | "
                      f"{1e3 * busiest[name]:.1f} | {busiest['plain EP'] / busiest[name]:.2f} | "
                      f"{1e3 * every[name]:.1f} | {every['plain EP'] / every[name]:.2f} | "
                      f"{sent[name] / 1e6:.2f} | {sent[name] / sent['plain EP']:.2f} |")


if __name__ == "__main__":
    main()
