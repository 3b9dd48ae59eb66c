"""Hunyuan-Large's MoE scaling law: C = 9.59 N D + 2.3e8 D.

C is training compute in FLOPs, N the active parameters (without embeddings), D training tokens.
9.59 in place of the dense 6 holds the routing overhead; the constant 2.3e8 FLOPs per token
holds long-sequence attention. Hunyuan's IsoFLOP curves put the optimal N at about 58.1B (it
chose 52B); the planner quotes that optimum as published and does not derive it.
"""
from __future__ import annotations

from dataclasses import dataclass

from moekit.plan.units import require_positive

FLOPS_PER_PARAM_TOKEN = 9.59
FLOPS_PER_TOKEN = 2.3e8
PUBLISHED_OPTIMAL_ACTIVE_PARAMS = 58.1e9  # Hunyuan-Large report (arXiv 2411.02265), quoted


def hunyuan_flops_per_token(active_params: float) -> float:
    return FLOPS_PER_PARAM_TOKEN * active_params + FLOPS_PER_TOKEN


def hunyuan_compute(active_params: float, tokens: float) -> float:
    """C for training N active parameters on D tokens."""
    require_positive("active_params", active_params)
    require_positive("tokens", tokens)
    return hunyuan_flops_per_token(active_params) * tokens


def tokens_for_budget(budget_flops: float, active_params: float) -> float:
    """D such that C(N, D) equals the budget."""
    require_positive("budget_flops", budget_flops)
    require_positive("active_params", active_params)
    return budget_flops / hunyuan_flops_per_token(active_params)


def active_params_for_budget(budget_flops: float, tokens: float) -> float:
    """N such that C(N, D) equals the budget."""
    require_positive("budget_flops", budget_flops)
    require_positive("tokens", tokens)
    per_token = budget_flops / tokens
    if per_token <= FLOPS_PER_TOKEN:
        raise ValueError(f"budget_flops={budget_flops:g} is not allowed for tokens={tokens:g}: "
                         f"the fit spends {FLOPS_PER_TOKEN:g} FLOPs per token on attention alone, "
                         f"so the budget must exceed {FLOPS_PER_TOKEN * tokens:g}")
    return (per_token - FLOPS_PER_TOKEN) / FLOPS_PER_PARAM_TOKEN


@dataclass(frozen=True)
class BudgetPlan:
    """What a compute budget buys under the fit."""

    budget_flops: float
    active_params: float  # the model's N
    tokens: float  # D for the model's N
    published_optimal_active_params: float
    tokens_at_published_optimum: float


def budget_plan(budget_flops: float, active_params: float) -> BudgetPlan:
    return BudgetPlan(budget_flops, active_params, tokens_for_budget(budget_flops, active_params),
                      PUBLISHED_OPTIMAL_ACTIVE_PARAMS,
                      tokens_for_budget(budget_flops, PUBLISHED_OPTIMAL_ACTIVE_PARAMS))
