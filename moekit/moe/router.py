"""Gates (routers): which experts each token goes to, and with what weight.

Shape legend, used throughout moekit.moe: T tokens, D model dim, E experts, K experts per token.

Every gate, built-in or a user's own, is an ``nn.Module`` that subclasses :class:`Gate` and maps
``x_TD`` (the valid tokens only: padding never reaches a gate) to a :class:`Routing`. That is the
whole interface; the layer does the rest (capacity, dispatch, statistics, losses).

A user's gate::

    class HashGate(Gate):  # token i always goes to expert i % E, weight 1
        def forward(self, x_TD):
            ids_TK = torch.arange(len(x_TD), device=x_TD.device).remainder(self.num_experts)[:, None]
            return Routing(expert_ids_TK=ids_TK, weights_TK=torch.ones_like(ids_TK, dtype=x_TD.dtype))

    layer = MoELayer(config, router=HashGate(num_experts=config.num_experts, top_k=1))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moekit.config import MoEConfig

LOGIT_NORM_EPS = 1e-6


@dataclass
class Routing:
    """What a gate decided for T tokens.

    expert_ids_TK: int64 expert index of each of a token's K routes.
    weights_TK: the weight each route's expert output is multiplied by (differentiable).
    probs_TE: the router's full distribution over experts, if it has one; it feeds the
        load-balancing loss and the router statistics (entropy, max1/max2, max2/max3).
    logits_TE: the logits that went into the softmax, if any; they feed the z-loss.
    keep_TK: False marks a route the gate itself dropped (a gate with its own capacity rule).
    aux_loss: a loss of the gate's own, added to the layer's router loss as it is.
    """

    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    probs_TE: torch.Tensor | None = None
    logits_TE: torch.Tensor | None = None
    keep_TK: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class Gate(nn.Module):
    """Base class of every gate. Subclasses implement ``forward(x_TD) -> Routing``.

    A gate may also override :meth:`observe_load`, which the layer calls after each training
    forward with the number of routes each expert received (before capacity); a gate that runs
    collectives (a global capacity, say) keeps its process group as an attribute of its own.
    """

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k

    def observe_load(self, routed_per_expert_E: torch.Tensor) -> None:
        """Called in training after each forward; the default does nothing."""


class LinearGate(Gate):
    """Shared base of the built-in gates: a bias-free linear map to one logit per expert, with
    optional multiplicative input jitter in training and Skywork's gating-logit normalization."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 logit_norm_scale: float | None = None, jitter: float = 0.0):
        super().__init__(num_experts, top_k)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)
        self.logit_norm_scale = logit_norm_scale
        self.jitter = jitter

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        # Routing decisions are made in at least fp32, even for bf16 activations (as Mixtral).
        logits_TE = F.linear(x_TD, self.weight)
        logits_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))
        if self.logit_norm_scale is not None:
            # Skywork-MoE: z' = lambda * (z - mean z) / std z, population std over the experts.
            mean_T1 = logits_TE.mean(-1, keepdim=True)
            std_T1 = logits_TE.std(-1, keepdim=True, correction=0)
            logits_TE = self.logit_norm_scale * (logits_TE - mean_T1) / (std_T1 + LOGIT_NORM_EPS)
        return logits_TE


class SoftmaxTopKGate(LinearGate):
    """Softmax over all experts, then the top K; with ``normalize_weights`` the K weights are
    rescaled to sum to 1 (Mixtral, Skywork-MoE), without it they are the raw probabilities
    (Switch Transformer's top-1, Qwen2-MoE's default)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 normalize_weights: bool = True, **kwargs):
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        self.normalize_weights = normalize_weights

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        weights_TK, expert_ids_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize_weights:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return Routing(expert_ids_TK, weights_TK, probs_TE=probs_TE, logits_TE=logits_TE)


class SigmoidBiasGate(LinearGate):
    """DeepSeek-V3's auxiliary-loss-free balancing: scores s = sigmoid(z); the top K are chosen
    by s + b, where b is a per-expert bias that is not trained by gradients but nudged after each
    training forward (b_i += rate * sign(mean load - load_i)); the weights come from s alone."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 normalize_weights: bool = True, bias_update_rate: float = 1e-3, **kwargs):
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        self.normalize_weights = normalize_weights
        self.bias_update_rate = bias_update_rate
        self.register_buffer("balance_bias", torch.zeros(num_experts))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        expert_ids_TK = (scores_TE.detach() + self.balance_bias).topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(-1, expert_ids_TK)
        if self.normalize_weights:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        # The scores normalised per token serve as the distribution for statistics and losses.
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        return Routing(expert_ids_TK, weights_TK, probs_TE=probs_TE, logits_TE=logits_TE)

    @torch.no_grad()
    def observe_load(self, routed_per_expert_E: torch.Tensor) -> None:
        load_E = routed_per_expert_E.float()
        self.balance_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)


def build_gate(config: MoEConfig) -> Gate:
    """The built-in gate that ``config.router`` names."""
    common = dict(logit_norm_scale=config.logit_norm_scale, jitter=config.jitter)
    if config.router == "sigmoid":
        return SigmoidBiasGate(config.hidden_size, config.num_experts, config.top_k,
                               normalize_weights=config.normalize_weights,
                               bias_update_rate=config.bias_update_rate, **common)
    # Switch Transformer: top-1, and the gate value is the probability itself.
    normalize = config.normalize_weights and config.router == "softmax"
    return SoftmaxTopKGate(config.hidden_size, config.num_experts, config.top_k,
                           normalize_weights=normalize, **common)
