"""GraniteMoE: Mixtral's sparse block with embedding, attention, residual and logit
multipliers; its files hold the experts stacked already, under other names. GraniteMoE-Shared
adds one ungated shared expert, its gate and up projections fused into one matrix."""
from dataclasses import replace

from moekit.config import ModelConfig
from moekit.convert.families.family import (MOST_FAMILIES, SOFTMAX_TOP_K, Family, required,
                                            shared_width)
from moekit.convert.families.mixtral import routed_moe, routed_moe_values

# Its scalings, under the same names in its config.json and in ModelConfig.
GRANITE_SCALINGS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                    "logits_scaling")


def _config_values(config: ModelConfig) -> dict:
    return {**routed_moe_values(config),
            **{key: getattr(config, key) for key in GRANITE_SCALINGS},
            "attention_multiplier": (config.attention_multiplier
                                     or config.attention_head_dim ** -0.5)}


GRANITEMOE = Family(
    model_type="granitemoe", architecture="GraniteMoeForCausalLM",
    holds=MOST_FAMILIES | SOFTMAX_TOP_K | {"moe", "no_shared", "granite_scalings",
                                          "attention_bias"},
    options=lambda values: {key: float(required(values, key)) for key in GRANITE_SCALINGS},
    moe=routed_moe, config_values=_config_values,
    layer_parts=(("block_sparse_moe.router.layer.", "ffn.router."),
                 ("block_sparse_moe.input_linear.weight", "ffn.experts.gate_up_proj"),
                 ("block_sparse_moe.output_linear.weight", "ffn.experts.down_proj")),
    expert_files=None)


def _shared_moe(values: dict):
    width = values.get("shared_intermediate_size") or 0
    return replace(routed_moe(values), num_shared_experts=1 if width else 0,
                   shared_ffn_size=width or None)


GRANITEMOESHARED = replace(
    GRANITEMOE, model_type="granitemoeshared", architecture="GraniteMoeSharedForCausalLM",
    holds=GRANITEMOE.holds | {"ungated_shared", "shared_width"}, moe=_shared_moe,
    layer_parts=GRANITEMOE.layer_parts + (
        ("shared_mlp.output_linear.", "ffn.shared_experts.down_proj."),),
    config_values=lambda config: {**_config_values(config),
                                  "shared_intermediate_size": shared_width(config.moe)},
    # moekit's shared expert keeps gate and up apart; the files hold them as one.
    fused=(("shared_mlp.input_linear.weight",
            ("ffn.shared_experts.gate_proj.weight", "ffn.shared_experts.up_proj.weight")),))
