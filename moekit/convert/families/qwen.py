"""Qwen2-MoE (QKV bias, a shared expert behind a sigmoid gate) and Qwen3-MoE (QK-norm per
head): a sparse layer every ``decoder_sparse_step``, except the ``mlp_only_layers``."""
from moekit.config import ModelConfig, MoEConfig
from moekit.convert.families.family import (SOFTMAX_TOP_K, Family, num_experts, required,
                                            shared_width, weights_renormalised)


def _moe(values: dict, with_shared: bool = True) -> MoEConfig:
    # Qwen3-MoE has no shared expert: its class ignores a shared_expert_intermediate_size.
    shared = (values.get("shared_expert_intermediate_size") or 0) if with_shared else 0
    return MoEConfig(hidden_size=required(values, "hidden_size"),
                     ffn_size=required(values, "moe_intermediate_size"),
                     num_experts=num_experts(values),
                     top_k=required(values, "num_experts_per_tok"),
                     normalize_weights=bool(values.get("norm_topk_prob", False)),
                     num_shared_experts=1 if shared else 0, shared_ffn_size=shared or None,
                     shared_expert_gate=bool(shared))


def _config_values(config: ModelConfig) -> dict:
    moe = config.moe
    return dict(moe_intermediate_size=moe.ffn_size, num_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, norm_topk_prob=weights_renormalised(moe),
                decoder_sparse_step=config.moe_every, mlp_only_layers=list(config.dense_layers))


def _sparse_layers(values: dict) -> dict:
    return dict(moe_every=values.get("decoder_sparse_step", 1),
                dense_layers=values.get("mlp_only_layers") or ())


QWEN_MOE = SOFTMAX_TOP_K | {"moe", "moe_every", "dense_layers", "dense_layers_not_first",
                           "head_dim", "unnormalised_weights", "rope_scaling", "gqa"}

QWEN2_MOE = Family(
    model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM",
    holds=QWEN_MOE | {"no_qk_norm", "qkv_bias", "no_qkv_bias", "gated_shared", "shared_width"},
    options=lambda values: dict(qkv_bias=bool(values.get("qkv_bias", True)),
                                **_sparse_layers(values)),
    moe=_moe,
    config_values=lambda config: {**_config_values(config), "qkv_bias": config.qkv_bias,
                                  "shared_expert_intermediate_size": shared_width(config.moe)},
    layer_parts=(("mlp.shared_expert_gate.", "ffn.shared_gate."),
                 ("mlp.shared_expert.", "ffn.shared_experts.")))

QWEN3_MOE = Family(
    model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM",
    holds=QWEN_MOE | {"qk_norm_head", "no_qkv_bias", "no_shared", "attention_bias"},
    options=lambda values: dict(qk_norm=True, qk_norm_placement="head",
                                **_sparse_layers(values)),
    moe=lambda values: _moe(values, with_shared=False), config_values=_config_values)
