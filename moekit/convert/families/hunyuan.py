"""HunYuan-MoE-V1 (transformers' class): QK-norm per head after RoPE, one ungated shared
expert, the top-k weights always renormalised, a fixed-alpha NTK RoPE. And Hunyuan-Large in
the layout of its own modeling code (``HunYuanForCausalLM``), with cross-layer attention."""
from moekit.config import ModelConfig, MoEConfig
from moekit.convert.families.family import (SOFTMAX_TOP_K, Family, refuse_if, required,
                                            rope_from_hf, shared_width, weights_renormalised)


def rope(values: dict) -> tuple[float, dict | None]:
    """HunYuan's fixed-alpha NTK RoPE ("dynamic" with an ``alpha``) only stretches the base:
    the plain rule with base * alpha ** (Dh / (Dh - 2)), as transformers and Hunyuan-Large's
    own code compute their frequencies."""
    base, scaling = rope_from_hf(values)
    if scaling is None or not scaling.get("alpha"):
        return base, scaling
    head_dim = values.get("head_dim") or values.get("attention_head_dim") or (
        required(values, "hidden_size") // required(values, "num_attention_heads"))
    return base * scaling["alpha"] ** (head_dim / (head_dim - 2)), None


def _same_in_every_layer(values: dict, key: str) -> int:
    """A value HunYuan may give as one number or as a list with one number per layer."""
    value = required(values, key)
    if isinstance(value, list):
        refuse_if(len(set(value)) != 1, key, values,
                  "moekit's MoE layers are all alike (one value for every layer)")
        return value[0]
    return value


def _moe(values: dict) -> MoEConfig:
    # Routed experts and the one ungated shared expert are all intermediate_size wide.
    shared = values.get("num_shared_expert", 1)
    refuse_if(any(count != 1 for count in (shared if isinstance(shared, list) else [shared])),
              "num_shared_expert", values,
              "transformers' HunYuan-MoE-V1 has exactly one shared expert")
    width = required(values, "intermediate_size")
    return MoEConfig(hidden_size=required(values, "hidden_size"), ffn_size=width,
                     num_experts=_same_in_every_layer(values, "num_experts"),
                     top_k=_same_in_every_layer(values, "moe_topk"),
                     num_shared_experts=1, shared_ffn_size=width)


def _config_values(config: ModelConfig) -> dict:
    return dict(intermediate_size=config.moe.ffn_size, num_experts=config.moe.num_experts,
                moe_topk=config.moe.top_k, num_shared_expert=1, use_cla=False)


HUNYUAN_V1_MOE = Family(
    model_type="hunyuan_v1_moe", architecture="HunYuanMoEV1ForCausalLM",
    holds=SOFTMAX_TOP_K | {"moe", "head_dim", "qk_norm_head_after_rope", "no_qkv_bias",
                           "ungated_shared", "attention_bias", "gqa"},
    options=lambda values: dict(qk_norm=True, qk_norm_placement="head_after_rope"),
    moe=_moe, config_values=_config_values, rope=rope,
    layer_parts=(("self_attn.query_layernorm.", "attn.q_norm."),
                 ("self_attn.key_layernorm.", "attn.k_norm."),
                 ("mlp.gate.wg.", "ffn.router."), ("mlp.shared_mlp.", "ffn.shared_experts.")))


def _large_moe(values: dict) -> MoEConfig:
    # Its own code: the top-1 gate value multiplies the expert output as it is; top-k > 1
    # weights are renormalised. The shared expert is num_shared_expert routed widths wide.
    top_k = _same_in_every_layer(values, "moe_topk")
    shared = _same_in_every_layer(values, "num_shared_expert") if values.get(
        "use_mixed_mlp_moe") else 0
    width = required(values, "intermediate_size")
    return MoEConfig(hidden_size=required(values, "hidden_size"),
                     ffn_size=values.get("moe_intermediate_size") or width,
                     num_experts=_same_in_every_layer(values, "num_experts"), top_k=top_k,
                     normalize_weights=top_k > 1, num_shared_experts=1 if shared else 0,
                     shared_ffn_size=shared * width or None)


def _large_options(values: dict) -> dict:
    cla = bool(values.get("use_cla"))
    return dict(head_dim=values.get("attention_head_dim") or values.get("head_dim"),
                qk_norm=bool(values.get("use_qk_norm")), qk_norm_placement="head_after_rope",
                cla_share=values.get("cla_share_factor", 1) if cla else 1)


def _large_values(config: ModelConfig) -> dict:
    moe = config.moe
    if (moe.top_k > 1) != weights_renormalised(moe):
        raise ValueError("the hunyuan layout renormalises the top-k weights exactly when k > 1 "
                         f"(top_k={moe.top_k}, normalize_weights={moe.normalize_weights})")
    shared = moe.num_shared_experts > 0
    return dict(moe_intermediate_size=moe.ffn_size, num_experts=moe.num_experts,
                moe_topk=moe.top_k, use_mixed_mlp_moe=shared, num_shared_expert=1,
                # One shared expert of the dense width, as the file names it.
                intermediate_size=shared_width(moe) if shared else config.ffn_size,
                use_qk_norm=config.qk_norm, use_cla=config.cla_share > 1,
                cla_share_factor=config.cla_share,
                attention_head_dim=config.attention_head_dim)


# Hunyuan-Large (Tencent's own modeling code, not in transformers): CLA with keys shared
# after RoPE and before QK-norm, each layer normalising them with its own key_layernorm.
HUNYUAN = Family(
    model_type="hunyuan", architecture="HunYuanForCausalLM",
    holds=SOFTMAX_TOP_K | {"moe", "head_dim", "qk_norm_head_after_rope", "no_qk_norm",
                           "no_qkv_bias", "ungated_shared", "no_shared", "shared_width",
                           "attention_bias", "cla", "unnormalised_weights", "gqa"},
    moe=_large_moe, options=_large_options, config_values=_large_values, rope=rope,
    layer_parts=HUNYUAN_V1_MOE.layer_parts)
