"""Token permutation: sort routes by expert, hand the experts one contiguous block each, and
bring their outputs back weighted by the gate.

Legend: T tokens, D model dim, K routes per token, E experts, N kept routes (N <= T * K).

This is the one step an expert-parallel layout replaces (permute, all-to-all, compute, all-to-all
back, un-permute); everything it needs is in :class:`DispatchPlan`.
Deterministic by construction: a stable sort, gathers, and per-token sums over each token's kept
routes in route order (``embedding_bag``: one pass, no [T, K, D] copy), never an
order-dependent scatter-add. The combine and the permutation's backward are both such sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DispatchPlan:
    """Where each kept route goes. Rows of the permuted buffer are grouped by expert.

    slots_N: for each permuted row, its flat route index t * K + k.
    token_ids_N: for each permuted row, the token it carries (slots_N // K).
    tokens_per_expert_E: rows per expert, in expert order (int64).
    num_tokens, top_k: T and K.
    route_slots_N: the kept routes in token order (t, then k), as flat indices t * K + k.
    route_rows_N: the same routes' rows in the permuted buffer.
    route_offsets_T: where each token's routes start in route_slots_N / route_rows_N (a token
        whose routes were all dropped has an empty run).
    """

    slots_N: torch.Tensor
    token_ids_N: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    num_tokens: int
    top_k: int
    route_slots_N: torch.Tensor
    route_rows_N: torch.Tensor
    route_offsets_T: torch.Tensor


def count_per_expert(expert_ids: torch.Tensor, num_bins: int,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
    """How many entries (kept ones only, given ``keep``) name each of ``num_bins`` experts, as
    int64. A scatter-add into counters of a known size: ``bincount`` sizes its output from the
    data, which makes the host wait for the device."""
    ones = torch.ones_like(expert_ids) if keep is None else keep.to(expert_ids.dtype)
    return torch.zeros(num_bins, dtype=expert_ids.dtype, device=expert_ids.device).scatter_add_(
        0, expert_ids.flatten(), ones.flatten())


def plan_dispatch(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None,
                  num_experts: int) -> DispatchPlan:
    """Sort the kept routes by expert (stable: within an expert, token order)."""
    num_tokens, top_k = expert_ids_TK.shape
    key_S = expert_ids_TK.flatten()
    device = key_S.device
    if keep_TK is None:
        route_slots_N = torch.arange(len(key_S), device=device)
        route_offsets_T = torch.arange(0, len(key_S), top_k, device=device)
    else:
        key_S = torch.where(keep_TK.flatten(), key_S, num_experts)  # dropped routes sort last
        route_slots_N = keep_TK.flatten().nonzero().squeeze(1)
        kept_per_token_T = keep_TK.sum(1)
        route_offsets_T = kept_per_token_T.cumsum(0) - kept_per_token_T
    counts = count_per_expert(key_S, num_experts + 1)
    order_S = torch.argsort(key_S, stable=True)
    row_S = torch.empty_like(order_S)
    row_S[order_S] = torch.arange(len(order_S), device=device)  # a permutation: no collisions
    slots_N = order_S[:len(route_slots_N)]
    return DispatchPlan(slots_N=slots_N, token_ids_N=slots_N.div(top_k, rounding_mode="floor"),
                        tokens_per_expert_E=counts[:num_experts], num_tokens=num_tokens,
                        top_k=top_k, route_slots_N=route_slots_N,
                        route_rows_N=row_S[route_slots_N], route_offsets_T=route_offsets_T)


def _sum_routes(rows_ND: torch.Tensor, plan: DispatchPlan,
                weights_N: torch.Tensor | None = None) -> torch.Tensor:
    """x_TD: for each token, the sum of its kept routes' rows (weighted, in route order)."""
    return F.embedding_bag(plan.route_rows_N, rows_ND, plan.route_offsets_T, mode="sum",
                           per_sample_weights=weights_N)


class _Permute(torch.autograd.Function):
    """A gather whose backward sums each token's route gradients in one pass, instead of
    index_select's scatter-add, which is slower on CPU and order-dependent on GPU."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        ctx.plan = plan
        return x_TD.index_select(0, plan.token_ids_N)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        return _sum_routes(grad_ND, ctx.plan), None


def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x_ND: each kept route's token, grouped by expert."""
    return _Permute.apply(x_TD, plan)


class _Combine(torch.autograd.Function):
    """Each token's weighted sum of its routes' expert outputs. The backward gathers each row's
    token gradient once (whatever the incoming gradient's layout, a stride-0 one from
    ``.sum().backward()`` included), takes the gate weights' gradient from it as one dot
    product per row, then scales it in place by the row's gate weight."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan):
        ctx.plan = plan
        ctx.save_for_backward(y_ND, weights_TK)
        return _sum_routes(y_ND, plan, weights_TK.flatten().index_select(0, plan.route_slots_N))

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        y_ND, weights_TK = ctx.saved_tensors
        plan = ctx.plan
        grad_ND = grad_TD.index_select(0, plan.token_ids_N)
        grad_weights_TK = None
        if ctx.needs_input_grad[1]:
            per_row_N = torch.linalg.vecdot(y_ND, grad_ND)
            grad_weights_TK = per_row_N.new_zeros(weights_TK.numel()).index_copy_(
                0, plan.slots_N, per_row_N).view_as(weights_TK)
        grad_y_ND = None
        if ctx.needs_input_grad[0]:
            weight_N1 = weights_TK.flatten().index_select(0, plan.slots_N).unsqueeze(1)
            grad_y_ND = grad_ND.mul_(weight_N1)
        return grad_y_ND, grad_weights_TK, None


def unpermute(y_ND: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """y_TD = sum over a token's kept routes of weight * expert output."""
    return _Combine.apply(y_ND, weights_TK.to(y_ND.dtype), plan)


class LocalDispatcher:
    """The dispatch step of one process: every expert is here.

    ``run(x_TD, expert_ids_TK, keep_TK, weights_TK, experts)`` permutes the kept routes'
    rows by expert, computes them with ``experts`` and brings the outputs back to their tokens,
    weighted; it returns ``(y_TD, plan)``. Expert parallelism replaces this object
    (``moekit.parallel.expert_parallel.AllToAllDispatcher``), nothing else in the layer.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def run(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None,
            weights_TK: torch.Tensor, experts) -> tuple[torch.Tensor, DispatchPlan]:
        plan = plan_dispatch(expert_ids_TK, keep_TK, self.num_experts)
        y_ND = experts(permute(x_TD, plan), plan.tokens_per_expert_E)
        return unpermute(y_ND, weights_TK, plan), plan
