"""Parameter counts of a ModelConfig, per component, total and active per token.

Counted from the config alone (no model is built), layer by layer, exactly as
``moekit.model.Transformer`` lays its weights out: the tests hold these counts to
``sum(p.numel())`` of the built model.

Two conventions for active parameters (decisions.md): publishers differ on whether the embedding
and output matrices count. ``active_with_embeddings`` counts the input embedding and the output
projection, a tied matrix on both sides (it does the work of both per token); ``total`` counts a
tied matrix once (it is stored once). ``active_without_embeddings`` leaves both out.
"""
from __future__ import annotations

from dataclasses import dataclass

from moekit.config import ModelConfig
from moekit.moe.experts import GATED_ACTIVATIONS


def mlp_parameters(hidden_size: int, ffn_size: int, activation: str) -> int:
    """One feed-forward block: up and down projections, plus the gate projection when gated."""
    projections = 3 if activation in GATED_ACTIVATIONS else 2
    return projections * hidden_size * ffn_size


@dataclass(frozen=True)
class LayerParameters:
    """The weights of one Transformer block, by component."""

    attention: int = 0
    dense_ffn: int = 0
    routed_experts: int = 0  # all experts of the layer
    routed_experts_active: int = 0  # the top_k of them one token uses
    shared_experts: int = 0
    router: int = 0
    norms: int = 0

    @property
    def total(self) -> int:
        return (self.attention + self.dense_ffn + self.routed_experts + self.shared_experts
                + self.router + self.norms)

    @property
    def active(self) -> int:
        return self.total - self.routed_experts + self.routed_experts_active


def latent_attention_parameters(config: ModelConfig) -> tuple[int, int]:
    """(projections, norms) of one multi-head latent attention block: queries straight or
    through their latent (q_a, its norm, q_b), the KV latent with the shared RoPE key
    (kv_a_proj_with_mqa), its norm, the expansion into each head's keys and values (kv_b) and
    the output."""
    mla, d, h = config.mla, config.hidden_size, config.num_heads
    query = (d * h * mla.qk_head_dim if mla.q_lora_rank is None
             else mla.q_lora_rank * (d + h * mla.qk_head_dim))
    projections = (query + d * (mla.kv_lora_rank + mla.qk_rope_head_dim)
                   + mla.kv_lora_rank * h * (mla.qk_nope_head_dim + mla.v_head_dim)
                   + h * mla.v_head_dim * d)
    return projections, mla.kv_lora_rank + (mla.q_lora_rank or 0)


def attention_parameters(config: ModelConfig, index: int) -> tuple[int, int]:
    """(projections and biases, QK- or latent norms) of layer ``index``'s attention."""
    if config.mla is not None:
        return latent_attention_parameters(config)
    d, dh = config.hidden_size, config.attention_head_dim
    q_width, kv_width = config.num_heads * dh, config.kv_heads * dh
    owns_kv = config.owns_kv(index)
    attention = 2 * d * q_width + (2 * d * kv_width if owns_kv else 0)
    if config.qkv_bias:
        attention += q_width + (2 * kv_width if owns_kv else 0)
    if config.attention_out_bias:
        attention += d
    norms = 0
    if config.qk_norm:
        over_projection = config.qk_norm_placement == "projection"
        q_norm, k_norm = (q_width, kv_width) if over_projection else (dh, dh)
        norms += q_norm + (k_norm if config.has_k_norm(index) else 0)
    return attention, norms


def layer_parameters(config: ModelConfig, index: int) -> LayerParameters:
    d = config.hidden_size
    attention, attention_norms = attention_parameters(config, index)
    norms = 2 * d + attention_norms  # before attention and before the FFN, + QK/latent norms
    if not config.is_moe_layer(index):
        return LayerParameters(attention=attention, norms=norms,
                               dense_ffn=mlp_parameters(d, config.ffn_size, config.activation))
    moe = config.moe
    expert = mlp_parameters(d, moe.ffn_size, moe.activation)
    shared = 0
    if moe.num_shared_experts:
        width = moe.num_shared_experts * (moe.shared_ffn_size or moe.ffn_size)
        shared = mlp_parameters(d, width, moe.activation) + (d if moe.shared_expert_gate else 0)
    return LayerParameters(attention=attention, norms=norms, router=moe.num_experts * d,
                           routed_experts=moe.num_experts * expert,
                           routed_experts_active=moe.top_k * expert, shared_experts=shared)


@dataclass(frozen=True)
class ComponentCount:
    name: str
    total: int
    active: int


@dataclass(frozen=True)
class ParameterCount:
    """Total and active parameters of a model, per component: embeddings, output, attention,
    dense_ffn, routed_experts, shared_experts, router, norms."""

    components: tuple[ComponentCount, ...]

    def component(self, name: str) -> ComponentCount:
        return next(c for c in self.components if c.name == name)

    @property
    def total(self) -> int:
        return sum(c.total for c in self.components)

    @property
    def active_with_embeddings(self) -> int:
        return sum(c.active for c in self.components)

    @property
    def active_without_embeddings(self) -> int:
        return sum(c.active for c in self.components if c.name not in ("embeddings", "output"))

    @property
    def output_matrix(self) -> int:
        """The output projection's size, also when it is the tied embedding (it multiplies)."""
        return self.component("output").active

    def to_dict(self) -> dict:
        return {"components": {c.name: {"total": c.total, "active": c.active}
                               for c in self.components},
                "total": self.total, "active_with_embeddings": self.active_with_embeddings,
                "active_without_embeddings": self.active_without_embeddings}


def count_parameters(config: ModelConfig) -> ParameterCount:
    layers = [layer_parameters(config, i) for i in range(config.num_layers)]

    def layers_sum(name: str) -> int:
        return sum(getattr(layer, name) for layer in layers)

    def whole(name: str, extra: int = 0) -> ComponentCount:  # every token uses all of it
        return ComponentCount(name, layers_sum(name) + extra, layers_sum(name) + extra)

    vocab_matrix = config.vocab_size * config.hidden_size
    return ParameterCount((
        ComponentCount("embeddings", vocab_matrix, vocab_matrix),
        ComponentCount("output", 0 if config.tie_embeddings else vocab_matrix, vocab_matrix),
        whole("attention"),
        whole("dense_ffn"),
        ComponentCount("routed_experts", layers_sum("routed_experts"),
                       layers_sum("routed_experts_active")),
        whole("shared_experts"),
        whole("router"),
        whole("norms", extra=config.hidden_size),  # + the final norm
    ))
