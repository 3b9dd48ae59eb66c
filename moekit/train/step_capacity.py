"""``MoEConfig.capacity_scope="step"``: expert capacities of the training step's global batch,
so that the routes a step keeps do not depend on how its batch is cut into micro-batches and
ranks (docs/moe.md, Gates over several ranks).

An expert's capacity is ceil(factor x K x the global batch's tokens / E), and a route's place
in its expert's queue is its place in the global batch in the order one process sees it (rank
r's rows the r-th block of the batch, micro-batch m the m-th block of a rank's rows; then token
by token, choice by choice, or for ``gshard`` every first choice before any second). Each
micro-batch's routes then need the counts of every micro-batch before it, on every rank; and a
layer's routes depend on what the layers before it dropped. So a pre-pass without gradients
plans the step's layers one after another: for each layer (in order) a forward of every
micro-batch, the layers already planned keeping their planned routes, measures this layer's
queues; one all-gather over the ranks of the batch gives every micro-batch's offsets. Each
such forward draws the random numbers (jitter, dropout) the training forwards will, from the
same state (restored after each), so that they route as the plan says. The cost: one
forward-only pass of the step's batch per layer with this scope: a mode for studying
capacities, as ``lb_scope="step"`` is for the balance loss.
"""
from __future__ import annotations

import torch

from moekit.moe import MoELayer
from moekit.moe.route_groups import RouteGroup, StepQueues, offsets_before


def _random_state_kept():
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


class StepCapacity:
    """The plan of one step: ``select(m)`` before micro-batch m's forward (and its recompute
    in the backward) makes every planned gate keep that micro-batch's routes of the plan;
    ``close()`` after the step leaves the gates as they were."""

    def __init__(self, gates: list, plans: list[list[tuple[torch.Tensor, int]]]):
        self.gates, self.plans = gates, plans

    @classmethod
    @torch.no_grad()
    def plan(cls, model: torch.nn.Module, micro_batches: list,
             forward) -> "StepCapacity | None":
        """The plan of the step's ``micro_batches`` (this rank's, in order) on ``model``
        (unwrapped), ``forward(model, batch)`` running one; None when no layer has the
        scope. Every rank of the batch plans at once (its gates' ``route_groups``)."""
        gates = [layer.router for layer in model.modules()
                 if isinstance(layer, MoELayer) and layer.config.capacity_scope == "step"]
        if not gates:
            return None
        planned = cls([], [])
        for gate in gates:
            gate.step_queues = StepQueues(measured=[])
            with _random_state_kept():
                for index, batch in enumerate(micro_batches):
                    planned.select(index)
                    forward(model, batch)
            measured, gate.step_queues = gate.step_queues.measured, StepQueues()
            if len(measured) != len(micro_batches):  # no capacity rule ran (none in use)
                gate.step_queues = None
                continue
            planned.gates.append(gate)
            planned.plans.append(_micro_batch_plans(torch.stack(measured), gate))
        return planned

    def select(self, micro_batch: int) -> None:
        for gate, plans in zip(self.gates, self.plans):
            gate.step_queues.plan = plans[micro_batch]

    def close(self) -> None:
        for gate in self.gates:
            gate.step_queues = None


def _micro_batch_plans(counts_MX: torch.Tensor, gate) -> list:
    """(offset_Q, global tokens) of each of this rank's micro-batches, from their queue counts
    and token counts [M, Q + 1] and every other rank's."""
    ranks = gate.route_groups.batch if gate.route_groups is not None else RouteGroup()
    gathered_CX = ranks.gather(counts_MX).flatten(0, 1)  # chunks: rank-major, then micro-batch
    tokens = int(gathered_CX[:, -1].sum())
    first = ranks.rank * len(counts_MX)
    return [(offsets_before(gathered_CX[:, :-1], first + m, gate.num_experts), tokens)
            for m in range(len(counts_MX))]
