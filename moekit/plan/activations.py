"""Activation memory: the bytes the backward pass keeps per token, layer by layer.

Counted tensor by tensor from what moekit's own Transformer saves for its backward (the tests
hold the count to the bytes autograd actually saves on a small model). Symbols: D model dim, H
query heads, G key/value heads, Dh head dim, F FFN width, E experts, K experts per token, V
vocabulary, b bytes per number of the activation dtype; 4 for the float32 parts.

- RMSNorm (eager): a float32 copy of its input (4D) and its rsqrt (4), the normalised value and
  the weighted output in the activation dtype (2bD). A fused kernel would keep less.
- attention: q, k, v after RoPE and the attention output (b(2 H Dh + 2 G Dh)), the softmax's
  log-sum-exp (4H); CLA layers that reuse K/V keep no k, v of their own; QK-norm adds, per
  head, a float32 copy of its input, its rsqrt and the normalised value (4 Dh + 4 + b Dh).
  Multi-head latent attention: its latents' norms, q, k and v (values padded to the queries'
  width Dqk for sdpa's fused kernels) and the output, the log-sum-exp, the output projection's
  input (``latent_attention_bytes``).
- dense FFN: gate and up outputs, the activation, and their product (4bF; 2bF ungated).
- MoE FFN: the router's probabilities (4E), the routing bookkeeping (top-k ids, weights, the
  permutation's indices: 4 + 28K + bK), and per route the permuted input, the expert's four
  F-wide tensors and its output (b(2D + 4F), 2F in place of 4F when ungated); shared experts
  as a dense FFN of their summed width.
- once per sequence position: RoPE's cos and sin (2b Dh) and the token id (8) on the first
  pipeline stage; the final norm and the loss's float32 log-probabilities (4V) on the last.

Tensor parallelism divides what lives inside attention and the FFNs by the tensor degree (not
the norms: no sequence parallelism); expert parallelism leaves a device K routes per token
unless its expert group shares tokens with its tensor group (EDP), which divides them by
min(expert, tensor). Full recomputation keeps only each layer's input (bD) and rebuilds one
layer at a time in the backward.
"""
from __future__ import annotations

from moekit.config import ModelConfig
from moekit.moe.experts import GATED_ACTIVATIONS


def norm_bytes(width: int, b: int) -> int:
    return 4 * width + 4 + 2 * b * width


def ffn_inner_bytes(width: int, activation: str, b: int) -> int:
    return b * width * (4 if activation in GATED_ACTIVATIONS else 2)


def latent_attention_bytes(config: ModelConfig, b: int) -> float:
    """Multi-head latent attention: the KV latent's norm (in float32 its input is the
    projection's output itself, the RoPE key's numbers included), the query latent's norm,
    q, k and the zero-padded v (each H Dqk wide) and attention's output, the log-sum-exp, and
    the output projection's input (H Dv)."""
    mla, heads = config.mla, config.num_heads
    latents = norm_bytes(mla.kv_lora_rank, b) + (4 * mla.qk_rope_head_dim if b == 4 else 0)
    if mla.q_lora_rank:
        latents += norm_bytes(mla.q_lora_rank, b)
    return (latents + b * heads * (4 * mla.qk_head_dim + mla.v_head_dim) + 4 * heads)


def attention_bytes(config: ModelConfig, index: int, b: int, tensor: int = 1) -> float:
    if config.mla is not None:
        return norm_bytes(config.hidden_size, b) + latent_attention_bytes(config, b) / tensor
    heads, dh = config.num_heads, config.attention_head_dim
    kv_heads = config.kv_heads if config.owns_kv(index) else 0
    inner = b * dh * (2 * heads + 2 * kv_heads) + 4 * heads
    if config.qk_norm:
        inner += (heads + kv_heads) * (4 * dh + 4 + b * dh)
    return norm_bytes(config.hidden_size, b) + inner / tensor


def ffn_bytes(config: ModelConfig, index: int, b: int, tensor: int = 1,
              route_share: int = 1) -> float:
    d = config.hidden_size
    if not config.is_moe_layer(index):
        return norm_bytes(d, b) + ffn_inner_bytes(config.ffn_size, config.activation, b) / tensor
    moe = config.moe
    k = moe.top_k
    per_route = b * 2 * d + ffn_inner_bytes(moe.ffn_size, moe.activation, b)
    routing = 4 * moe.num_experts + 4 + 28 * k + b * k
    shared = 0.0
    if moe.num_shared_experts:
        width = moe.num_shared_experts * (moe.shared_ffn_size or moe.ffn_size)
        shared = ffn_inner_bytes(width, moe.activation, b) / tensor
        if moe.shared_expert_gate:
            shared += b * (d + 1)  # the gate's sigmoid and the gated product's input
    return norm_bytes(d, b) + routing + k * per_route / route_share + shared


def layer_bytes(config: ModelConfig, index: int, b: int, tensor: int = 1,
                route_share: int = 1) -> float:
    """Bytes per token that layer ``index`` keeps for the backward."""
    return attention_bytes(config, index, b, tensor) + ffn_bytes(config, index, b, tensor,
                                                                 route_share)


def first_stage_bytes(config: ModelConfig, b: int) -> int:
    return 2 * b * config.rope_dim + 8


def last_stage_bytes(config: ModelConfig, b: int, tensor: int = 1) -> float:
    return norm_bytes(config.hidden_size, b) + 4 * config.vocab_size / tensor


def model_bytes_per_token(config: ModelConfig, b: int) -> float:
    """The whole model on one device, without recomputation."""
    return (first_stage_bytes(config, b) + last_stage_bytes(config, b)
            + sum(layer_bytes(config, i, b) for i in range(config.num_layers)))
