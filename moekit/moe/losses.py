"""Router losses, formed from raw per-expert sums so that they can be formed over one forward,
a whole step of micro-batches, or all data-parallel ranks alike (sum the raw sums, then call).

Legend: E experts, K routes per token, T valid tokens.
- routed_per_expert_E: routes each expert was chosen for (before capacity), no gradient;
- prob_sum_E: the router probabilities summed over the valid tokens (carries the gradient);
- z_sum: sum over the valid tokens of logsumexp(logits)^2 (carries the gradient).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def switch_balance_loss(routed_per_expert_E: torch.Tensor, prob_sum_E: torch.Tensor,
                        num_tokens, top_k: int) -> torch.Tensor:
    """Switch/GShard load-balancing loss E * sum_i f_i * P_i, with f_i the fraction of the
    routes that chose expert i and P_i its mean router probability. It is 1 under perfectly
    uniform routing for any K (Hugging Face's load_balancing_loss_func equals K times this)."""
    num_experts = prob_sum_E.shape[-1]
    fraction_E = routed_per_expert_E.to(prob_sum_E.dtype) / (top_k * num_tokens)
    return num_experts * (fraction_E * prob_sum_E / num_tokens).sum()


def skywork_balance_loss(prob_sum_E: torch.Tensor, num_tokens) -> torch.Tensor:
    """Skywork-MoE's form: sum_i (1/E - mean_over_tokens(g_i))^2; 0 when balanced."""
    num_experts = prob_sum_E.shape[-1]
    return ((1.0 / num_experts - prob_sum_E / num_tokens) ** 2).sum()


def router_z_loss(z_sum: torch.Tensor, num_tokens) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2, keeps router logits small."""
    return z_sum / num_tokens


class AdaptiveAuxCoefficient(nn.Module):
    """Skywork-MoE's adaptive auxiliary-loss coefficient, one per MoE layer.

    From the layer's drop rate d: alpha_hat = min(xi * d, alpha_max);
    alpha <- beta * alpha + (1 - beta) * alpha_hat. A layer that drops many tokens thus gets a
    stronger balancing loss and one that drops none a weaker one. The value is a buffer, so it
    is saved in checkpoints and a resumed run continues exactly.
    """

    def __init__(self, initial: float, xi: float = 0.2, alpha_max: float = 1e-2,
                 beta: float = 0.99):
        super().__init__()
        self.xi, self.alpha_max, self.beta = xi, alpha_max, beta
        self.register_buffer("value", torch.tensor(float(initial), dtype=torch.float64))

    @torch.no_grad()
    def update(self, drop_rate: float | torch.Tensor) -> None:
        target = min(self.xi * float(drop_rate), self.alpha_max)
        self.value.mul_(self.beta).add_((1 - self.beta) * target)
