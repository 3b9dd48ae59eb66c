"""Gates that route over several ranks: FastMoE's SWIPE and FasterMoE's topology-aware gate
(capacities counted over every rank are in ``route_groups.py``).

Legend: T tokens of this rank, E experts, K routes per token, R ranks of a group, W workers
(the ranks holding experts), N routes (flat, token-major).

Both route over ``Gate.route_groups.experts`` (handed by ``parallelize``); on one process, or
in evaluation, they are the renormalised softmax top-K. Their rules take routes in the batch's
order and need one all-gather of a few integers per forward (``route_groups.py``), so the
routes do not depend on how the batch is split into ranks.
"""
from __future__ import annotations

import torch

from moekit.moe.capacity import positions_in_expert
from moekit.moe.route_groups import RouteGroup
from moekit.moe.router import GATES, LinearGate, RegisteredGate, Routing, _linear_options


class ReroutingGate(LinearGate):
    """A top-K gate whose chosen experts a rule over several ranks may change in training
    (``reroute``); the weights are the softmax over the K final experts' logits (FastMoE's
    SWIPE and topology gates recompute them so), the logits' softmax is ``probs_TE``."""

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        expert_ids_TK = logits_TE.topk(self.top_k, dim=-1).indices
        groups = self.route_groups
        if self.training and groups is not None and groups.experts.size > 1:
            expert_ids_TK = self.reroute(logits_TE.detach(), expert_ids_TK, groups.experts)
        weights_TK = logits_TE.gather(-1, expert_ids_TK).softmax(-1)
        return Routing(expert_ids_TK, weights_TK, probs_TE=logits_TE.softmax(-1),
                       logits_TE=logits_TE)

    def reroute(self, logits_TE, expert_ids_TK, workers: RouteGroup) -> torch.Tensor:
        raise NotImplementedError


def _best_on(logits_TE: torch.Tensor, token_ids: torch.Tensor, first_expert: torch.Tensor,
             experts_per_rank: int, excluded_TE: torch.Tensor | None = None) -> torch.Tensor:
    """For each token of ``token_ids``, its best-scoring expert among the ``experts_per_rank``
    starting at ``first_expert`` (and not in ``excluded_TE``, when given, if any is left)."""
    offsets = torch.arange(experts_per_rank, device=logits_TE.device)
    candidates_NL = first_expert[:, None] + offsets
    scores_NL = logits_TE[token_ids[:, None], candidates_NL]
    if excluded_TE is not None:
        scores_NL = scores_NL.masked_fill(excluded_TE[token_ids[:, None], candidates_NL],
                                          -torch.inf)
    return candidates_NL.gather(1, scores_NL.argmax(1, keepdim=True)).squeeze(1)


class SwipeGate(ReroutingGate):
    """FastMoE's SWIPE: in training every worker takes at most its own tokens x K routes
    (T_w K); the routes over that go, in the batch's order, to the workers with room, worker 0
    first, each to the token's best-scoring expert on its new worker. The total room equals
    the total routes, so none is dropped. FastMoE swipes one choice at a time; this rule treats
    a token's K routes in the flat order."""

    def reroute(self, logits_TE, expert_ids_TK, workers: RouteGroup) -> torch.Tensor:
        per_worker = self.num_experts // workers.size
        worker_N = expert_ids_TK.flatten() // per_worker
        every = torch.ones_like(worker_N, dtype=torch.bool)
        counts_W = torch.zeros(workers.size, dtype=torch.long, device=worker_N.device
                               ).index_add_(0, worker_N, torch.ones_like(worker_N))
        gathered_RX = workers.gather(torch.cat([counts_W, counts_W.new_tensor([len(logits_TE)])]))
        counts_RW, room_W = gathered_RX[:, :-1], gathered_RX[:, -1] * self.top_k
        # What each worker keeps of each sender's routes: its room, filled rank by rank.
        before_RW = counts_RW.cumsum(0) - counts_RW
        kept_RW = torch.minimum(counts_RW, (room_W - before_RW).clamp(min=0))
        within_N = positions_in_expert(worker_N, every, workers.size) \
            < kept_RW[workers.rank][worker_N]
        over_N = (~within_N).nonzero().squeeze(1)
        if len(over_N) == 0:
            return expert_ids_TK
        # The free places, worker by worker, handed out in the batch's order of the routes over.
        free_W = room_W - kept_RW.sum(0)
        over_before = int((counts_RW - kept_RW)[:workers.rank].sum())
        slot_N = over_before + torch.arange(len(over_N), device=over_N.device)
        new_worker_N = torch.searchsorted(free_W.cumsum(0), slot_N, right=True)
        expert_ids_N = expert_ids_TK.flatten().clone()
        expert_ids_N[over_N] = _best_on(logits_TE, over_N // self.top_k,
                                        new_worker_N * per_worker, per_worker)
        return expert_ids_N.view_as(expert_ids_TK)


class TopologyGate(ReroutingGate):
    """FasterMoE's topology-aware gate: in training, the routes a node's tokens send to experts
    on other nodes are at most ``outgoing_fraction`` of the node's routes (floor of
    fraction x K x the node's tokens), taken in the batch's order; the others go to the
    token's best-scoring experts on its own node that it has not chosen. Nodes are
    ``ranks_per_node`` consecutive ranks of the expert group."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 outgoing_fraction: float = 0.14, ranks_per_node: int = 8, **kwargs):
        if not 0 <= outgoing_fraction <= 1:
            raise ValueError(f"router_options outgoing_fraction={outgoing_fraction!r} is not "
                             "allowed for the 'topology' router: expected a number in [0, 1]")
        if ranks_per_node != int(ranks_per_node) or ranks_per_node < 1:
            raise ValueError(f"router_options ranks_per_node={ranks_per_node!r} is not "
                             "allowed for the 'topology' router: expected an integer >= 1")
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        self.outgoing_fraction = outgoing_fraction
        self.ranks_per_node = int(ranks_per_node)

    def reroute(self, logits_TE, expert_ids_TK, workers: RouteGroup) -> torch.Tensor:
        per_worker = self.num_experts // workers.size
        node = workers.rank // self.ranks_per_node
        outgoing_TK = expert_ids_TK // per_worker // self.ranks_per_node != node
        gathered_R2 = workers.gather(torch.stack([outgoing_TK.sum(), outgoing_TK.new_tensor(
            len(logits_TE), dtype=torch.long)]))
        first_rank = node * self.ranks_per_node
        node_R2 = gathered_R2[first_rank:first_rank + self.ranks_per_node]
        allowed = int(self.outgoing_fraction * self.top_k * int(node_R2[:, 1].sum()))
        earlier = int(gathered_R2[first_rank:workers.rank, 0].sum())
        outgoing_N = outgoing_TK.flatten().nonzero().squeeze(1)
        over_N = outgoing_N[max(allowed - earlier, 0):]
        if len(over_N) == 0:
            return expert_ids_TK
        # Each rerouted route takes the token's best expert on its node it has not chosen yet:
        # a token's rerouted routes are placed one at a time, its chosen set growing.
        chosen_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter_(-1, expert_ids_TK, True)
        expert_ids_N = expert_ids_TK.flatten().clone()
        node_experts = per_worker * self.ranks_per_node
        for choice in range(self.top_k):
            routes = over_N[over_N % self.top_k == choice]
            tokens = routes // self.top_k
            best = _best_on(logits_TE, tokens, torch.full_like(tokens, node * node_experts),
                            min(node_experts, self.num_experts - node * node_experts), chosen_TE)
            expert_ids_N[routes] = best
            chosen_TE[tokens, best] = True
        return expert_ids_N.view_as(expert_ids_TK)


def _swipe(config, options) -> SwipeGate:
    return SwipeGate(config.hidden_size, config.num_experts, config.top_k,
                     **_linear_options(config, options))


def _topology(config, options) -> TopologyGate:
    return TopologyGate(config.hidden_size, config.num_experts, config.top_k,
                        outgoing_fraction=options["outgoing_fraction"],
                        ranks_per_node=options["ranks_per_node"],
                        **_linear_options(config, options))


GATES.update({
    "swipe": RegisteredGate(_swipe, {"bias": False}),
    "topology": RegisteredGate(_topology, {"bias": False, "outgoing_fraction": 0.14,
                                           "ranks_per_node": 8}),
})
# Built in: the layer trusts their Routing without reading values back from the device.
DISTRIBUTED_GATES = (SwipeGate, TopologyGate)
