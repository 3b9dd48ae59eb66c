"""Hugging Face interoperability.

Hugging Face MoE blocks store each expert's fused gate+up matrix as ``gate_up_proj`` [E, 2F, D]
and ``down_proj`` [E, D, F] (nn.Linear's out-by-in convention); moekit stores the input-major
transposes ``gate_up_proj`` [E, D, 2F] and ``down_proj`` [E, F, D]. The router weight is
[E, D] in both.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moekit.config import MoEConfig
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
