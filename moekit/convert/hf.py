"""Hugging Face interoperability.

Hugging Face MoE blocks store each expert's fused gate+up matrix as ``gate_up_proj`` [E, 2F, D]
and ``down_proj`` [E, D, F] (nn.Linear's out-by-in convention); moekit stores the input-major
transposes ``gate_up_proj`` [E, D, 2F] and ``down_proj`` [E, F, D]. The router weight is
[E, D] in both.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moekit.config import ModelConfig, MoEConfig
from moekit.model import Transformer
from moekit.moe import MoELayer


def moe_config_from_hf(hf_config) -> MoEConfig:
    """The MoEConfig of one sparse block of a Mixtral, Qwen2-MoE or Qwen3-MoE config."""
    if hf_config.hidden_act != "silu":
        raise ValueError(f"hidden_act={hf_config.hidden_act!r} is not supported: expected 'silu'")
    model_type = hf_config.model_type
    if model_type == "mixtral":
        return MoEConfig(hidden_size=hf_config.hidden_size, ffn_size=hf_config.intermediate_size,
                         num_experts=hf_config.num_local_experts,
                         top_k=hf_config.num_experts_per_tok, normalize_weights=True)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        shared = getattr(hf_config, "shared_expert_intermediate_size", 0) or 0
        return MoEConfig(hidden_size=hf_config.hidden_size,
                         ffn_size=hf_config.moe_intermediate_size,
                         num_experts=hf_config.num_experts, top_k=hf_config.num_experts_per_tok,
                         normalize_weights=hf_config.norm_topk_prob,
                         num_shared_experts=1 if shared else 0, shared_ffn_size=shared or None,
                         shared_expert_gate=bool(shared))
    raise ValueError(f"model_type={model_type!r} is not supported: expected mixtral, qwen2_moe "
                     "or qwen3_moe")


@torch.no_grad()
def load_hf_moe_block(layer: MoELayer, block: nn.Module) -> MoELayer:
    """Copy the weights of a Hugging Face sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE) into
    ``layer``, which must have the same shapes. Returns the layer."""
    layer.router.weight.copy_(block.gate.weight)
    layer.experts.gate_up_proj.copy_(block.experts.gate_up_proj.transpose(1, 2))
    layer.experts.down_proj.copy_(block.experts.down_proj.transpose(1, 2))
    shared = getattr(block, "shared_expert", None)
    if shared is not None:
        layer.shared_experts.load_state_dict(shared.state_dict())
        layer.shared_gate.weight.copy_(block.shared_expert_gate.weight)
    return layer


def moe_layer_from_hf_block(block: nn.Module, hf_config) -> MoELayer:
    """A new MoELayer equal to a Hugging Face sparse MoE block."""
    layer = MoELayer(moe_config_from_hf(hf_config))
    return load_hf_moe_block(layer.to(block.gate.weight.dtype), block)


def _rope_base(hf_config) -> float:
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def model_config_from_hf(hf_config) -> ModelConfig:
    """The ModelConfig of a Hugging Face Mixtral, Qwen2-MoE or Qwen3-MoE config."""
    if getattr(hf_config, "mlp_only_layers", None):
        raise ValueError(f"mlp_only_layers={hf_config.mlp_only_layers} is not supported: "
                         "moekit places MoE layers every n-th layer (decoder_sparse_step)")
    model_type = hf_config.model_type
    return ModelConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers, num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None), ffn_size=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings, rope_base=_rope_base(hf_config),
        norm_eps=float(hf_config.rms_norm_eps), tie_embeddings=hf_config.tie_word_embeddings,
        qkv_bias=model_type == "qwen2_moe" and getattr(hf_config, "qkv_bias", True),
        qk_norm=model_type == "qwen3_moe", moe=moe_config_from_hf(hf_config),
        moe_every=getattr(hf_config, "decoder_sparse_step", 1))


# Hugging Face name fragment -> moekit name fragment, applied in order.
_RENAMES = [
    ("model.embed_tokens.", "embed_tokens."), ("model.norm.", "norm."), ("model.layers.", "layers."),
    (".self_attn.", ".attn."), (".input_layernorm.", ".attn_norm."),
    (".post_attention_layernorm.", ".ffn_norm."), (".mlp.gate.", ".ffn.router."),
    (".mlp.shared_expert_gate.", ".ffn.shared_gate."), (".mlp.shared_expert.", ".ffn.shared_experts."),
    (".mlp.", ".ffn."),
]
_TRANSPOSED = ("experts.gate_up_proj", "experts.down_proj")  # [E, out, in] <-> [E, in, out]


def hf_to_moekit_state(hf_state: dict) -> dict:
    """Rename (and transpose the stacked expert weights of) a Hugging Face state dict."""
    state = {}
    for name, tensor in hf_state.items():
        for old, new in _RENAMES:
            name = name.replace(old, new)
        state[name] = tensor.transpose(1, 2) if name.endswith(_TRANSPOSED) else tensor
    return state


@torch.no_grad()
def transformer_from_hf(hf_model) -> Transformer:
    """A moekit Transformer with the weights of a Hugging Face Mixtral/Qwen2-MoE/Qwen3-MoE."""
    model = Transformer(model_config_from_hf(hf_model.config))
    state = hf_to_moekit_state(hf_model.state_dict())
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.endswith(("recycle_calls", ".value"))]
    if missing or unexpected:
        raise ValueError(f"weights do not match: missing {missing}, unexpected {unexpected}")
    return model.to(hf_model.dtype)
