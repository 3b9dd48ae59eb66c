"""OLMoE: QK-norm over the whole q/k projection, top-k weights renormalised or not."""
from moekit.config import ModelConfig, MoEConfig
from moekit.convert.families.family import (SOFTMAX_TOP_K, Family, num_experts, required,
                                            weights_renormalised)


def _moe(values: dict) -> MoEConfig:
    return MoEConfig(hidden_size=required(values, "hidden_size"),
                     ffn_size=required(values, "intermediate_size"),
                     num_experts=num_experts(values),
                     top_k=required(values, "num_experts_per_tok"),
                     normalize_weights=bool(values.get("norm_topk_prob", False)))


def _config_values(config: ModelConfig) -> dict:
    moe = config.moe
    return dict(intermediate_size=moe.ffn_size, num_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, norm_topk_prob=weights_renormalised(moe),
                clip_qkv=None)


OLMOE = Family(
    model_type="olmoe", architecture="OlmoeForCausalLM",
    # Its config has no head_dim: transformers derives it, and the width of QK-norm, from
    # hidden_size / num_attention_heads.
    holds=SOFTMAX_TOP_K | {"moe", "qk_norm_projection", "no_qkv_bias", "unnormalised_weights",
                           "no_shared", "rope_scaling", "attention_bias", "gqa"},
    options=lambda values: dict(qk_norm=True, qk_norm_placement="projection"),
    moe=_moe, config_values=_config_values)
