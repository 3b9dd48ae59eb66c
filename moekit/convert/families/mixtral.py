"""Mixtral: routed experts only, every layer sparse, experts stored as w1 (gate), w3 (up) and
w2 (down) under ``block_sparse_moe``."""
from moekit.config import ModelConfig, MoEConfig
from moekit.convert.families.family import (MOST_FAMILIES, SOFTMAX_TOP_K, Family,
                                            PerExpertFiles, required)


def routed_moe(values: dict) -> MoEConfig:
    """The sparse block of Mixtral and GraniteMoE: ``num_local_experts`` experts as wide as
    ``intermediate_size``, renormalised top-k."""
    return MoEConfig(hidden_size=required(values, "hidden_size"),
                     ffn_size=required(values, "intermediate_size"),
                     num_experts=required(values, "num_local_experts"),
                     top_k=required(values, "num_experts_per_tok"))


def routed_moe_values(config: ModelConfig) -> dict:
    return dict(intermediate_size=config.moe.ffn_size, num_local_experts=config.moe.num_experts,
                num_experts_per_tok=config.moe.top_k)


MIXTRAL = Family(
    model_type="mixtral", architecture="MixtralForCausalLM",
    holds=MOST_FAMILIES | SOFTMAX_TOP_K | {"moe", "no_shared", "sliding_window"}, moe=routed_moe,
    config_values=routed_moe_values,
    expert_files=PerExpertFiles(block="block_sparse_moe", gate="w1", up="w3", down="w2"),
    window_by_default=True)
