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

The built-in gates are written against the same interface and chosen by name
(``MoEConfig.router``, options in ``MoEConfig.router_options``) from :data:`GATES`. The layer
checks every Routing's shapes and dtypes; for a gate that is not built in it also checks that the
ids are in range and the weights finite (device reads, which the built-in gates skip).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from moekit.config import MoEConfig
from moekit.moe.assignment import balanced_assignment, sinkhorn
from moekit.moe.dispatch import count_per_expert
from moekit.moe.losses import switch_balance_loss
from moekit.moe.route_groups import RouteGroups, StepQueues, capacity_keep

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
    over_capacity_TK: set by a gate that applies a capacity rule of its own (already False in
        keep_TK): the routes it dropped for capacity. The layer then applies no capacity of its
        own, and counts these as overflowed (recycling them if ``MoEConfig.overflow`` says so).
    input_weights_T: the weight of each token's own input in the layer's output, which then is
        sum_k weights_TK * expert output + input_weights_T * x (BASE layers mix
        sigmoid(x . c_e) * E_e(x) + (1 - sigmoid(x . c_e)) * x); None adds nothing.
    """

    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    probs_TE: torch.Tensor | None = None
    logits_TE: torch.Tensor | None = None
    keep_TK: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    over_capacity_TK: torch.Tensor | None = None
    input_weights_T: torch.Tensor | None = None


class Gate(nn.Module):
    """Base class of every gate. Subclasses implement ``forward(x_TD) -> Routing``.

    A gate may also override :meth:`observe_load`, which the layer calls once per optimizer
    step with the number of routes each expert received in it (before capacity). A gate that
    runs collectives (a global capacity, say) finds the ranks it routes over in
    ``route_groups`` (a :class:`moekit.moe.route_groups.RouteGroups`, which
    ``moekit.parallel.parallelize`` sets; None on one process).
    """

    route_groups: RouteGroups | None = None
    # capacity_scope="step": set by the training step's capacity pre-pass, for its forwards.
    step_queues: StepQueues | None = None

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k

    def observe_load(self, routed_per_expert_E: torch.Tensor) -> None:
        """Called once per optimizer step (``MoELayer.update_router_state``); the default does
        nothing."""


class LinearGate(Gate):
    """Shared base of the built-in gates: a linear map to one logit per expert (bias-free unless
    ``bias``: FastMoE's gates have one), with optional multiplicative input jitter in training
    and Skywork's gating-logit normalization."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 logit_norm_scale: float | None = None, jitter: float = 0.0, bias: bool = False):
        super().__init__(num_experts, top_k)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        self.logit_norm_scale = logit_norm_scale
        self.jitter = jitter

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        # Routing decisions are made in at least fp32, even for bf16 activations (as Mixtral).
        logits_TE = _at_least_fp32(F.linear(x_TD, self.weight, self.bias))
        if self.logit_norm_scale is not None:
            # Skywork-MoE: z' = lambda * (z - mean z) / std z, population std over the experts.
            mean_T1 = logits_TE.mean(-1, keepdim=True)
            std_T1 = logits_TE.std(-1, keepdim=True, correction=0)
            logits_TE = self.logit_norm_scale * (logits_TE - mean_T1) / (std_T1 + LOGIT_NORM_EPS)
        return logits_TE


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass(frozen=True)
class GroupLimit:
    """Group-limited routing (DeepSeek-V2/V3): the E experts form ``n_group`` groups of
    consecutive experts; each token may only choose among the experts of its ``topk_group``
    best groups. A group's score is the largest of its experts' scores (``"max"``, V2) or the
    sum of its two largest (``"top2_sum"``, V3). ``n_group=1``: no limit."""

    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"

    def eligible(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """The bool mask [T, E] of the experts in each token's best groups."""
        grouped_TGM = scores_TE.view(len(scores_TE), self.n_group, -1)  # M experts per group
        group_TG = (grouped_TGM.max(-1).values if self.group_score == "max"
                    else grouped_TGM.topk(2, dim=-1).values.sum(-1))
        best_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(
            1, group_TG.topk(self.topk_group, dim=-1).indices, True)
        return best_TG[:, :, None].expand_as(grouped_TGM).reshape_as(scores_TE)


def top_k_within_groups(choice_TE: torch.Tensor, top_k: int, limit: GroupLimit) -> torch.Tensor:
    """The ids [T, K] of each token's K best experts by ``choice_TE`` among the eligible ones."""
    if limit.n_group == 1:
        return choice_TE.topk(top_k, dim=-1).indices
    eligible_TE = limit.eligible(choice_TE)
    return choice_TE.masked_fill(~eligible_TE, -torch.inf).topk(top_k, dim=-1).indices


class SoftmaxTopKGate(LinearGate):
    """Softmax over all experts, then the top K (among the experts ``group_limit`` leaves
    eligible); with ``normalize_weights`` the K weights are rescaled to sum to 1 (Mixtral,
    Skywork-MoE), without it they are the raw probabilities (Switch Transformer's top-1,
    Qwen2-MoE's default); then multiplied by ``routed_scaling_factor`` (DeepSeek)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 normalize_weights: bool = True, group_limit: GroupLimit = GroupLimit(),
                 routed_scaling_factor: float = 1.0, **kwargs):
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        self.normalize_weights = normalize_weights
        self.group_limit = group_limit
        self.routed_scaling_factor = routed_scaling_factor

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        expert_ids_TK = top_k_within_groups(probs_TE.detach(), self.top_k, self.group_limit)
        weights_TK = _scaled(probs_TE.gather(-1, expert_ids_TK), self.normalize_weights,
                             self.routed_scaling_factor)
        return Routing(expert_ids_TK, weights_TK, probs_TE=probs_TE, logits_TE=logits_TE)


def _scaled(weights_TK: torch.Tensor, normalize: bool, factor: float) -> torch.Tensor:
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return weights_TK * factor if factor != 1.0 else weights_TK


class SigmoidBiasGate(LinearGate):
    """DeepSeek-V3's auxiliary-loss-free balancing: scores s = sigmoid(z); the top K are chosen
    by s + b (and the groups of ``group_limit`` scored by it), where b is a per-expert bias
    that is not trained by gradients but nudged once per optimizer step (b_i += rate *
    sign(mean load - load_i)): V3's ``e_score_correction_bias``. The weights come from s alone
    (renormalised with ``normalize_weights``), times ``routed_scaling_factor``."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 normalize_weights: bool = True, bias_update_rate: float = 1e-3,
                 group_limit: GroupLimit = GroupLimit(), routed_scaling_factor: float = 1.0,
                 **kwargs):
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        self.normalize_weights = normalize_weights
        self.bias_update_rate = bias_update_rate
        self.group_limit = group_limit
        self.routed_scaling_factor = routed_scaling_factor
        self.register_buffer("balance_bias", torch.zeros(num_experts))

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        expert_ids_TK = top_k_within_groups(scores_TE.detach() + self.balance_bias, self.top_k,
                                            self.group_limit)
        weights_TK = _scaled(scores_TE.gather(-1, expert_ids_TK), self.normalize_weights,
                             self.routed_scaling_factor)
        # The scores normalised per token serve as the distribution for statistics and losses.
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        return Routing(expert_ids_TK, weights_TK, probs_TE=probs_TE, logits_TE=logits_TE)

    @torch.no_grad()
    def observe_load(self, routed_per_expert_E: torch.Tensor) -> None:
        load_E = routed_per_expert_E.float()
        self.balance_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)


class ZeroGate(Gate):
    """FastMoE's ZeroGate: every route goes to expert 0 with weight 1/K (a baseline, and a test
    of the plumbing)."""

    def forward(self, x_TD: torch.Tensor) -> Routing:
        expert_ids_TK = torch.zeros(len(x_TD), self.top_k, dtype=torch.long, device=x_TD.device)
        weights_TK = torch.full((len(x_TD), self.top_k), 1 / self.top_k, device=x_TD.device,
                                dtype=torch.promote_types(x_TD.dtype, torch.float32))
        return Routing(expert_ids_TK, weights_TK)


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """The squared coefficient of variation, var / mean^2, with the population variance (as the
    sparsely-gated MoE paper's own code; FastMoE's takes the unbiased one, E / (E - 1) times
    larger). 0 for a single expert."""
    if len(x_E) < 2:
        return x_E.new_zeros(())
    return x_E.var(correction=0) / (x_E.mean() ** 2 + 1e-10)


def smooth_load(clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor,
                top_k: int) -> torch.Tensor:
    """The sparsely-gated MoE paper's differentiable load: for each expert i, the sum over tokens
    of P(x, i) = Phi((clean_i - kth_excluding(noisy, k, i)) / std_i), the probability that
    expert i stays in the token's top K when only its own noise is drawn again. The k-th largest
    of the other experts' noisy logits is the (k+1)-th largest overall if i is in the top K, the
    k-th largest otherwise. Needs K < E."""
    top_TJ = noisy_TE.topk(top_k + 1, dim=-1).values  # J = K + 1
    threshold_if_in_T1, threshold_if_out_T1 = top_TJ[:, top_k:], top_TJ[:, top_k - 1:top_k]
    is_in_TE = noisy_TE > threshold_if_in_T1
    threshold_TE = torch.where(is_in_TE, threshold_if_in_T1, threshold_if_out_T1)
    # ndtr is Phi; torch.distributions.Normal would check its arguments with a device read.
    return torch.special.ndtr((clean_TE - threshold_TE) / noise_std_TE).sum(0)


class NoisyTopKGate(LinearGate):
    """The sparsely-gated MoE layer (Shazeer et al., 2017): in training H = x W_g +
    N(0, 1) * (softplus(x W_noise) + noise_epsilon), in evaluation H = x W_g; the weights are
    softmax over the top K of H. Its own loss is importance_weight * CV(importance)^2 +
    load_weight * CV(load)^2, importance the summed gate values per expert and load the smooth
    estimate of :func:`smooth_load` (the hard count of routes in evaluation, or when K = E)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 noise_epsilon: float = 0.0, importance_weight: float = 0.1,
                 load_weight: float = 0.1, **kwargs):
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        # Zero, as the paper: the noise starts the same for every expert, softplus(0) = log 2.
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.noise_epsilon = noise_epsilon
        self.importance_weight = importance_weight
        self.load_weight = load_weight

    def forward(self, x_TD: torch.Tensor) -> Routing:
        clean_TE = self.logits(x_TD)
        noisy_TE = clean_TE
        if self.training:
            noise_std_TE = (F.softplus(_at_least_fp32(F.linear(x_TD, self.noise_weight)))
                            + self.noise_epsilon)
            noisy_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
        top_logits_TK, expert_ids_TK = noisy_TE.topk(self.top_k, dim=-1)
        weights_TK = top_logits_TK.softmax(-1)
        gates_TE = torch.zeros_like(noisy_TE).scatter(-1, expert_ids_TK, weights_TK)
        if self.training and self.top_k < self.num_experts:
            load_E = smooth_load(clean_TE, noisy_TE, noise_std_TE, self.top_k)
        else:
            load_E = (gates_TE > 0).sum(0).to(gates_TE.dtype)
        aux_loss = (self.importance_weight * cv_squared(gates_TE.sum(0))
                    + self.load_weight * cv_squared(load_E))
        return Routing(expert_ids_TK, weights_TK, probs_TE=noisy_TE.softmax(-1),
                       logits_TE=noisy_TE, aux_loss=aux_loss)


# FastMoE's NoisyGate: 0.01 added to the noise std, both loss terms weighed 1.
FASTMOE_NOISY_OPTIONS = {"noise_epsilon": 0.01, "importance_weight": 1.0, "load_weight": 1.0}


class GShardGate(LinearGate):
    """GShard's top-2 gate (Lepikhin et al., 2020). g1, g2 are the two largest softmax
    probabilities, renormalised to sum to 1. In training the second expert is kept only if
    U(0, 1) < 2 * g2, drawn before capacity, so that a discarded second choice takes no slot.
    Capacity ceil(factor * 2 * T / E), the layer's train or eval factor, is filled choice-major:
    every first choice before any second. Its own loss is balance_weight times the Switch form
    E * sum_i c_i * m_i over first choices only (c_i their share, m_i the mean probability);
    FastMoE's mean(c * m) * E^2 is the same number."""

    def __init__(self, hidden_size: int, num_experts: int, *,
                 capacity_factor: float | None = None, eval_capacity_factor: float | None = None,
                 balance_weight: float = 1e-2, random_routing: bool = True,
                 capacity_scope: str = "local", **kwargs):
        super().__init__(hidden_size, num_experts, 2, **kwargs)
        self.capacity_scope = capacity_scope
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.balance_weight = balance_weight
        self.random_routing = random_routing

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        top_TK, expert_ids_TK = probs_TE.topk(2, dim=-1)
        weights_TK = top_TK / top_TK.sum(-1, keepdim=True)
        keep_TK = over_capacity_TK = None  # None: every route kept, nothing to count on the host
        if self.training and self.random_routing:
            keep_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
            keep_TK[:, 1] = torch.rand_like(weights_TK[:, 1]) < 2 * weights_TK[:, 1].detach()
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is not None:
            if keep_TK is None:
                keep_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
            within_TK = capacity_keep(expert_ids_TK, keep_TK, factor, self.num_experts,
                                      self.capacity_scope, self.route_groups, priority="choice",
                                      queues=self.step_queues)
            keep_TK, over_capacity_TK = within_TK, keep_TK & ~within_TK
        first_choices_E = count_per_expert(expert_ids_TK[:, 0], self.num_experts)
        aux_loss = self.balance_weight * switch_balance_loss(
            first_choices_E, probs_TE.sum(0), max(len(x_TD), 1), top_k=1)
        return Routing(expert_ids_TK, weights_TK, probs_TE=probs_TE, logits_TE=logits_TE,
                       keep_TK=keep_TK, aux_loss=aux_loss, over_capacity_TK=over_capacity_TK)


# --- Balanced-assignment gates: BASE layers and S-BASE (Sinkhorn) ---------------------------

class BaseLayerGate(LinearGate):
    """BASE layers (Lewis et al., 2021): top-1 routing that balances by assignment, with no
    loss. The gate's weight rows are the experts' centroids c_e, the affinities s = x . c_e. In
    training the affinities (without gradient) go to the exact balanced assignment
    (``moe.assignment.balanced_assignment``: every expert floor(T / E) tokens, T mod E of them
    one more); in evaluation each token takes its best expert (greedy, as the paper). The output
    mixes the expert with the token's input: sigmoid(s_e) * E_e(x) + (1 - sigmoid(s_e)) * x
    (``Routing.input_weights_T``), which is where the centroids learn. Nothing is dropped in
    training (the assignment is its own capacity); in evaluation the layer's
    ``eval_capacity_factor`` applies as to any gate."""

    def __init__(self, hidden_size: int, num_experts: int, **kwargs):
        super().__init__(hidden_size, num_experts, 1, **kwargs)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        affinity_TE = self.logits(x_TD)
        over_capacity_TK = None
        if self.training:
            expert_ids_TK = balanced_assignment(affinity_TE)[:, None]
            over_capacity_TK = torch.zeros_like(expert_ids_TK, dtype=torch.bool)
        else:
            expert_ids_TK = affinity_TE.argmax(-1, keepdim=True)
        weights_TK = affinity_TE.gather(-1, expert_ids_TK).sigmoid()
        return Routing(expert_ids_TK, weights_TK, probs_TE=affinity_TE.detach().softmax(-1),
                       over_capacity_TK=over_capacity_TK, input_weights_T=1 - weights_TK[:, 0])


class SinkhornGate(LinearGate):
    """S-BASE, as Megatron-LM's ``sinkhorn`` load balancing: in training the top K are chosen
    from the Sinkhorn-balanced logits (``moe.assignment.sinkhorn``, without gradient), in
    evaluation from the logits themselves; the weights are sigmoid(z) of the chosen experts for
    K = 1 and their softmax probabilities otherwise. No loss: the balancing is the choice."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 tolerance: float = 1e-4, **kwargs):
        super().__init__(hidden_size, num_experts, top_k, **kwargs)
        self.tolerance = tolerance

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(-1)
        scores_TE = logits_TE.sigmoid() if self.top_k == 1 else probs_TE
        if self.training:
            with torch.no_grad():
                expert_ids_TK = sinkhorn(logits_TE, self.tolerance).topk(self.top_k, -1).indices
        else:
            expert_ids_TK = scores_TE.topk(self.top_k, dim=-1).indices
        return Routing(expert_ids_TK, scores_TE.gather(-1, expert_ids_TK), probs_TE=probs_TE,
                       logits_TE=logits_TE)

# --- end of the balanced-assignment gates ---------------------------------------------------


@dataclass(frozen=True)
class RegisteredGate:
    """A built-in gate: how to build it from a config and its options (name -> default)."""

    build: Callable[[MoEConfig, dict], Gate]
    options: dict


def _linear_options(config: MoEConfig, options: dict) -> dict:
    return dict(logit_norm_scale=config.logit_norm_scale, jitter=config.jitter,
                bias=options["bias"])


# The options of the top-k gates (softmax, switch, sigmoid) beyond the bias: group-limited
# routing and DeepSeek's scaling of the routed output.
TOP_K_OPTIONS = {"bias": False, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0}


def _top_k_options(config: MoEConfig, options: dict, group_score: str) -> dict:
    """The group limit and scaling factor of ``options``, checked against the config."""
    n_group, topk_group = options["n_group"], options["topk_group"]
    for name in ("n_group", "topk_group"):
        if not isinstance(options[name], int) or options[name] < 1:
            raise ValueError(f"router_options {name}={options[name]!r} is not allowed: "
                             "expected an integer >= 1")
    if config.num_experts % n_group:
        raise ValueError(f"router_options n_group={n_group} is not allowed: it must divide "
                         f"num_experts ({config.num_experts})")
    if topk_group > n_group:
        raise ValueError(f"router_options topk_group={topk_group} is not allowed: at most "
                         f"n_group ({n_group})")
    if config.top_k > topk_group * (config.num_experts // n_group):
        raise ValueError(f"top_k={config.top_k} is not allowed with router_options "
                         f"topk_group={topk_group} of n_group={n_group}: the eligible groups "
                         f"hold {topk_group * (config.num_experts // n_group)} experts")
    if group_score == "top2_sum" and n_group > 1 and config.num_experts // n_group < 2:
        raise ValueError(f"router_options n_group={n_group} is not allowed for the sigmoid "
                         "router: its group score sums each group's two best experts")
    if options["routed_scaling_factor"] <= 0:
        raise ValueError(f"router_options routed_scaling_factor="
                         f"{options['routed_scaling_factor']!r} is not allowed: expected a "
                         "number > 0")
    return dict(group_limit=GroupLimit(n_group, topk_group, group_score),
                routed_scaling_factor=float(options["routed_scaling_factor"]))


def _softmax(config: MoEConfig, options: dict) -> Gate:
    # Switch Transformer: top-1, and the gate value is the probability itself.
    normalize = config.normalize_weights and config.router == "softmax"
    return SoftmaxTopKGate(config.hidden_size, config.num_experts, config.top_k,
                           normalize_weights=normalize, **_top_k_options(config, options, "max"),
                           **_linear_options(config, options))


def _sigmoid(config: MoEConfig, options: dict) -> Gate:
    return SigmoidBiasGate(config.hidden_size, config.num_experts, config.top_k,
                           normalize_weights=config.normalize_weights,
                           bias_update_rate=config.bias_update_rate,
                           **_top_k_options(config, options, "top2_sum"),
                           **_linear_options(config, options))


def _noisy(config: MoEConfig, options: dict) -> Gate:
    return NoisyTopKGate(config.hidden_size, config.num_experts, config.top_k,
                         noise_epsilon=options["noise_epsilon"],
                         importance_weight=options["importance_weight"],
                         load_weight=options["load_weight"], **_linear_options(config, options))


def _gshard(config: MoEConfig, options: dict) -> Gate:
    return GShardGate(config.hidden_size, config.num_experts,
                      capacity_factor=config.capacity_factor,
                      eval_capacity_factor=config.eval_capacity_factor,
                      balance_weight=options["balance_weight"],
                      random_routing=options["random_routing"],
                      capacity_scope=config.capacity_scope, **_linear_options(config, options))


def _base(config: MoEConfig, options: dict) -> Gate:
    return BaseLayerGate(config.hidden_size, config.num_experts, **_linear_options(config, options))


def _sinkhorn(config: MoEConfig, options: dict) -> Gate:
    return SinkhornGate(config.hidden_size, config.num_experts, config.top_k,
                        tolerance=options["tolerance"], **_linear_options(config, options))


GATES = {
    # Group scores as DeepSeek defines them: V2's softmax gate by each group's best expert,
    # V3's sigmoid gate by the sum of each group's two best (bias included).
    "softmax": RegisteredGate(_softmax, TOP_K_OPTIONS),
    "switch": RegisteredGate(_softmax, TOP_K_OPTIONS),
    "sigmoid": RegisteredGate(_sigmoid, TOP_K_OPTIONS),
    "zero": RegisteredGate(lambda config, options: ZeroGate(config.num_experts, config.top_k), {}),
    "noisy": RegisteredGate(_noisy, {"bias": False, "noise_epsilon": 0.0,
                                     "importance_weight": 0.1, "load_weight": 0.1}),
    "gshard": RegisteredGate(_gshard, {"bias": False, "balance_weight": 1e-2,
                                       "random_routing": True}),
    # Balanced-assignment gates.
    "base": RegisteredGate(_base, {"bias": False}),
    "sinkhorn": RegisteredGate(_sinkhorn, {"bias": False, "tolerance": 1e-4}),
}
# Gates whose Routing the layer trusts without reading values back from the device.
BUILT_IN_GATES = (SoftmaxTopKGate, SigmoidBiasGate, ZeroGate, NoisyTopKGate, GShardGate,
                  BaseLayerGate, SinkhornGate)


def _checked_options(router: str, given: dict, defaults: dict) -> dict:
    """The gate's defaults updated with ``given``; an unknown name or a value of the wrong kind
    (every built-in option is a flag or a finite number >= 0) is refused."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"router_options {unknown} are not options of the {router!r} router; "
                         f"allowed: {sorted(defaults) or 'none'}")
    for name, value in given.items():
        if isinstance(defaults[name], bool):
            ok, wanted = isinstance(value, bool), "true or false"
        else:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and value >= 0)
            wanted = "a finite number >= 0"
        if not ok:
            raise ValueError(f"router_options {name}={value!r} is not allowed for the "
                             f"{router!r} router: expected {wanted}")
    return {**defaults, **given}


def build_gate(config: MoEConfig) -> Gate:
    """The built-in gate that ``config.router`` names, with ``config.router_options``."""
    registered = GATES[config.router]
    return registered.build(config, _checked_options(config.router, config.router_options,
                                                     registered.options))


def check_routing(routing: Routing, num_tokens: int, num_experts: int, *,
                  read_values: bool) -> None:
    """Refuse a Routing of the wrong shapes or dtypes (no device read), and with
    ``read_values`` one whose ids are out of [0, E) or whose weights are not finite."""
    if not isinstance(routing, Routing):
        raise ValueError(f"a gate must return a Routing, got {type(routing).__name__}")
    ids = routing.expert_ids_TK
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2 \
            or ids.shape[0] != num_tokens or ids.shape[1] < 1:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"Routing.expert_ids_TK must be int64 of shape ({num_tokens}, K) with "
                         f"K >= 1, got {got}")
    shape_TK, shape_TE = tuple(ids.shape), (num_tokens, num_experts)
    for name, shape, want_float in (("weights_TK", shape_TK, True), ("probs_TE", shape_TE, True),
                                    ("logits_TE", shape_TE, True), ("keep_TK", shape_TK, False),
                                    ("over_capacity_TK", shape_TK, False),
                                    ("input_weights_T", (num_tokens,), True)):
        value = getattr(routing, name)
        if value is None and name != "weights_TK":
            continue
        kind_ok = isinstance(value, torch.Tensor) and (
            value.is_floating_point() if want_float else value.dtype == torch.bool)
        if not kind_ok or tuple(value.shape) != shape:
            got = (f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                   else type(value).__name__)
            raise ValueError(f"Routing.{name} must be {'floating-point' if want_float else 'bool'} "
                             f"of shape {shape}, got {got}")
    if routing.aux_loss is not None and (not isinstance(routing.aux_loss, torch.Tensor)
                                         or routing.aux_loss.dim() != 0):
        raise ValueError("Routing.aux_loss must be a 0-dim tensor")
    if not read_values or num_tokens == 0:
        return
    if bool(((ids < 0) | (ids >= num_experts)).any()):
        raise ValueError(f"Routing.expert_ids_TK has ids outside [0, {num_experts}) (ids "
                         f"{ids.min().item()}..{ids.max().item()})")
    for name in ("weights_TK", "input_weights_T"):
        value = getattr(routing, name)
        if value is not None and not bool(torch.isfinite(value).all()):
            raise ValueError(f"Routing.{name} has non-finite weights (nan or inf)")
