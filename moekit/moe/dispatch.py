"""Token permutation: sort routes by expert, hand the experts one contiguous block each, and
bring their outputs back weighted by the gate.

Legend: T tokens, D model dim, K routes per token, E experts, N kept routes (N <= T * K).

This is the one step an expert-parallel layout replaces (permute, all-to-all, compute, all-to-all
back, un-permute); everything it needs is in :class:`DispatchPlan`.
Deterministic by construction: a stable sort, a gather forward, and the combine is a per-token
weighted sum (a batched matmul), never an order-dependent scatter-add; the permutation's backward
is the same slot-order gather followed by a sum over each token's K routes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """Where each kept route goes. Rows of the permuted buffer are grouped by expert.

    slots_N: for each permuted row, its flat route index t * K + k.
    token_ids_N: for each permuted row, the token it carries (slots_N // K).
    tokens_per_expert_E: rows per expert, in expert order (int64).
    num_tokens, top_k: T and K.
    all_kept: no route was dropped (then every slot is filled and no zero-fill is needed).
    inverse_S: when all_kept, for each flat route slot its row in the permuted buffer.
    """

    slots_N: torch.Tensor
    token_ids_N: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    num_tokens: int
    top_k: int
    all_kept: bool
    inverse_S: torch.Tensor | None = None


def plan_dispatch(expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None,
                  num_experts: int) -> DispatchPlan:
    """Sort the kept routes by expert (stable: within an expert, token order)."""
    num_tokens, top_k = expert_ids_TK.shape
    key_N = expert_ids_TK.flatten()
    if keep_TK is not None:
        key_N = torch.where(keep_TK.flatten(), key_N, num_experts)  # dropped routes sort last
    counts = torch.bincount(key_N, minlength=num_experts + 1)
    slots_N = torch.argsort(key_N, stable=True)
    all_kept = keep_TK is None or bool(counts[num_experts] == 0)
    inverse_S = None
    if all_kept:
        inverse_S = torch.empty_like(slots_N)
        inverse_S[slots_N] = torch.arange(len(slots_N), device=slots_N.device)
    else:
        slots_N = slots_N[: len(key_N) - int(counts[num_experts])]
    return DispatchPlan(slots_N=slots_N, token_ids_N=slots_N.div(top_k, rounding_mode="floor"),
                        tokens_per_expert_E=counts[:num_experts], num_tokens=num_tokens,
                        top_k=top_k, all_kept=all_kept, inverse_S=inverse_S)


def _slot_order(y_ND: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """y_TKD: the permuted rows back in route order (t, k); zero rows for dropped routes."""
    if plan.all_kept:
        y_SD = y_ND.index_select(0, plan.inverse_S)
    else:
        y_SD = y_ND.new_zeros(plan.num_tokens * plan.top_k, y_ND.shape[-1]).index_copy(
            0, plan.slots_N, y_ND)
    return y_SD.view(plan.num_tokens, plan.top_k, y_ND.shape[-1])


class _Permute(torch.autograd.Function):
    """A gather whose backward sums each token's K route gradients (a gather and a sum) instead
    of index_select's scatter-add, which is slower on CPU and order-dependent on GPU."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        ctx.plan = plan
        return x_TD.index_select(0, plan.token_ids_N)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        return _slot_order(grad_ND, ctx.plan).sum(1), None


def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x_ND: each kept route's token, grouped by expert."""
    return _Permute.apply(x_TD, plan)


class _Combine(torch.autograd.Function):
    """Each token's weighted sum of its routes' expert outputs. The backward gathers each row's
    token gradient and scales it by the row's gate weight (one pass over the rows), whatever the
    incoming gradient's layout: bmm's own backward copies batch by batch when handed the
    stride-0 gradient that ``.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan):
        y_TKD = _slot_order(y_ND, plan)
        ctx.plan = plan
        ctx.save_for_backward(y_TKD, weights_TK)
        return torch.bmm(weights_TK.unsqueeze(1), y_TKD).squeeze(1)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        y_TKD, weights_TK = ctx.saved_tensors
        plan = ctx.plan
        grad_TD = grad_TD.contiguous()
        grad_y_ND = grad_weights_TK = None
        if ctx.needs_input_grad[0]:
            weight_N1 = weights_TK.flatten().index_select(0, plan.slots_N).unsqueeze(1)
            grad_y_ND = grad_TD.index_select(0, plan.token_ids_N) * weight_N1
        if ctx.needs_input_grad[1]:
            grad_weights_TK = torch.bmm(y_TKD, grad_TD.unsqueeze(2)).squeeze(2)
        return grad_y_ND, grad_weights_TK, None


def unpermute(y_ND: torch.Tensor, weights_TK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """y_TD = sum over a token's kept routes of weight * expert output."""
    return _Combine.apply(y_ND, weights_TK.to(y_ND.dtype), plan)
