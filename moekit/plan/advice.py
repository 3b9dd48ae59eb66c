"""Upcycle or train from scratch? Skywork-MoE's rule.

With C_dense the compute that trained the dense model and C_moe the compute planned for the MoE:
train from scratch when C_moe >= 2 * C_dense, otherwise upcycle the dense checkpoint. (A top-2 MoE
costs about 1.7x the dense FLOPs per token, so a budget of 2x C_dense is roughly enough to
re-learn what the dense model knows.) The ratio is reported beside the advice.

``upcycle_or_scratch`` is the one place the two budgets are counted (``moekit upcycle`` and
``moekit plan --upcycle`` both call it): model FLOPs per token, 6 (N + V D) + attention
(moekit.plan.flops, the MFU numerator), times tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from moekit.config import ModelConfig
from moekit.plan.flops import training_flops_per_token

SCRATCH_RATIO = 2.0


@dataclass(frozen=True)
class UpcycleAdvice:
    recommendation: str  # "upcycle" or "scratch"
    budget_ratio: float  # C_moe / C_dense
    reason: str
    dense_training_flops: float  # C_dense
    moe_training_flops: float  # C_moe


def upcycle_advice(dense_training_flops: float, moe_training_flops: float) -> UpcycleAdvice:
    for name, value in (("dense_training_flops", dense_training_flops),
                        ("moe_training_flops", moe_training_flops)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}={value!r} is not allowed: expected a number of FLOPs > 0")
    ratio = moe_training_flops / dense_training_flops
    budgets = (dense_training_flops, moe_training_flops)
    if ratio >= SCRATCH_RATIO:
        return UpcycleAdvice("scratch", ratio,
                             f"the MoE budget is {ratio:.2f}x the dense model's training compute "
                             f"(>= {SCRATCH_RATIO:g}x): train from scratch (Skywork-MoE)", *budgets)
    return UpcycleAdvice("upcycle", ratio,
                         f"the MoE budget is {ratio:.2f}x the dense model's training compute "
                         f"(< {SCRATCH_RATIO:g}x): upcycle the dense checkpoint (Skywork-MoE)",
                         *budgets)


def upcycle_or_scratch(dense: ModelConfig, moe: ModelConfig, dense_tokens: float,
                       moe_tokens: float, seq_len: int | None = None) -> UpcycleAdvice:
    """The advice for training ``moe`` on ``moe_tokens`` tokens, given ``dense`` trained on
    ``dense_tokens``; FLOPs per token at ``seq_len`` (default: the MoE model's context)."""
    for name, value in (("dense_tokens", dense_tokens), ("moe_tokens", moe_tokens)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}={value!r} is not allowed: expected a number of tokens > 0")
    seq_len = seq_len or moe.max_seq_len
    return upcycle_advice(training_flops_per_token(dense, seq_len).model_flops * dense_tokens,
                          training_flops_per_token(moe, seq_len).model_flops * moe_tokens)
