"""HunYuan-MoE-V1 (transformers' class): QK-norm per head after RoPE, one ungated shared
expert, the top-k weights always renormalised, a fixed-alpha NTK RoPE."""
from moekit.config import ModelConfig, MoEConfig
from moekit.convert.families.family import (SOFTMAX_TOP_K, Family, refuse_if, required,
                                            rope_from_hf)


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
