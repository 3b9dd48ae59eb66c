"""The ranks a gate routes over, and capacities counted over all of them (FastMoE's DCGate:
``MoEConfig.capacity_scope="ranks"``).

Legend: T tokens of this rank, K routes per token, E experts, R ranks of a group.

``moekit.parallel.parallelize`` hands every gate the groups it routes over
(``Gate.route_groups``): ``experts``, the ranks the layer's experts are spread over (a token's
routes can reach each of them), and ``batch``, every rank taking its own rows of the batch
(data- and expert-parallel ranks alike). On one process there is none.

Rules over ranks are deterministic and do not depend on how the batch is split into ranks:
routes are taken in the order one process would see the whole batch, rank r's rows being the
r-th block of it (``Mesh.rows``): rank by rank, then token by token, then choice by choice
(the flat order of ``capacity.py``); where FastMoE lets the winner of a CUDA atomic through,
the earlier route in this order wins. Each needs every rank's counts: one all-gather of a few
integers per forward, read on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit.moe.capacity import expert_capacity, limit_to_capacity, positions_in_expert


@dataclass(frozen=True)
class RouteGroup:
    """Ranks that a gate routes over, and this rank's place among them (group None: alone)."""

    group: object = None
    rank: int = 0
    size: int = 1

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """values [...] of every rank, stacked [R, ...] in rank order (a collective)."""
        if self.size == 1:
            return values[None]
        pieces = [torch.empty_like(values) for _ in range(self.size)]
        dist.all_gather(pieces, values.contiguous(), group=self.group)
        return torch.stack(pieces)


@dataclass(frozen=True)
class RouteGroups:
    """What ``parallelize`` hands a gate: the ranks its experts are on, and every rank of the
    batch."""

    experts: RouteGroup = RouteGroup()
    batch: RouteGroup = RouteGroup()


def keep_within_global_capacity(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor,
                                capacity_factor: float, num_experts: int, ranks: RouteGroup,
                                priority: str = "token") -> torch.Tensor:
    """keep_TK with the routes over capacity set to False, the capacity and the positions
    counted over every rank of ``ranks``: capacity ceil(factor * K * T_all / E), and a route's
    place in its expert's queue is its place in the whole batch (earlier ranks first; with
    ``priority="choice"`` every first choice of every rank before any second). The kept routes
    are those one process keeps from the whole batch."""
    num_tokens, top_k = expert_ids_TK.shape
    classes = top_k if priority == "choice" else 1  # queues filled one after another
    choice_TK = torch.arange(top_k, device=expert_ids_TK.device).expand_as(expert_ids_TK)
    queue_TK = expert_ids_TK + num_experts * (choice_TK if classes > 1 else 0)
    counts_Q = torch.zeros(classes * num_experts, dtype=torch.long,
                           device=expert_ids_TK.device).index_add_(
        0, queue_TK[keep_TK], torch.ones_like(queue_TK[keep_TK]))
    gathered_RX = ranks.gather(torch.cat([counts_Q, counts_Q.new_tensor([num_tokens])]))
    counts_RQ, tokens_R = gathered_RX[:, :-1], gathered_RX[:, -1]
    capacity = expert_capacity(int(tokens_R.sum()), top_k, num_experts, capacity_factor)
    # Before this rank's routes in a queue: every rank's routes of the earlier queues of the
    # same expert, and the earlier ranks' routes of this queue.
    earlier_ranks_Q = counts_RQ[:ranks.rank].sum(0)
    earlier_queues_CE = counts_RQ.sum(0).view(classes, num_experts).cumsum(0) \
        - counts_RQ.sum(0).view(classes, num_experts)
    offset_Q = earlier_ranks_Q + earlier_queues_CE.flatten()
    local_N = positions_in_expert(queue_TK.flatten(), keep_TK.flatten(), classes * num_experts)
    position_TK = (offset_Q[queue_TK.flatten()] + local_N).view_as(keep_TK)
    return keep_TK & (position_TK < capacity)


def capacity_keep(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor, capacity_factor: float,
                  num_experts: int, scope: str, groups: RouteGroups | None,
                  priority: str = "token") -> torch.Tensor:
    """keep_TK less the routes over capacity, counted over this rank's batch (``scope``
    "local") or over every rank's (``"ranks"``)."""
    if scope == "ranks" and groups is not None and groups.batch.size > 1:
        return keep_within_global_capacity(expert_ids_TK, keep_TK, capacity_factor, num_experts,
                                           groups.batch, priority)
    capacity = expert_capacity(len(expert_ids_TK), expert_ids_TK.shape[1], num_experts,
                               capacity_factor)
    return limit_to_capacity(expert_ids_TK, keep_TK, capacity, num_experts, priority)
