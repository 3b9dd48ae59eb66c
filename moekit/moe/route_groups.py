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


@dataclass
class StepQueues:
    """``capacity_scope="step"``: a gate's part in the step's capacity pre-pass
    (``moekit.train.step_capacity``). While ``measured`` is a list, each capacity decision
    appends its queue counts and token count there (and decides locally); with a ``plan``, the
    decision is that of the whole global batch: (offset_Q: routes before this micro-batch's
    in each queue, tokens of the global batch)."""

    measured: list[torch.Tensor] | None = None
    plan: tuple[torch.Tensor, int] | None = None


def _queues(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor, num_experts: int,
            priority: str):
    """Each route's queue (its expert; with ``priority="choice"`` its expert and choice, the
    queues of one choice filled before the next's) and the number of queues."""
    top_k = expert_ids_TK.shape[1]
    classes = top_k if priority == "choice" else 1
    choice_TK = torch.arange(top_k, device=expert_ids_TK.device).expand_as(expert_ids_TK)
    return expert_ids_TK + num_experts * (choice_TK if classes > 1 else 0), classes * num_experts


def queue_counts(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor, num_experts: int,
                 priority: str = "token") -> torch.Tensor:
    """[Q + 1]: the kept routes in each queue (``_queues``), then the number of tokens."""
    queue_TK, queues = _queues(expert_ids_TK, keep_TK, num_experts, priority)
    counts_Q = torch.zeros(queues, dtype=torch.long, device=expert_ids_TK.device).index_add_(
        0, queue_TK[keep_TK], torch.ones_like(queue_TK[keep_TK]))
    return torch.cat([counts_Q, counts_Q.new_tensor([len(expert_ids_TK)])])


def offsets_before(counts_CQ: torch.Tensor, chunk: int, num_experts: int) -> torch.Tensor:
    """offset_Q of chunk ``chunk`` of a batch cut into chunks in order (``counts_CQ``: each
    chunk's queue counts): every chunk's routes of the earlier queues of the same expert, and
    the earlier chunks' routes of the same queue."""
    totals_Q = counts_CQ.sum(0)
    classes = len(totals_Q) // num_experts
    earlier_queues_CE = (totals_Q.view(classes, num_experts).cumsum(0)
                         - totals_Q.view(classes, num_experts))
    return counts_CQ[:chunk].sum(0) + earlier_queues_CE.flatten()


def keep_from_offsets(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor, offset_Q: torch.Tensor,
                      capacity: int, num_experts: int, priority: str = "token") -> torch.Tensor:
    """keep_TK less the routes whose place in their queue, ``offset_Q`` plus their place among
    this batch's routes of that queue, is at or past ``capacity``."""
    queue_TK, queues = _queues(expert_ids_TK, keep_TK, num_experts, priority)
    local_N = positions_in_expert(queue_TK.flatten(), keep_TK.flatten(), queues)
    position_TK = (offset_Q[queue_TK.flatten()] + local_N).view_as(keep_TK)
    return keep_TK & (position_TK < capacity)


def keep_within_global_capacity(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor,
                                capacity_factor: float, num_experts: int, ranks: RouteGroup,
                                priority: str = "token") -> torch.Tensor:
    """keep_TK with the routes over capacity set to False, the capacity and the positions
    counted over every rank of ``ranks``: capacity ceil(factor * K * T_all / E), and a route's
    place in its expert's queue is its place in the whole batch (earlier ranks first; with
    ``priority="choice"`` every first choice of every rank before any second). The kept routes
    are those one process keeps from the whole batch."""
    gathered_RX = ranks.gather(queue_counts(expert_ids_TK, keep_TK, num_experts, priority))
    capacity = expert_capacity(int(gathered_RX[:, -1].sum()), expert_ids_TK.shape[1],
                               num_experts, capacity_factor)
    offset_Q = offsets_before(gathered_RX[:, :-1], ranks.rank, num_experts)
    return keep_from_offsets(expert_ids_TK, keep_TK, offset_Q, capacity, num_experts, priority)


def capacity_keep(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor, capacity_factor: float,
                  num_experts: int, scope: str, groups: RouteGroups | None,
                  priority: str = "token", queues: StepQueues | None = None) -> torch.Tensor:
    """keep_TK less the routes over capacity, counted over this rank's batch (``scope``
    "local"), over every rank's (``"ranks"``), or over the step's global batch (``"step"``,
    with the ``queues`` of the step's pre-pass; outside a training step, as "ranks")."""
    if scope == "step" and queues is not None:
        if queues.measured is not None:
            queues.measured.append(queue_counts(expert_ids_TK, keep_TK, num_experts, priority))
        elif queues.plan is not None:
            offset_Q, tokens = queues.plan
            capacity = expert_capacity(tokens, expert_ids_TK.shape[1], num_experts,
                                       capacity_factor)
            return keep_from_offsets(expert_ids_TK, keep_TK, offset_Q.to(keep_TK.device),
                                     capacity, num_experts, priority)
    if scope in ("ranks", "step") and groups is not None and groups.batch.size > 1:
        return keep_within_global_capacity(expert_ids_TK, keep_TK, capacity_factor, num_experts,
                                           groups.batch, priority)
    capacity = expert_capacity(len(expert_ids_TK), expert_ids_TK.shape[1], num_experts,
                               capacity_factor)
    return limit_to_capacity(expert_ids_TK, keep_TK, capacity, num_experts, priority)
