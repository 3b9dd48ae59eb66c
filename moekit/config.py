"""Configuration dataclasses, checked when built.

This is the lowest layer of moekit: every module may import it and it imports nothing of moekit.
A bad value raises a ValueError that names the field, the value and what is allowed, so that a
mistake is caught here rather than deep inside a kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

ROUTERS = ("softmax", "switch", "sigmoid")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")
OVERFLOW_POLICIES = ("drop", "recycle_random", "recycle_next_best")
AUX_LOSSES = ("switch", "skywork", "none")


def _require(condition: bool, field: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{field}={value!r} is not allowed: {allowed}")


def _positive_int(field: str, value) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             field, value, "expected a positive integer")


def _non_negative(field: str, value) -> None:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool)
             and math.isfinite(value) and value >= 0, field, value, "expected a finite number >= 0")


def _capacity(field: str, value) -> None:
    _require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                               and math.isfinite(value) and value > 0),
             field, value, "expected a number > 0, or None for dropless routing")


@dataclass(frozen=True)
class MoEConfig:
    """One MoE feed-forward layer: router, capacity, losses, routed and shared experts.

    Defaults follow Mixtral: softmax top-2 with the two weights renormalised, dropless, SwiGLU.
    """

    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int = 2
    # Router. "softmax": softmax over all experts, top-k. "switch": top-1 of the softmax, the
    # gate value not renormalised (Switch Transformer). "sigmoid": sigmoid scores, top-k chosen
    # by score + a per-expert bias that is nudged towards balance (DeepSeek-V3, no aux loss).
    router: str = "softmax"
    normalize_weights: bool = True  # rescale the k chosen weights to sum to 1
    logit_norm_scale: float | None = None  # Skywork gating-logit normalization lambda; None = off
    jitter: float = 0.0  # training only: input scaled by U(1 - jitter, 1 + jitter) before routing
    bias_update_rate: float = 1e-3  # sigmoid router: step of the balancing bias per training forward
    # Capacity: None = dropless. Capacity per expert = ceil(factor * k * valid_tokens / E).
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None  # evaluation and generation are dropless by default
    overflow: str = "drop"  # what happens to an assignment over capacity
    seed: int = 0  # seeds recycle_random, so that a run can be repeated exactly
    # Losses: aux_loss picks the load-balancing form; its coefficient is fixed unless adaptive.
    aux_loss: str = "switch"
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 0.0
    adaptive_aux: bool = False  # Skywork: coefficient driven by the layer's measured drop rate
    adaptive_xi: float = 0.2
    adaptive_max: float = 1e-2
    adaptive_beta: float = 0.99
    # Experts.
    activation: str = "swiglu"
    num_shared_experts: int = 0
    shared_ffn_size: int | None = None  # width of each shared expert; default ffn_size
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(w . x) scales the shared output

    def __post_init__(self):
        for name in ("hidden_size", "ffn_size", "num_experts", "top_k"):
            _positive_int(name, getattr(self, name))
        _require(self.top_k <= self.num_experts, "top_k", self.top_k,
                 f"must be <= num_experts ({self.num_experts})")
        _require(self.router in ROUTERS, "router", self.router, f"one of {', '.join(ROUTERS)}")
        _require(self.router != "switch" or self.top_k == 1, "top_k", self.top_k,
                 'the "switch" router routes each token to exactly 1 expert (top_k=1)')
        _require(self.activation in ACTIVATIONS, "activation", self.activation,
                 f"one of {', '.join(ACTIVATIONS)}")
        _require(self.overflow in OVERFLOW_POLICIES, "overflow", self.overflow,
                 f"one of {', '.join(OVERFLOW_POLICIES)}")
        _require(self.aux_loss in AUX_LOSSES, "aux_loss", self.aux_loss,
                 f"one of {', '.join(AUX_LOSSES)}")
        _capacity("capacity_factor", self.capacity_factor)
        _capacity("eval_capacity_factor", self.eval_capacity_factor)
        _require(self.logit_norm_scale is None or (isinstance(self.logit_norm_scale, (int, float))
                                                   and self.logit_norm_scale > 0),
                 "logit_norm_scale", self.logit_norm_scale, "expected a number > 0, or None (off)")
        _require(self.logit_norm_scale is None or self.num_experts > 1, "logit_norm_scale",
                 self.logit_norm_scale, "needs num_experts > 1 (the std over one expert is 0)")
        for name in ("aux_loss_coef", "z_loss_coef", "jitter", "bias_update_rate",
                     "adaptive_xi", "adaptive_max"):
            _non_negative(name, getattr(self, name))
        _require(self.jitter < 1, "jitter", self.jitter, "expected a number in [0, 1)")
        _require(isinstance(self.adaptive_beta, (int, float)) and 0 <= self.adaptive_beta < 1,
                 "adaptive_beta", self.adaptive_beta, "expected a number in [0, 1)")
        _require(isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0,
                 "num_shared_experts", self.num_shared_experts, "expected an integer >= 0")
        if self.shared_ffn_size is not None:
            _positive_int("shared_ffn_size", self.shared_ffn_size)
        _require(isinstance(self.seed, int), "seed", self.seed, "expected an integer")

    @property
    def gated(self) -> bool:
        """Whether the expert MLP has a gate projection beside its up projection."""
        return self.activation in ("swiglu", "geglu")

    @classmethod
    def from_dict(cls, values: dict) -> "MoEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MoE config keys {unknown}; allowed: {sorted(known)}")
        return cls(**values)
