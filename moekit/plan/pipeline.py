"""Skywork-MoE's non-uniform pipeline split: layers per stage from each part's cost.

The cost of a stage, in training FLOPs per token, is the sum of its layers' (6 x a layer's
active parameters + its attention, ``plan/flops.py``'s terms layer by layer), the first stage's
embedding (a lookup: no FLOPs) and the last stage's output projection and loss (6 V D: the
"heavier end stage" of the report). A recomputed layer costs its forward once more (a third
of its training FLOPs). ``plan_stages`` cuts the layers into contiguous runs that minimise the
most expensive stage (the pipeline goes at the pace of its slowest stage), exactly, by dynamic
programming over the cut points (between CLA groups, whose layers share K/V); among splits as fast, the most even one (least sum of squared
stage costs), which also spreads the memory.

Predicted step time of a 1F1B schedule with m micro-batches over stages of times t_s (per
micro-batch): sum_s t_s + (m - 1) max_s t_s: the first micro-batch crosses every stage, the
others follow at the slowest stage's pace. The bubble is the rest of p * that minus the work.
"""
from __future__ import annotations

from dataclasses import dataclass

from moekit.config import ModelConfig
from moekit.plan.flops import attention_flops_per_token
from moekit.plan.params import count_parameters, layer_parameters
from moekit.plan.units import require_positive


def layer_costs(config: ModelConfig, seq_len: int) -> list[float]:
    """Training FLOPs per token of each layer."""
    attention = attention_flops_per_token(config, seq_len) / config.num_layers
    return [6.0 * layer_parameters(config, index).active + attention
            for index in range(config.num_layers)]


def head_cost(config: ModelConfig) -> float:
    """Training FLOPs per token of the output projection (and so the loss's logits)."""
    return 6.0 * count_parameters(config).output_matrix


@dataclass(frozen=True)
class StagePlan:
    stage_layers: tuple[int, ...]
    stage_costs: tuple[float, ...]  # training FLOPs per token of each stage
    recomputed: tuple[int, ...]  # recomputed layers per stage

    def step_time(self, micro_batches: int, tokens_per_micro_batch: int,
                  flops_per_second: float) -> float:
        """Predicted seconds of one 1F1B step (see the module's formula)."""
        times = [cost * tokens_per_micro_batch / flops_per_second for cost in self.stage_costs]
        return sum(times) + (micro_batches - 1) * max(times)

    def bubble(self, micro_batches: int) -> float:
        """Share of the devices' time idle in a step."""
        busy = micro_batches * sum(self.stage_costs)
        span = len(self.stage_costs) * (sum(self.stage_costs)
                                        + (micro_batches - 1) * max(self.stage_costs))
        return 1 - busy / span


def _stage_costs(costs, head, stages, recomputed) -> tuple[float, ...]:
    result, start = [], 0
    for index, (count, again) in enumerate(zip(stages, recomputed)):
        run = costs[start:start + count]
        cost = sum(run) + sum(run[:again]) / 3  # a recomputed layer's forward once more
        result.append(cost + (head if index == len(stages) - 1 else 0.0))
        start += count
    return tuple(result)


def uniform_stages(config: ModelConfig, pipeline: int, seq_len: int,
                   recomputed: tuple[int, ...] | None = None) -> StagePlan:
    """The even split (layers divided as evenly as they go, the remainder on early stages)."""
    base, extra = divmod(config.num_layers, pipeline)
    stages = tuple(base + (1 if s < extra else 0) for s in range(pipeline))
    recomputed = recomputed or (0,) * pipeline
    return StagePlan(stages, _stage_costs(layer_costs(config, seq_len), head_cost(config),
                                          stages, recomputed), recomputed)


def plan_stages(config: ModelConfig, pipeline: int, seq_len: int,
                layer_times: list[float] | None = None,
                recomputed: tuple[int, ...] | None = None,
                head_time: float | None = None) -> StagePlan:
    """Layers per stage that minimise the slowest stage. ``layer_times``: measured costs of
    the layers (any unit), instead of FLOPs; ``head_time``: the measured cost of the output
    projection and loss in that unit (default: in proportion to its FLOPs, which on a CPU
    overstates it: 5.8 blocks by FLOPs against 4.7 timed for the tiny model, docs/parallel.md).
    ``recomputed``: how many layers each stage recomputes (to fit its memory)."""
    require_positive("pipeline", pipeline, integer=True)
    groups = -(-config.num_layers // config.cla_share)
    if pipeline > groups:
        raise ValueError(f"pipeline={pipeline} is not allowed: more stages than the model's "
                         f"{config.num_layers} layers" + (f" in {groups} CLA groups"
                                                          if config.cla_share > 1 else ""))
    flops = layer_costs(config, seq_len)
    head = head_cost(config)
    if layer_times is not None:
        if len(layer_times) != config.num_layers:
            raise ValueError(f"layer_times has {len(layer_times)} entries; the model has "
                             f"{config.num_layers} layers")
        head = head_time if head_time is not None else head * sum(layer_times) / sum(flops)
        flops = list(layer_times)
    elif head_time is not None:
        raise ValueError("head_time is not allowed without layer_times: it is in their unit")
    recomputed = recomputed or (0,) * pipeline
    layers = len(flops)
    prefix = [0.0]
    for cost in flops:
        prefix.append(prefix[-1] + cost)
    # best[s][n]: (slowest stage, sum of squared stage costs) putting the first n layers on
    # s + 1 stages, the slowest rounded so that splits equal up to float rounding tie.
    scale = prefix[-1] + head
    worst = (float("inf"), float("inf"))
    best = [[worst] * (layers + 1) for _ in range(pipeline)]
    cut = [[0] * (layers + 1) for _ in range(pipeline)]
    for n in range(1, layers + 1):
        if n % config.cla_share == 0 or n == layers:
            best[0][n] = (round(prefix[n] / scale, 12), prefix[n] ** 2)
    for s in range(1, pipeline):
        for n in range(s + 1, layers + 1):
            for m in range(s, n):  # stage s takes layers m..n-1
                if m % config.cla_share:
                    continue  # a CLA group's layers share K/V: they stay on one stage
                stage = prefix[n] - prefix[m] + (head if s == pipeline - 1 and n == layers
                                                 else 0.0)
                slowest, squares = best[s - 1][m]
                value = (max(slowest, round(stage / scale, 12)), squares + stage ** 2)
                if value < best[s][n]:
                    best[s][n], cut[s][n] = value, m
    if pipeline == 1:
        stages = (layers,)
    else:
        bounds, n = [], layers
        for s in range(pipeline - 1, 0, -1):
            m = cut[s][n]
            bounds.append(n - m)
            n = m
        stages = (n,) + tuple(reversed(bounds))
    return StagePlan(stages, _stage_costs(flops, head, stages, recomputed), recomputed)
