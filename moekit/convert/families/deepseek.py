"""DeepSeek-V2 and DeepSeek-V3 (transformers' classes), GLM4-MoE-Lite (V3's architecture), and
what they share with GLM4-MoE.

Both: multi-head latent attention (``ModelConfig.mla``), the first ``first_k_dense_replace``
layers dense, ``n_shared_experts`` ungated shared experts (one MLP of their summed width),
group-limited routing (``n_group``, ``topk_group``) and a ``routed_scaling_factor``, as entries
of ``MoEConfig.router_options``. V2 routes by softmax (groups scored by their best expert,
``topk_method="group_limited_greedy"``; transformers never renormalises its top-k weights);
V3 by sigmoid scores with ``e_score_correction_bias`` (moekit's sigmoid gate and its balancing
bias; groups scored by their two best), renormalised when ``norm_topk_prob``.

DeepSeek lays each RoPE part out in interleaved pairs (x0, x1), (x2, x3), ... (V2 always, V3
when ``rope_interleave``); moekit rotates halves (x0 .. x_{R/2-1} with x_{R/2} ..). Import
reorders the rows of the projections that make the rotated query and key parts (evens, then
odds), which leaves every score q . k as it was; export puts them back. Multi-token-prediction
layers (numbered from ``num_hidden_layers`` on, which transformers does not load) are left out.
"""
from __future__ import annotations

import re

import torch

from moekit.config import MLAConfig, ModelConfig, MoEConfig
from moekit.convert.families.family import (MOST_FAMILIES, Family, refuse_if, required,
                                            weights_renormalised)

GROUP_OPTIONS = ("n_group", "topk_group", "routed_scaling_factor")


def router_options(values: dict) -> dict:
    """n_group, topk_group and routed_scaling_factor, as the router_options of the gate."""
    n_group = values.get("n_group") or 1
    return {"n_group": n_group, "topk_group": values.get("topk_group") or n_group,
            "routed_scaling_factor": float(values.get("routed_scaling_factor", 1.0))}


def shared_routed_moe(values: dict, **routing) -> MoEConfig:
    """The sparse block of DeepSeek and GLM4-MoE: ``n_routed_experts`` experts of
    ``moe_intermediate_size``, and ``n_shared_experts`` as wide each, summed into one."""
    width = required(values, "moe_intermediate_size")
    shared = values.get("n_shared_experts") or 0
    return MoEConfig(hidden_size=required(values, "hidden_size"), ffn_size=width,
                     num_experts=required(values, "n_routed_experts"),
                     top_k=required(values, "num_experts_per_tok"),
                     num_shared_experts=1 if shared else 0,
                     shared_ffn_size=shared * width or None, **routing)


def sigmoid_moe(values: dict) -> MoEConfig:
    """DeepSeek-V3's and GLM4-MoE's routing: sigmoid scores, the correction bias, which
    balances the load in training in place of a balancing loss (V3's auxiliary-loss-free
    balancing; moekit's default step, 1e-3, is V3's)."""
    return shared_routed_moe(values, router="sigmoid", aux_loss="none",
                             normalize_weights=bool(values.get("norm_topk_prob", True)),
                             router_options=router_options(values))


def first_dense_layers(values: dict) -> tuple[int, ...]:
    return tuple(range(min(values.get("first_k_dense_replace") or 0,
                           required(values, "num_hidden_layers"))))


def shared_routed_values(config: ModelConfig) -> dict:
    """The config.json entries of the sparse block and the dense layers (the inverse of
    ``shared_routed_moe`` and ``first_dense_layers``)."""
    moe = config.moe
    shared, rest = divmod(moe.num_shared_experts * (moe.shared_ffn_size or moe.ffn_size),
                          moe.ffn_size)
    if rest:
        raise ValueError("the DeepSeek and GLM4-MoE layouts hold shared experts as wide as a "
                         f"whole number of routed experts (of {moe.ffn_size})")
    options = {**router_options({}), **moe.router_options}
    return dict(moe_intermediate_size=moe.ffn_size, n_routed_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, n_shared_experts=shared,
                first_k_dense_replace=len(config.dense_layers),
                norm_topk_prob=weights_renormalised(moe), num_nextn_predict_layers=0,
                **{name: options[name] for name in GROUP_OPTIONS})


def _mla_options(values: dict) -> dict:
    refuse_if(bool(values.get("attention_bias")), "attention_bias", values,
              "moekit's latent attention has no biases")
    mla = MLAConfig(**{name: required(values, name) for name in (
        "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")},
        q_lora_rank=values.get("q_lora_rank"))
    # The config's head_dim and num_key_value_heads describe transformers' expanded heads.
    return dict(mla=mla, num_kv_heads=None, head_dim=None, qkv_bias=False,
                attention_out_bias=False, dense_layers=first_dense_layers(values))


def _mla_values(config: ModelConfig) -> dict:
    mla = config.mla
    return dict(kv_lora_rank=mla.kv_lora_rank, q_lora_rank=mla.q_lora_rank,
                qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
                v_head_dim=mla.v_head_dim, head_dim=mla.qk_rope_head_dim,
                **shared_routed_values(config))


def _v2_moe(values: dict) -> MoEConfig:
    method = values.get("topk_method") or "greedy"
    refuse_if(method not in ("greedy", "group_limited_greedy"), "topk_method", values,
              "transformers' DeepSeek-V2 routes by 'greedy' or 'group_limited_greedy'")
    options = router_options(values if method == "group_limited_greedy" else
                             {"routed_scaling_factor": values.get("routed_scaling_factor", 1.0)})
    return shared_routed_moe(values, router="softmax", normalize_weights=False,
                             router_options=options)


def _v2_values(config: ModelConfig) -> dict:
    limited = config.moe.router_options.get("n_group", 1) > 1
    return {**_mla_values(config), "norm_topk_prob": False,
            "topk_method": "group_limited_greedy" if limited else "greedy"}


def _rope_order(width: int, to_halves: bool) -> torch.Tensor:
    """Row order that turns interleaved pairs into halves (evens, then odds), or back."""
    order = torch.cat([torch.arange(0, width, 2), torch.arange(1, width, 2)])
    return order if to_halves else torch.argsort(order)


def _reorder_rope_rows(weight: torch.Tensor, block: int, start: int, width: int,
                       to_halves: bool) -> torch.Tensor:
    """``weight`` [n * block, in] with rows ``start .. start + width`` of every block of
    ``block`` rows being one RoPE part: those rows reordered."""
    order = torch.arange(block)
    order[start:start + width] = start + _rope_order(width, to_halves)
    return weight.view(-1, block, weight.shape[-1])[:, order].reshape(weight.shape)


def adapt_mla_weights(state: dict, values: dict, to_moekit: bool) -> dict:
    """Tensors in transformers' naming: RoPE rows from interleaved pairs to halves (import) or
    back (export), where the config interleaves; on import, multi-token-prediction layers
    left out."""
    interleaved = values["model_type"] == "deepseek_v2" or values.get("rope_interleave", True)
    nope, rope = required(values, "qk_nope_head_dim"), required(values, "qk_rope_head_dim")
    rank = required(values, "kv_lora_rank")
    layers = required(values, "num_hidden_layers")
    adapted = {}
    for name, tensor in state.items():
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if to_moekit and layer and int(layer.group(1)) >= layers:
            continue
        if interleaved and name.endswith((".q_proj.weight", ".q_b_proj.weight")):
            tensor = _reorder_rope_rows(tensor, nope + rope, nope, rope, to_moekit)
        elif interleaved and name.endswith(".kv_a_proj_with_mqa.weight"):
            tensor = _reorder_rope_rows(tensor, rank + rope, rank, rope, to_moekit)
        adapted[name] = tensor
    return adapted


# The features both DeepSeek families hold.
DEEPSEEK = (MOST_FAMILIES - {"head_dim", "gqa"}) | {
    "moe", "mla", "dense_layers", "ungated_shared", "shared_width", "router_groups",
    "routed_scaling"}
# The correction bias is the sigmoid gate's balancing bias.
CORRECTION_BIAS = (("mlp.gate.e_score_correction_bias", "ffn.router.balance_bias"),)

DEEPSEEK_V2 = Family(
    model_type="deepseek_v2", architecture="DeepseekV2ForCausalLM",
    holds=DEEPSEEK | {"softmax_router", "unnormalised_weights"},
    options=_mla_options, moe=_v2_moe, config_values=_v2_values,
    adapt_weights=adapt_mla_weights)

def _lite_options(values: dict) -> dict:
    kinds = values.get("mlp_layer_types") or (
        ["dense"] + ["sparse"] * (required(values, "num_hidden_layers") - 1))
    refuse_if(set(kinds) - {"dense", "sparse"}, "mlp_layer_types", values,
              "expected 'dense' or 'sparse' for each layer")
    return {**_mla_options(values),
            "dense_layers": tuple(i for i, kind in enumerate(kinds) if kind == "dense")}


def _lite_values(config: ModelConfig) -> dict:
    values = {**_mla_values(config), "rope_interleave": True}
    del values["first_k_dense_replace"], values["num_nextn_predict_layers"]
    values["mlp_layer_types"] = ["dense" if i in config.dense_layers else "sparse"
                                 for i in range(config.num_layers)]
    return values


DEEPSEEK_V3 = Family(
    model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM",
    holds=DEEPSEEK | {"sigmoid_router", "unnormalised_weights", "renormalised_weights"},
    options=_mla_options, moe=sigmoid_moe,
    config_values=lambda config: {**_mla_values(config), "rope_interleave": True},
    layer_parts=CORRECTION_BIAS, adapt_weights=adapt_mla_weights)

# GLM-4.7-Flash's layout: DeepSeek-V3's architecture, its dense layers listed per layer
# (``mlp_layer_types``) rather than counted.
GLM4_MOE_LITE = Family(
    model_type="glm4_moe_lite", architecture="Glm4MoeLiteForCausalLM",
    holds=DEEPSEEK_V3.holds | {"dense_layers_not_first"}, options=_lite_options,
    moe=sigmoid_moe, config_values=_lite_values, layer_parts=CORRECTION_BIAS,
    adapt_weights=adapt_mla_weights)
