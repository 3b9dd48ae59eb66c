"""GLM4-MoE (GLM-4.5): grouped-query attention with biases on q, k and v (``attention_bias``)
and optional QK-norm per head before RoPE (``use_qk_norm``), RoPE over the first
``partial_rotary_factor`` of each head, and DeepSeek-V3's MoE: sigmoid scores with a correction
bias, group-limited, a routed scaling factor, shared experts, the first k layers dense.
Multi-token-prediction layers (from ``num_hidden_layers`` on) are left out on import."""
from __future__ import annotations

import re

from moekit.config import ModelConfig
from moekit.convert.families.deepseek import (CORRECTION_BIAS, first_dense_layers,
                                              shared_routed_values, sigmoid_moe)
from moekit.convert.families.family import (MOST_FAMILIES, Family, required, rope_from_hf,
                                            rope_to_hf)


def _partial_factor(values: dict) -> float:
    parameters = values.get("rope_parameters") or {}
    return float(parameters.get("partial_rotary_factor",
                                values.get("partial_rotary_factor", 0.5)))


def _rope(values: dict) -> tuple[float, dict | None]:
    # The rotated share is rotary_dim (options), not part of the scaling.
    parameters = {key: value for key, value in (values.get("rope_parameters") or {}).items()
                  if key != "partial_rotary_factor"}
    return rope_from_hf({**values, "rope_parameters": parameters})


def _options(values: dict) -> dict:
    head_dim = values.get("head_dim") or (required(values, "hidden_size")
                                          // required(values, "num_attention_heads"))
    # transformers' attention_bias biases q, k and v here, never o_proj.
    return dict(head_dim=head_dim, rotary_dim=int(head_dim * _partial_factor(values)),
                qk_norm=bool(values.get("use_qk_norm")), qk_norm_placement="head",
                attention_out_bias=False, dense_layers=first_dense_layers(values))


def _config_values(config: ModelConfig) -> dict:
    rotary = config.rotary_dim or config.attention_head_dim
    values = dict(shared_routed_values(config), use_qk_norm=config.qk_norm,
                  attention_bias=config.qkv_bias)
    values["rope_parameters"] = {**rope_to_hf(config)["rope_parameters"],
                                 "partial_rotary_factor": rotary / config.attention_head_dim}
    return values


def _without_prediction_layers(state: dict, values: dict, to_moekit: bool) -> dict:
    layers = required(values, "num_hidden_layers")
    return {name: tensor for name, tensor in state.items()
            if not (to_moekit and (layer := re.match(r"model\.layers\.(\d+)\.", name))
                    and int(layer.group(1)) >= layers)}


GLM4_MOE = Family(
    model_type="glm4_moe", architecture="Glm4MoeForCausalLM",
    holds=MOST_FAMILIES | {"moe", "dense_layers", "ungated_shared", "shared_width",
                           "qk_norm_head", "qkv_bias", "partial_rope", "sigmoid_router",
                           "router_groups", "routed_scaling", "unnormalised_weights",
                           "renormalised_weights"},
    options=_options, moe=sigmoid_moe, config_values=_config_values, rope=_rope,
    layer_parts=CORRECTION_BIAS, adapt_weights=_without_prediction_layers)
