"""Multi-gate Mixture-of-Experts (MMoE, Ma et al., KDD 2018): experts shared by several tasks,
one dense softmax gate per task, one tower per task.

Legend: T tokens (examples), D model dim, E experts.

For task k: f_k(x) = sum_e softmax(W_k x)_e * expert_e(x), and the task's output is
tower_k(f_k(x)). Every token goes to every expert (no top-k, no capacity): the gates only mix.
With one task it is the paper's one-gate MoE ("OMoE").
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from moekit.config import MoEConfig
from moekit.moe.experts import GroupedExperts
from moekit.moe.layer import MoEStats, check_hidden, health_sums


class MultiGateMoE(nn.Module):
    """MMoE over ``config``'s experts (its hidden_size, ffn_size, num_experts, activation).

    ``experts``: any experts module with the ``(x_ND, tokens_per_expert_E) -> y_ND`` interface
    (``GroupedExperts``, the default, or ``ModuleExperts``); ``towers``: one module per task
    (default: the identity, so that a task's output is its mixture of experts).
    ``forward(hidden, mask=None) -> (outputs, stats)``: one output per task and one
    :class:`MoEStats` per gate (its probabilities, entropy and max1/max2; no loss). Padded
    tokens (mask False) are not computed and their outputs are zero.
    """

    def __init__(self, config: MoEConfig, num_tasks: int, experts: nn.Module | None = None,
                 towers: Sequence[nn.Module] | None = None):
        super().__init__()
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"num_tasks={num_tasks!r} is not allowed: expected a positive "
                             "integer (one gate and one tower per task)")
        unused = [f"{name}={getattr(config, name)!r}" for name, default in
                  (("router", "softmax"), ("capacity_factor", None),
                   ("eval_capacity_factor", None), ("num_shared_experts", 0))
                  if getattr(config, name) != default]
        if unused:
            raise ValueError(f"MultiGateMoE's gates are dense softmax gates over all experts "
                             f"(no router choice, capacity or shared experts): drop "
                             f"{', '.join(unused)}")
        if towers is not None and len(towers) != num_tasks:
            raise ValueError(f"towers has {len(towers)} modules for num_tasks={num_tasks}: give "
                             "one per task")
        self.config = config
        self.experts = experts if experts is not None else GroupedExperts(
            config.num_experts, config.hidden_size, config.ffn_size, config.activation)
        if getattr(self.experts, "num_experts", config.num_experts) != config.num_experts:
            raise ValueError(f"experts has num_experts={self.experts.num_experts}, the config "
                             f"num_experts={config.num_experts}; they must agree")
        self.gates = nn.ModuleList(nn.Linear(config.hidden_size, config.num_experts, bias=False)
                                   for _ in range(num_tasks))
        self.towers = nn.ModuleList(towers if towers is not None
                                    else [nn.Identity() for _ in range(num_tasks)])

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None):
        check_hidden(hidden, mask, self.config.hidden_size)
        x_TD = hidden.reshape(-1, hidden.shape[-1])
        valid_rows = None
        if mask is not None:
            valid_rows = mask.reshape(-1).nonzero().squeeze(1)
            x_TD = x_TD.index_select(0, valid_rows)
        num_tokens, num_experts = len(x_TD), self.config.num_experts
        # Every expert computes every token: E blocks of the same T rows.
        per_expert_E = torch.full((num_experts,), num_tokens, dtype=torch.long,
                                  device=x_TD.device)
        y_ETD = self.experts(x_TD.repeat(num_experts, 1), per_expert_E).view(
            num_experts, num_tokens, -1)
        outputs, stats = [], []
        for gate, tower in zip(self.gates, self.towers):
            probs_TE = gate(x_TD).float().softmax(-1)
            mixed_TD = torch.einsum("te,etd->td", probs_TE.to(y_ETD.dtype), y_ETD)
            out = tower(mixed_TD)
            if valid_rows is not None:
                out = out.new_zeros(hidden.numel() // hidden.shape[-1], *out.shape[1:]).index_copy(
                    0, valid_rows, out)
            outputs.append(out.view(*hidden.shape[:-1], *out.shape[1:]))
            stats.append(_dense_gate_stats(probs_TE, per_expert_E))
        return outputs, stats


def _dense_gate_stats(probs_TE: torch.Tensor, per_expert_E: torch.Tensor) -> MoEStats:
    """A dense gate's statistics: every token reaches all E experts, nothing is dropped, and
    there is no loss."""
    num_tokens, num_experts = probs_TE.shape
    entropy, ratio12, ratio23 = health_sums(probs_TE)
    zero = probs_TE.new_zeros(())
    return MoEStats(num_tokens=num_tokens, top_k=num_experts, routed_per_expert_E=per_expert_E,
                    tokens_per_expert_E=per_expert_E, prob_sum_E=probs_TE.sum(0), z_sum=None,
                    overflowed=0, dropped=0, entropy_sum=entropy, top1_over_top2_sum=ratio12,
                    top2_over_top3_sum=ratio23, aux_loss=zero, z_loss=zero, aux_coef=0.0,
                    router_loss=zero)
