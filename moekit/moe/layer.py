"""MoELayer: gate -> capacity -> permute -> experts -> un-permute (+ shared experts), with stats.

Legend: T valid tokens, D model dim, E experts, K routes per token, N kept routes.

The forward changes no state. What the router learns from the load (the sigmoid gate's bias,
Skywork's adaptive coefficient, the recycle shuffle's seed) moves in ``update_router_state``,
which the trainer calls once per optimizer step with the step's ``RouterCounts`` summed over
its micro-batches and data-parallel ranks: every rank then moves identically, and a forward
recomputed under activation checkpointing routes exactly as the first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from moekit.config import MoEConfig
from moekit.moe import capacity as cap
from moekit.moe.dispatch import LocalDispatcher, count_per_expert
from moekit.moe.experts import MLP, GroupedExperts
from moekit.moe.packed import PackedExperts
from moekit.moe.losses import (AdaptiveAuxCoefficient, router_z_loss, skywork_balance_loss,
                               switch_balance_loss)
from moekit.moe.gates_distributed import DISTRIBUTED_GATES
from moekit.moe.route_groups import capacity_keep
from moekit.moe.router import BUILT_IN_GATES, Gate, Routing, build_gate, check_routing


# At most this many routes (tokens x top_k) in a forward take the small-batch path, each route
# through its own expert's weights (``GroupedExperts.forward_routes``) instead of the sorted,
# grouped one. Measured by benchmarks/decode_moe.py (docs/inference.md, Fast decoding).
SMALL_BATCH_ROUTES = 4
# A forward in a 16-bit type with at least DENSE_BATCH_ROUTES_PER_EXPERT routes per expert
# (fewer leave experts unrouted, whose weights the dense products would read for nothing) and
# at most DENSE_BATCH_ROWS dense products (tokens x E) takes the mid-batch path, every expert
# on every token (``GroupedExperts.forward_dense``), instead of the grouped one: decoding a
# batch of sequences. In float32 the E / K times more products cost more than the sort saves
# on a CPU. Measured by benchmarks/decode_moe.py and generate.py (docs/inference.md, Fast
# decoding).
DENSE_BATCH_ROUTES_PER_EXPERT = 2
DENSE_BATCH_ROWS = 256
DENSE_BATCH_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class RouterCounts:
    """The integer sums of one or more forwards, which add over micro-batches and ranks.

    routed_per_expert_E: routes the gate chose (before capacity); tokens_per_expert_E: routes
    computed; num_tokens: valid tokens; overflowed: routes over capacity before recycling;
    dropped: routes finally not computed. Tensors or numbers alike.
    """

    routed_per_expert_E: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    num_tokens: int | torch.Tensor
    overflowed: int | torch.Tensor
    dropped: int | torch.Tensor
    top_k: int

    def __add__(self, other: RouterCounts) -> RouterCounts:
        return RouterCounts(self.routed_per_expert_E + other.routed_per_expert_E,
                            self.tokens_per_expert_E + other.tokens_per_expert_E,
                            self.num_tokens + other.num_tokens,
                            self.overflowed + other.overflowed, self.dropped + other.dropped,
                            self.top_k)

    def as_vector(self) -> torch.Tensor:
        """One int64 vector [2E + 3], to reduce over ranks in one collective."""
        device = self.routed_per_expert_E.device
        scalars = torch.tensor([int(self.num_tokens), int(self.overflowed), int(self.dropped)],
                               device=device)
        return torch.cat([self.routed_per_expert_E, self.tokens_per_expert_E, scalars])

    @classmethod
    def from_vector(cls, vector: torch.Tensor, top_k: int) -> RouterCounts:
        num_experts = (len(vector) - 3) // 2
        num_tokens, overflowed, dropped = vector[2 * num_experts:].tolist()
        return cls(vector[:num_experts], vector[num_experts:2 * num_experts], num_tokens,
                   overflowed, dropped, top_k)

    @property
    def drop_rate(self) -> float:
        """Dropped routes / (K * valid tokens)."""
        return float(self.dropped) / max(self.top_k * int(self.num_tokens), 1)

    @property
    def overflow_rate(self) -> float:
        """Routes over capacity before recycling / (K * valid tokens)."""
        return float(self.overflowed) / max(self.top_k * int(self.num_tokens), 1)

    @property
    def expert_load(self) -> torch.Tensor:
        """Share of the computed routes each expert took."""
        total = self.tokens_per_expert_E.sum().clamp(min=1)
        return self.tokens_per_expert_E.float() / total

    def load_imbalance(self) -> dict[str, float | None]:
        """The computed routes per expert: coefficient of variation (population std / mean),
        max / mean and max / min (None when an expert got none: the ratio is infinite)."""
        load_E = self.tokens_per_expert_E.double()
        mean, low, high = float(load_E.mean()), float(load_E.min()), float(load_E.max())
        return {"load_cv": float(load_E.std(correction=0)) / mean if mean else None,
                "load_max_over_mean": high / mean if mean else None,
                "load_max_over_min": high / low if low else None}


@dataclass
class MoEStats:
    """What one forward of an MoE layer measured.

    Raw sums (add them over micro-batches or ranks, then derive): num_tokens (valid tokens),
    routed_per_expert_E (routes the gate chose, before capacity), tokens_per_expert_E (routes
    computed), prob_sum_E (router probabilities summed over tokens, with gradient), z_sum,
    overflowed (routes over capacity before recycling), dropped (routes finally not computed),
    and the sums behind the health metrics (entropy_sum, top1_over_top2_sum,
    top2_over_top3_sum: 0-dim tensors, read as numbers only through the properties, so that a
    dropless forward never waits for the device).
    Losses of this forward: aux_loss, z_loss, and router_loss = the weighted total to add to the
    training loss (aux_coef * aux_loss + z_coef * z_loss + the gate's own loss,
    gate_aux_loss). The trainer forms them over a wider scope from the raw sums instead
    (moekit.train.router_loss).
    """

    num_tokens: int
    top_k: int
    routed_per_expert_E: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    prob_sum_E: torch.Tensor | None
    z_sum: torch.Tensor | None
    overflowed: int
    dropped: int
    entropy_sum: torch.Tensor | None
    top1_over_top2_sum: torch.Tensor | None
    top2_over_top3_sum: torch.Tensor | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    aux_coef: float
    router_loss: torch.Tensor
    gate_aux_loss: torch.Tensor | None = None  # the gate's own loss (Routing.aux_loss)

    def _mean(self, total: torch.Tensor | None) -> float | None:
        return None if total is None else float(total) / max(self.num_tokens, 1)

    @property
    def counts(self) -> RouterCounts:
        return RouterCounts(self.routed_per_expert_E, self.tokens_per_expert_E, self.num_tokens,
                            self.overflowed, self.dropped, self.top_k)

    @property
    def drop_rate(self) -> float:
        """Dropped routes / (K * valid tokens)."""
        return self.counts.drop_rate

    @property
    def overflow_rate(self) -> float:
        """Routes over capacity before recycling / (K * valid tokens); the drop rate without it."""
        return self.counts.overflow_rate

    @property
    def router_entropy(self) -> float | None:
        """Mean entropy (nats) of the router distribution; log(E) is uniform routing."""
        return self._mean(self.entropy_sum)

    @property
    def max1_over_max2(self) -> float | None:
        """Mean ratio of a token's largest to second-largest gate probability (Skywork)."""
        return self._mean(self.top1_over_top2_sum)

    @property
    def max2_over_max3(self) -> float | None:
        return self._mean(self.top2_over_top3_sum)

    @property
    def expert_load(self) -> torch.Tensor:
        """Share of the computed routes each expert took."""
        return self.counts.expert_load


def health_sums(probs_TE: torch.Tensor):
    """Sums over tokens of the router's entropy and of its max1/max2 and max2/max3 ratios."""
    probs_TE = probs_TE.detach().float()
    entropy = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum()
    if probs_TE.shape[-1] < 3:
        return entropy, None, None
    top_T3 = probs_TE.topk(3, dim=-1).values.clamp_min(1e-30)
    ratios = (top_T3[:, :2] / top_T3[:, 1:]).sum(0)
    return entropy, ratios[0], ratios[1]


def check_hidden(hidden: torch.Tensor, mask: torch.Tensor | None, hidden_size: int) -> None:
    """Refuse an input that is not a floating-point [..., hidden_size] tensor, or a mask that is
    not a bool tensor of its leading shape."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        got = hidden.dtype if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a floating-point tensor, got {got}")
    if hidden.dim() < 1 or hidden.shape[-1] != hidden_size:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}; its last dimension must be "
                         f"hidden_size={hidden_size}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != hidden.shape[:-1]):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(hidden.shape[:-1])}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")


class MoELayer(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    ``forward(hidden, mask=None) -> (output, MoEStats)``: hidden is [..., D]; mask (bool, shape
    hidden.shape[:-1]) marks the valid tokens; padded tokens are not routed, not computed, not
    counted, and their output is zero. Pass ``experts`` (e.g. ModuleExperts) or ``router`` (any
    :class:`Gate`) to replace the built-in ones.
    """

    def __init__(self, config: MoEConfig, *, experts: nn.Module | None = None,
                 router: Gate | None = None, layer_index: int = 0):
        super().__init__()
        self.config = config
        self.layer_index = layer_index  # the model's layer number: part of the recycle seed
        # Where routes go to be computed: all experts here, unless a parallel layout replaces it.
        self.dispatcher = LocalDispatcher(config.num_experts)
        self.router = router if router is not None else build_gate(config)
        self.experts = experts if experts is not None else GroupedExperts(
            config.num_experts, config.hidden_size, config.ffn_size, config.activation)
        for part, what in ((self.router, "router"), (self.experts, "experts")):
            if getattr(part, "num_experts", config.num_experts) != config.num_experts:
                raise ValueError(f"{what} has num_experts={part.num_experts}, the config "
                                 f"num_experts={config.num_experts}; they must agree")
        self.shared_experts = None
        self.shared_gate = None
        if config.num_shared_experts > 0:
            width = config.num_shared_experts * (config.shared_ffn_size or config.ffn_size)
            self.shared_experts = MLP(config.hidden_size, width, config.activation)
            if config.shared_expert_gate:
                self.shared_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.aux_coefficient = AdaptiveAuxCoefficient(
            config.aux_loss_coef, config.adaptive_xi, config.adaptive_max, config.adaptive_beta)
        # Optimizer steps whose router state this layer took: with the seed and the layer index
        # it seeds the recycle shuffle, and as a buffer it is saved with the weights, so that a
        # resumed run shuffles as an uninterrupted one.
        self.register_buffer("router_step", torch.zeros((), dtype=torch.long))
        # The health sums of each forward (entropy, max1/max2, max2/max3); off only to measure
        # what they cost (benchmarks/router_health.py).
        self.collect_health = True

    def _check_inputs(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> None:
        check_hidden(hidden, mask, self.config.hidden_size)
        weight = next((p for p in self.router.parameters() if p.is_floating_point()), None)
        autocast = torch.is_autocast_enabled(hidden.device.type)
        if weight is not None and hidden.dtype != weight.dtype and not autocast:
            raise ValueError(f"hidden is {hidden.dtype} and the layer's weights are "
                             f"{weight.dtype}: cast one to the other (layer.to({hidden.dtype}) "
                             f"or hidden.to({weight.dtype})), or run under torch.autocast")

    def _capacity_factor(self) -> float | None:
        return self.config.capacity_factor if self.training else self.config.eval_capacity_factor

    def _apply_capacity(self, routing: Routing, num_tokens: int):
        """(expert_ids_TK, keep_TK or None, overflowed routes) after capacity and recycling.
        A gate that applied a capacity rule of its own (``over_capacity_TK``) is taken as it is:
        its routes over capacity are dropped."""
        expert_ids_TK, keep_TK = routing.expert_ids_TK, routing.keep_TK
        if routing.over_capacity_TK is not None:
            return expert_ids_TK, keep_TK, int(routing.over_capacity_TK.sum())
        factor = self._capacity_factor()
        if factor is None:
            return expert_ids_TK, keep_TK, 0
        if keep_TK is None:
            keep_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
        num_experts, top_k = self.config.num_experts, expert_ids_TK.shape[1]
        capacity = cap.expert_capacity(num_tokens, top_k, num_experts, factor)
        within_TK = capacity_keep(expert_ids_TK, keep_TK, factor, num_experts,
                                  self.config.capacity_scope, self.router.route_groups,
                                  queues=self.router.step_queues)
        overflow_TK = keep_TK & ~within_TK
        overflowed = int(overflow_TK.sum())
        if overflowed == 0 or self.config.overflow == "drop":
            return expert_ids_TK, within_TK, overflowed
        if self.config.overflow == "recycle_random":
            expert_ids_TK, within_TK = cap.recycle_random(
                expert_ids_TK, within_TK, overflow_TK, capacity, num_experts,
                self._recycle_generator())
        else:
            if routing.probs_TE is None:
                raise ValueError('overflow="recycle_next_best" needs a gate that returns probs_TE')
            expert_ids_TK, within_TK = cap.recycle_next_best(
                expert_ids_TK, within_TK, overflow_TK, capacity, routing.probs_TE)
        return expert_ids_TK, within_TK, overflowed

    def _recycle_generator(self) -> torch.Generator:
        """Seeded from (seed, step, layer): a forward recomputed in the backward, or run on
        another rank of the same step, shuffles as the first did."""
        seed = (self.config.seed * 1_000_003 + int(self.router_step)) * 1_000_003
        return torch.Generator().manual_seed((seed + self.layer_index) % 2**63)

    @torch.no_grad()
    def update_router_state(self, counts: RouterCounts) -> None:
        """Move the router's state once per optimizer step, from the step's counts (summed
        over all its micro-batches and data-parallel ranks): the sigmoid gate's balancing
        bias, Skywork's adaptive coefficient (from the overflow rate, when the layer trains
        with a capacity: in dropless mode it stays fixed, docs/moe.md) and the step that
        seeds the recycle shuffle."""
        self.router.observe_load(counts.routed_per_expert_E)
        if self.config.adaptive_aux and self.config.capacity_factor is not None:
            self.aux_coefficient.update(counts.overflow_rate)
        self.router_step += 1

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None):
        self._check_inputs(hidden, mask)
        x_TD = hidden.reshape(-1, hidden.shape[-1])
        valid_rows = None
        if mask is not None:
            valid_rows = mask.reshape(-1).nonzero().squeeze(1)
            x_TD = x_TD.index_select(0, valid_rows)
        num_tokens = x_TD.shape[0]

        routing = self.router(x_TD)
        check_routing(routing, num_tokens, self.config.num_experts,
                      read_values=type(self.router) not in BUILT_IN_GATES + DISTRIBUTED_GATES)
        expert_ids_TK, keep_TK, overflowed = self._apply_capacity(routing, num_tokens)
        path = self._decoding_path(x_TD, expert_ids_TK, keep_TK)
        if path is not None:
            run = (self.experts.forward_routes if path == "routes"
                   else self.experts.forward_dense)
            y_TD = run(x_TD, expert_ids_TK, routing.weights_TK)
            tokens_per_expert_E = count_per_expert(expert_ids_TK, self.config.num_experts)
            computed_routes = expert_ids_TK.numel()
        else:
            y_TD, plan = self.dispatcher.run(x_TD, expert_ids_TK, keep_TK, routing.weights_TK,
                                             self.experts)
            tokens_per_expert_E, computed_routes = plan.tokens_per_expert_E, len(plan.slots_N)
        if routing.input_weights_T is not None:
            y_TD = y_TD + (routing.input_weights_T[:, None] * x_TD).to(y_TD.dtype)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD

        stats = self._stats(routing, tokens_per_expert_E, computed_routes, num_tokens,
                            overflowed)
        if valid_rows is not None:
            y_TD = y_TD.new_zeros(hidden.numel() // hidden.shape[-1], y_TD.shape[-1]).index_copy(
                0, valid_rows, y_TD)
        return y_TD.view(hidden.shape), stats

    def _decoding_path(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                       keep_TK: torch.Tensor | None) -> str | None:
        """The path of a decoding-sized forward: "routes" (a few routes, each through its
        expert's weights), "dense" (every expert on every token of a small batch, in a 16-bit
        type, without autograd), or None for the grouped path. Both decoding paths need every
        route kept, all experts on this process, grouped experts (plain, or packed for
        decoding: those take "dense" but never "routes", whose compiled form reads the
        weights as tensors), and no autocast (whose casts the grouped path makes its own way).
        Eagerly, "routes" runs only on a CPU: it reads the expert ids on the host, which costs
        nothing there and a wait for the device elsewhere; "dense" reads nothing."""
        packed = isinstance(self.experts, PackedExperts)
        if not (keep_TK is None and type(self.dispatcher) is LocalDispatcher
                and (packed or isinstance(self.experts, GroupedExperts))
                and not torch.is_autocast_enabled(x_TD.device.type)):
            return None
        routes, num_experts = expert_ids_TK.numel(), self.config.num_experts
        if 0 < routes <= SMALL_BATCH_ROUTES and not packed and (
                x_TD.device.type == "cpu" or torch.compiler.is_compiling()):
            return "routes"
        # Not under autograd: a training step would save the E/K-fold products and pay them
        # again in the backward (and the planner's activation bytes assume the grouped path).
        if (x_TD.dtype in DENSE_BATCH_DTYPES and not torch.is_grad_enabled()
                and routes >= DENSE_BATCH_ROUTES_PER_EXPERT * num_experts
                and x_TD.shape[0] * num_experts <= DENSE_BATCH_ROWS):
            return "dense"
        return None

    def _stats(self, routing: Routing, tokens_per_expert_E: torch.Tensor, computed_routes: int,
               num_tokens: int, overflowed: int) -> MoEStats:
        config = self.config
        routed_per_expert_E = count_per_expert(routing.expert_ids_TK, config.num_experts,
                                               routing.keep_TK)
        top_k = routing.expert_ids_TK.shape[1]
        dropped = top_k * num_tokens - computed_routes  # a shape: no wait for the device
        zero = tokens_per_expert_E.new_zeros((), dtype=torch.float32)
        prob_sum_E = z_sum = None
        aux_loss = z_loss = zero
        entropy = ratio12 = ratio23 = None
        if routing.probs_TE is not None:
            prob_sum_E = routing.probs_TE.sum(0)
            if self.collect_health:
                entropy, ratio12, ratio23 = health_sums(routing.probs_TE)
            if config.aux_loss == "switch" and num_tokens > 0:
                aux_loss = switch_balance_loss(routed_per_expert_E, prob_sum_E, num_tokens, top_k)
            elif config.aux_loss == "skywork" and num_tokens > 0:
                aux_loss = skywork_balance_loss(prob_sum_E, num_tokens)
        if routing.logits_TE is not None and config.z_loss_coef > 0:
            z_sum = (torch.logsumexp(routing.logits_TE, dim=-1) ** 2).sum()
            z_loss = router_z_loss(z_sum, max(num_tokens, 1))
        aux_coef = float(self.aux_coefficient.value) if config.adaptive_aux else config.aux_loss_coef
        router_loss = aux_coef * aux_loss + config.z_loss_coef * z_loss
        if routing.aux_loss is not None:
            router_loss = router_loss + routing.aux_loss
        return MoEStats(
            num_tokens=num_tokens, top_k=top_k, routed_per_expert_E=routed_per_expert_E,
            tokens_per_expert_E=tokens_per_expert_E, prob_sum_E=prob_sum_E, z_sum=z_sum,
            overflowed=overflowed, dropped=dropped, entropy_sum=entropy,
            top1_over_top2_sum=ratio12, top2_over_top3_sum=ratio23, aux_loss=aux_loss,
            z_loss=z_loss, aux_coef=aux_coef, router_loss=router_loss,
            gate_aux_loss=routing.aux_loss)
