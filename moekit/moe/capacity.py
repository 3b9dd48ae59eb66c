"""Expert capacity: how many routes an expert takes, which routes are dropped, recycle routing.

Legend: T tokens, K routes per token, E experts, N = T * K routes in flat order (token-major:
token 0's K routes, then token 1's, ...). "Token order" below means this flat order.

Rules (docs/moe.md has the reasoning):
- capacity per expert = ceil(capacity_factor * K * T / E), T counting valid tokens only;
- when an expert is full, the routes that reach it later in token order are over capacity;
  with ``priority="choice"`` (GShard) every token's first choice comes before any second choice,
  token order within each choice;
- "drop": they are dropped (the token gets no output from that route);
- "recycle_random" (Hunyuan-Large): each goes to a random expert that still has a free slot:
  the free slots of all experts are listed, shuffled with a seeded generator and handed out in
  token order; a token may thus meet the same expert twice (then it is computed twice);
- "recycle_next_best": each goes to the token's best-scoring expert outside its own top K that
  still has room, in token order, one rank at a time.
A recycled route keeps its original gate weight, so the output of the token keeps its scale.
Routes that find no free slot at all (possible only when capacity_factor < 1) are dropped.
"""
from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Routes one expert may take: ceil(capacity_factor * top_k * num_tokens / num_experts)."""
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


def positions_in_expert(expert_ids_N: torch.Tensor, valid_N: torch.Tensor,
                        num_experts: int) -> torch.Tensor:
    """For each valid route, how many valid routes to the same expert come before it in token
    order (0 for the first). Invalid routes get an arbitrary position."""
    key_N = torch.where(valid_N, expert_ids_N, num_experts)
    order_N = torch.argsort(key_N, stable=True)
    counts = torch.bincount(key_N, minlength=num_experts + 1)
    starts = counts.cumsum(0) - counts
    rank_in_sorted_N = torch.arange(len(key_N), device=key_N.device) - starts[key_N[order_N]]
    return torch.empty_like(rank_in_sorted_N).scatter_(0, order_N, rank_in_sorted_N)


CAPACITY_PRIORITIES = ("token", "choice")


def limit_to_capacity(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor,
                      capacity: int, num_experts: int, priority: str = "token") -> torch.Tensor:
    """keep_TK with the routes over capacity set to False. The earliest routes stay: in token
    order (``priority="token"``), or all first choices before any second (``"choice"``)."""
    if priority not in CAPACITY_PRIORITIES:
        raise ValueError(f"priority={priority!r} is not allowed: one of "
                         f"{', '.join(CAPACITY_PRIORITIES)}")
    if priority == "choice":  # choice-major order is token order of the transpose
        return limit_to_capacity(expert_ids_TK.T, keep_TK.T, capacity, num_experts).T
    positions_N = positions_in_expert(expert_ids_TK.flatten(), keep_TK.flatten(), num_experts)
    return keep_TK & (positions_N < capacity).view_as(keep_TK)


def free_slots(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor, capacity: int,
               num_experts: int) -> torch.Tensor:
    """Free slots left in each expert after the kept routes."""
    used_E = torch.bincount(expert_ids_TK[keep_TK], minlength=num_experts)
    return (capacity - used_E).clamp(min=0)


def recycle_random(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor, overflow_TK: torch.Tensor,
                   capacity: int, num_experts: int, generator: torch.Generator):
    """Hunyuan-Large's recycle routing: overflowing routes take shuffled free slots, in token
    order. Returns the new (expert_ids_TK, keep_TK)."""
    free_E = free_slots(expert_ids_TK, keep_TK, capacity, num_experts)
    slots = torch.repeat_interleave(torch.arange(num_experts, device=free_E.device), free_E)
    shuffle = torch.randperm(len(slots), generator=generator, device="cpu").to(slots.device)
    slots = slots[shuffle]
    overflow_N = overflow_TK.flatten().nonzero().squeeze(1)
    placed = min(len(overflow_N), len(slots))
    expert_ids_N = expert_ids_TK.flatten().clone()
    keep_N = keep_TK.flatten().clone()
    expert_ids_N[overflow_N[:placed]] = slots[:placed]
    keep_N[overflow_N[:placed]] = True
    return expert_ids_N.view_as(expert_ids_TK), keep_N.view_as(keep_TK)


def recycle_next_best(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor,
                      overflow_TK: torch.Tensor, capacity: int, probs_TE: torch.Tensor):
    """Overflowing routes move to the token's next-best expert with room. Round r offers each
    waiting token its r-th best expert outside its top K; a token with several waiting routes
    places one per round, so it never meets the same expert twice. Returns the new
    (expert_ids_TK, keep_TK)."""
    num_tokens, top_k = expert_ids_TK.shape
    num_experts = probs_TE.shape[-1]
    free_E = free_slots(expert_ids_TK, keep_TK, capacity, num_experts)
    # Experts ranked by score with the token's own top-K pushed to the end (never offered).
    scores_TE = probs_TE.detach().clone().scatter_(-1, expert_ids_TK, -math.inf)
    ranked_TE = torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices
    expert_ids_TK, keep_TK, waiting_TK = expert_ids_TK.clone(), keep_TK.clone(), overflow_TK.clone()
    for rank in range(num_experts - top_k):
        if not waiting_TK.any():
            break
        # One waiting route per token takes part in this round: the token's first.
        offer_TK = waiting_TK & (waiting_TK.cumsum(-1) == 1)
        token_ids = offer_TK.any(-1).nonzero().squeeze(1)
        candidates = ranked_TE[token_ids, rank]
        position = positions_in_expert(candidates, torch.ones_like(candidates, dtype=torch.bool),
                                       num_experts)
        accepted = position < free_E[candidates]
        free_E = free_E - torch.bincount(candidates[accepted], minlength=num_experts)
        route_k = offer_TK[token_ids].int().argmax(-1)
        placed_t, placed_k = token_ids[accepted], route_k[accepted]
        expert_ids_TK[placed_t, placed_k] = candidates[accepted]
        keep_TK[placed_t, placed_k] = True
        waiting_TK[placed_t, placed_k] = False
    return expert_ids_TK, keep_TK
