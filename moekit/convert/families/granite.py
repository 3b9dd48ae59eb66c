"""GraniteMoE: Mixtral's sparse block with embedding, attention, residual and logit
multipliers; its files hold the experts stacked already, under other names."""
from moekit.config import ModelConfig
from moekit.convert.families.family import MOST_FAMILIES, SOFTMAX_TOP_K, Family, required
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
