"""Hugging Face layouts: configs and weight names, both ways, and what each layout can hold.

The layouts (``LAYOUTS``: MoE ones and the dense sources of upcycling) are the families of
``moekit.convert.families``; this module holds what they share and reads each family's
description for the rest, with no branch on a family's name. A config travels as the plain
dict of a ``config.json`` (a transformers config object is read through its ``to_dict()``).

Weights come in three namings:

- moekit's (``layers.3.ffn.experts.gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F]);
- transformers' in memory (v5): the same stacked experts in the same out-by-in order under
  other names (``model.layers.3.mlp.experts.gate_up_proj``);
- the files on the Hub, as the family's ``expert_files`` says: mostly one tensor per expert,
  ``mlp.experts.7.gate_proj.weight`` (Qwen, OLMoE, HunYuan) or
  ``block_sparse_moe.experts.7.w1.weight`` (Mixtral: w1 gate, w3 up, w2 down).

Import goes files -> stacked -> moekit; export goes back. Every step is a rename, a
concatenation or a split, so a round trip is bit-exact.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from moekit.config import ModelConfig, MoEConfig
from moekit.convert.families import (FAMILIES, GRANITE_SCALINGS, LAYOUTS, MOE_LAYOUTS, Family,
                                     family_of)
from moekit.convert.families.deepseek import GROUP_OPTIONS
from moekit.convert.families.family import (refuse_if, required, rope_to_hf, shared_width,
                                            weights_renormalised)
from moekit.model import Transformer
from moekit.model.io import describe_mismatch
from moekit.moe import MoELayer


def _as_dict(hf_config) -> dict:
    return hf_config if isinstance(hf_config, dict) else hf_config.to_dict()


def _sliding_window(values: dict, family: Family, context: int) -> dict:
    """ModelConfig's sliding_window (None: none, or one no shorter than the ``context``) and
    full_attention_layers; v5 configs say per layer (``layer_types``), older ones by a switch
    for every layer."""
    layer_types = values.get("layer_types")
    if layer_types:
        full = [index for index, kind in enumerate(layer_types) if kind != "sliding_attention"]
        used = len(full) < len(layer_types)
    else:
        full, used = [], values.get("use_sliding_window", family.window_by_default)
    window = values.get("sliding_window")
    if not used or not window or window >= context:
        return dict(sliding_window=None)
    refuse_if("sliding_window" not in family.holds, "sliding_window", values,
              f"moekit reads no sliding window for {family.model_type}")
    refuse_if(bool(full) and "full_attention_layers" not in family.holds, "layer_types", values,
              f"moekit reads a window in every layer of {family.model_type} or none")
    return dict(sliding_window=window, full_attention_layers=full)


def _context(values: dict, rope_scaling: dict | None) -> int:
    """The positions moekit accepts: the config's, or ``factor`` times as many with dynamic
    scaling, which exists to stretch RoPE past them."""
    context = required(values, "max_position_embeddings")
    if rope_scaling is not None and rope_scaling["rope_type"] == "dynamic":
        return int(context * max(rope_scaling["factor"], 1))
    return context


def moe_config_from_hf(hf_config) -> MoEConfig:
    """The MoEConfig of one sparse block of a config of one of ``MOE_LAYOUTS``."""
    values = _as_dict(hf_config)
    model_type = values.get("model_type")
    if model_type not in MOE_LAYOUTS:
        raise ValueError(f"model_type={model_type!r} is not an MoE layout moekit reads: "
                         f"expected one of {', '.join(MOE_LAYOUTS)}")
    return FAMILIES[model_type].moe(values)


def model_config_from_hf(hf_config) -> ModelConfig:
    """The ModelConfig of a Hugging Face config of one of ``LAYOUTS``."""
    values = _as_dict(hf_config)
    family = family_of(values.get("model_type"))
    refuse_if(values.get("hidden_act", "silu") != "silu", "hidden_act", values,
              "expected 'silu' (SwiGLU feed-forward blocks)")
    refuse_if(bool(values.get("mlp_only_layers")) and "dense_layers" not in family.holds,
              "mlp_only_layers", values, f"the {family.model_type} family has no dense layers")
    refuse_if(bool(values.get("mlp_bias")), "mlp_bias", values, "moekit's FFNs have no bias")
    # transformers' attention_bias biases q, k, v and o_proj, in the families that read it and
    # do not say otherwise (their options set attention_out_bias).
    attention_bias = bool(values.get("attention_bias"))
    options = family.options(values)
    refuse_if(attention_bias and "attention_bias" not in family.holds
              and "attention_out_bias" not in options, "attention_bias", values,
              f"transformers' {family.model_type} reads no attention_bias")
    refuse_if(values.get("clip_qkv") is not None, "clip_qkv", values,
              "moekit does not clamp q/k/v")
    refuse_if(bool(values.get("use_cla")) and "cla" not in family.holds, "use_cla", values,
              f"transformers' {family.model_type} computes K/V in every layer")
    rope_base, rope_scaling = family.rope(values)
    refuse_if(rope_scaling is not None and "rope_scaling" not in family.holds, "rope_parameters",
              values, f"moekit reads only plain RoPE for {family.model_type}")
    context = _context(values, rope_scaling)
    fields = dict(
        vocab_size=required(values, "vocab_size"), hidden_size=required(values, "hidden_size"),
        num_layers=required(values, "num_hidden_layers"),
        num_heads=required(values, "num_attention_heads"),
        num_kv_heads=values.get("num_key_value_heads"), head_dim=values.get("head_dim"),
        ffn_size=required(values, "intermediate_size"),
        max_seq_len=context, rope_base=rope_base, rope_scaling=rope_scaling,
        **_sliding_window(values, family, context),
        norm_eps=float(required(values, "rms_norm_eps")),
        tie_embeddings=bool(values.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias, attention_out_bias=attention_bias,
        moe=None if family.moe is None else family.moe(values))
    return ModelConfig(**{**fields, **options})


# ---- What each layout can hold -------------------------------------------------------------

@dataclass(frozen=True)
class Feature:
    key: str  # what a Family's ``holds`` names it by
    name: str
    present: Callable[[ModelConfig], bool]

    @property
    def layouts(self) -> tuple[str, ...]:
        """The layouts that can hold it."""
        return tuple(name for name, family in FAMILIES.items() if self.key in family.holds)


def _moe(config: ModelConfig, test: Callable[[MoEConfig], bool]) -> bool:
    return config.moe is not None and test(config.moe)


def _qk_norm_feature(placement: str, where: str) -> Feature:
    return Feature(f"qk_norm_{placement}", f"QK-norm {where} (qk_norm_placement={placement!r})",
                   lambda c: c.qk_norm and c.qk_norm_placement == placement)


FEATURES = (
    Feature("moe", "MoE feed-forward layers (moe set)", lambda c: c.moe is not None),
    Feature("dense", "a dense model (moe=None)", lambda c: c.moe is None),
    Feature("moe_every", "dense layers between MoE layers (moe_every > 1)",
            lambda c: c.moe is not None and c.moe_every > 1),
    Feature("dense_layers", "a list of dense layers (dense_layers)",
            lambda c: c.moe is not None and bool(c.dense_layers)),
    Feature("dense_layers_not_first", "dense layers other than the first k (dense_layers)",
            lambda c: c.moe is not None and c.dense_layers != tuple(range(len(c.dense_layers)))),
    Feature("gqa", "grouped-query attention (mla=None)", lambda c: c.mla is None),
    Feature("mla", "multi-head latent attention (mla)", lambda c: c.mla is not None),
    Feature("partial_rope", "RoPE over part of each head (rotary_dim)",
            lambda c: c.rotary_dim not in (None, c.attention_head_dim)),
    Feature("cla", "cross-layer attention (cla_share > 1)", lambda c: c.cla_share > 1),
    Feature("head_dim", "a head_dim other than hidden_size / num_heads",
            lambda c: c.mla is None and c.attention_head_dim * c.num_heads != c.hidden_size),
    _qk_norm_feature("head", "per head before RoPE"),
    _qk_norm_feature("head_after_rope", "per head after RoPE"),
    _qk_norm_feature("projection", "over the whole q/k projection"),
    Feature("no_qk_norm", "attention without QK-norm (qk_norm=False)", lambda c: not c.qk_norm),
    Feature("granite_scalings", f"GraniteMoE's scalings ({', '.join(GRANITE_SCALINGS)})",
            lambda c: (c.embedding_multiplier, c.residual_multiplier, c.attention_multiplier,
                       c.logits_scaling) != (1.0, 1.0, None, 1.0)),
    Feature("qkv_bias", "QKV bias without an o_proj bias (qkv_bias=True)",
            lambda c: c.qkv_bias and not c.attention_out_bias),
    Feature("attention_bias", "biases on q, k, v and o_proj (qkv_bias and attention_out_bias)",
            lambda c: c.qkv_bias and c.attention_out_bias),
    Feature("out_bias_only", "an o_proj bias without QKV bias (attention_out_bias=True)",
            lambda c: c.attention_out_bias and not c.qkv_bias),
    Feature("rope_scaling", "scaled RoPE (rope_scaling)", lambda c: c.rope_scaling is not None),
    Feature("sliding_window", "a sliding window (sliding_window)",
            lambda c: c.sliding_window is not None),
    Feature("full_attention_layers", "a sliding window in some layers only "
            "(full_attention_layers)",
            lambda c: c.sliding_window is not None and bool(c.full_attention_layers)),
    Feature("no_qkv_bias", "attention without QKV bias (qkv_bias=False)",
            lambda c: not c.qkv_bias),
    Feature("activation", "an activation other than SwiGLU",
            lambda c: c.activation != "swiglu" or _moe(c, lambda m: m.activation != "swiglu")),
    Feature("softmax_router", "the softmax or switch router",
            lambda c: _moe(c, lambda m: m.router in ("softmax", "switch"))),
    Feature("sigmoid_router", "the sigmoid router",
            lambda c: _moe(c, lambda m: m.router == "sigmoid")),
    Feature("fastmoe_router", "FastMoE's zero, noisy or gshard router",
            lambda c: _moe(c, lambda m: m.router in ("zero", "noisy", "gshard"))),
    Feature("router_groups", "group-limited routing (router_options n_group > 1)",
            lambda c: _moe(c, lambda m: m.router_options.get("n_group", 1) > 1)),
    Feature("routed_scaling", "a routed scaling factor (router_options routed_scaling_factor)",
            lambda c: _moe(c, lambda m: m.router_options.get("routed_scaling_factor", 1) != 1)),
    Feature("router_options", "router_options other than n_group, topk_group and "
            "routed_scaling_factor (a gate bias, say)",
            lambda c: _moe(c, lambda m: set(m.router_options) - set(GROUP_OPTIONS))),
    Feature("logit_norm", "gating-logit normalization (logit_norm_scale)",
            lambda c: _moe(c, lambda m: m.logit_norm_scale is not None)),
    Feature("eval_capacity", "token dropping in evaluation (eval_capacity_factor)",
            lambda c: _moe(c, lambda m: m.eval_capacity_factor is not None)),
    Feature("unnormalised_weights",
            "top-k weights not renormalised (normalize_weights=False or router='switch')",
            lambda c: _moe(c, lambda m: not weights_renormalised(m))),
    Feature("renormalised_weights", "top-k weights renormalised (normalize_weights=True)",
            lambda c: _moe(c, weights_renormalised)),
    Feature("gated_shared", "shared experts with a sigmoid gate (shared_expert_gate=True)",
            lambda c: _moe(c, lambda m: m.num_shared_experts > 0 and m.shared_expert_gate)),
    Feature("ungated_shared", "shared experts without a gate (shared_expert_gate=False)",
            lambda c: _moe(c, lambda m: m.num_shared_experts > 0 and not m.shared_expert_gate)),
    Feature("shared_width", "shared experts not as wide in all as one routed expert",
            lambda c: _moe(c, lambda m: m.num_shared_experts > 0
                           and shared_width(m) != m.ffn_size)),
    Feature("no_shared", "MoE layers without a shared expert",
            lambda c: _moe(c, lambda m: m.num_shared_experts == 0)),
)
_unknown = {key for family in FAMILIES.values() for key in family.holds} - {
    feature.key for feature in FEATURES}
assert not _unknown, f"families hold features that FEATURES lacks: {sorted(_unknown)}"


def check_exportable(config: ModelConfig, layout: str) -> None:
    """Raise a ValueError naming the first feature of ``config`` that ``layout`` cannot hold,
    and the layouts that can."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported: expected one of "
                         f"{', '.join(LAYOUTS)}")
    for feature in FEATURES:
        if feature.present(config) and layout not in feature.layouts:
            where = (f"layouts that can: {', '.join(feature.layouts)}" if feature.layouts
                     else "no Hugging Face layout moekit writes can")
            raise ValueError(f"the {layout} layout cannot hold {feature.name}; {where}")


def hf_config_from_model(config: ModelConfig, layout: str) -> dict:
    """The ``config.json`` of ``layout`` for a model ``check_exportable`` accepts."""
    check_exportable(config, layout)
    family = FAMILIES[layout]
    dynamic = config.rope_scaling is not None and config.rope_scaling["rope_type"] == "dynamic"
    return {
        "architectures": [family.architecture], "model_type": layout, "hidden_act": "silu",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.attention_head_dim,
        "intermediate_size": config.ffn_size,
        "max_position_embeddings": (config.rope_scaling["original_max_position_embeddings"]
                                    if dynamic else config.max_seq_len),
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        **rope_to_hf(config), "sliding_window": config.sliding_window,
        "use_sliding_window": config.sliding_window is not None,
        "attention_bias": config.attention_out_bias, **family.config_values(config),
    }


# ---- Weight names ------------------------------------------------------------------------

# Inside one layer, Hugging Face prefix <-> moekit prefix; the first that matches is used,
# a family's own names (Family.layer_parts) before these.
_LAYER_PARTS = (
    ("self_attn.", "attn."), ("input_layernorm.", "attn_norm."),
    ("post_attention_layernorm.", "ffn_norm."), ("mlp.gate.", "ffn.router."), ("mlp.", "ffn."),
)
_TOP_LEVEL = (("model.embed_tokens.", "embed_tokens."), ("model.norm.", "norm."),
              ("lm_head.", "lm_head."))
# Training state of moekit that no Hugging Face layout stores; an import starts it afresh.
MOEKIT_ONLY = ("router_step", "aux_coefficient.value", "balance_bias")


def _rename(name: str, layout: str, to_moekit: bool) -> str:
    source, target = (0, 1) if to_moekit else (1, 0)
    layer = re.match(r"(model\.)?layers\.(\d+)\.", name)
    if layer:
        rest = name[layer.end():]
        for pair in family_of(layout).layer_parts + _LAYER_PARTS:
            if rest.startswith(pair[source]):
                rest = pair[target] + rest[len(pair[source]):]
                break
        return f"{'' if to_moekit else 'model.'}layers.{layer.group(2)}.{rest}"
    for pair in _TOP_LEVEL:
        if name.startswith(pair[source]):
            return pair[target] + name[len(pair[source]):]
    return name


def hf_to_moekit_state(hf_state: dict, layout: str) -> dict:
    """Rename a state dict of ``layout`` in transformers' in-memory naming, splitting the
    family's fused tensors."""
    fused = dict(family_of(layout).fused)
    state = {}
    for name, tensor in hf_state.items():
        layer = re.match(r"(model\.)?layers\.(\d+)\.", name)
        parts = fused.get(name[layer.end():]) if layer else None
        if parts is None:
            state[_rename(name, layout, to_moekit=True)] = tensor
            continue
        for part, piece in zip(parts, tensor.chunk(len(parts))):
            state[f"layers.{layer.group(2)}.{part}"] = piece
    return state


def _stored(name: str, family: Family) -> bool:
    """Whether a layout stores the tensor: all but moekit's training state, unless the family
    names it (DeepSeek-V3's correction bias is the sigmoid gate's balancing bias)."""
    return (not name.endswith(MOEKIT_ONLY)
            or any(name.endswith(moekit.rstrip(".")) for _, moekit in family.layer_parts))


def moekit_to_hf_state(state: dict, layout: str) -> dict:
    """The inverse of ``hf_to_moekit_state``, leaving out moekit's training state."""
    family = family_of(layout)
    fused_as = {part: (name, index) for name, parts in family.fused
                for index, part in enumerate(parts)}
    hf_state, pieces = {}, {}
    for name, tensor in state.items():
        if not _stored(name, family):
            continue
        layer = re.match(r"layers\.(\d+)\.", name)
        fused = fused_as.get(name[layer.end():]) if layer else None
        if fused is None:
            hf_state[_rename(name, layout, to_moekit=False)] = tensor
        else:
            pieces.setdefault(f"model.layers.{layer.group(1)}.{fused[0]}", {})[fused[1]] = tensor
    for name, by_index in pieces.items():
        hf_state[name] = torch.cat([by_index[index] for index in sorted(by_index)])
    return hf_state


def stacking_plan(file_names, layout: str) -> dict[str, str | list[list[str]]]:
    """Which file tensors (Hub naming, one tensor per expert as the family's ``expert_files``
    says) make each tensor of transformers' in-memory naming (stacked, under ``mlp``): the one
    file tensor it is renamed from, or, for stacked experts, per expert the matrices
    concatenated (gate then up), in expert order. A stacked tensor's bytes are those of its
    matrices in this order, so it can be written without being built."""
    files = family_of(layout).expert_files
    if files is None:
        return {name: name for name in file_names}
    block = f".{files.block}."
    roles = {files.gate: "gate_proj", files.up: "up_proj", files.down: "down_proj"}
    one_expert = re.compile(rf"(.*){re.escape(block)}experts\.(\d+)\."
                            rf"({'|'.join(map(re.escape, roles))})\.weight")
    plan, per_expert = {}, {}
    for name in file_names:
        match = one_expert.fullmatch(name)
        if match is None:
            plan[name.replace(block, ".mlp.")] = name
        else:
            layer, expert, part = match.groups()
            per_expert.setdefault(f"{layer}.mlp.experts", {})[(int(expert), roles[part])] = name
    for prefix, parts in per_expert.items():
        experts = sorted({expert for expert, _ in parts})
        if experts != list(range(len(experts))) or len(parts) != 3 * len(experts):
            raise ValueError(f"{prefix}: expected gate_proj, up_proj and down_proj for experts "
                             f"0..{len(experts) - 1}, found {len(parts)} tensors")
        plan[f"{prefix}.gate_up_proj"] = [[parts[(e, "gate_proj")], parts[(e, "up_proj")]]
                                          for e in experts]
        plan[f"{prefix}.down_proj"] = [[parts[(e, "down_proj")]] for e in experts]
    return plan


def stack_experts(file_state: dict, layout: str) -> dict:
    """Hub naming -> transformers' in-memory naming (``stacking_plan``)."""
    return {name: file_state[source] if isinstance(source, str) else torch.stack(
                [torch.cat([file_state[part] for part in parts]) for parts in source])
            for name, source in stacking_plan(file_state, layout).items()}


def split_experts(hf_state: dict, layout: str) -> dict:
    """The inverse of ``stack_experts``: views of the stacked tensors, not copies."""
    files = family_of(layout).expert_files
    if files is None:
        return dict(hf_state)
    block = f".{files.block}."
    written = {}
    for name, tensor in hf_state.items():
        stacked = re.fullmatch(r"(.*)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if stacked is None:
            written[name.replace(".mlp.", block)] = tensor
            continue
        layer, kind = stacked.groups()
        for expert, weight in enumerate(tensor):
            parts = (zip((files.gate, files.up), weight.chunk(2)) if kind == "gate_up_proj"
                     else [(files.down, weight)])
            for part, matrix in parts:
                written[f"{layer}{block}experts.{expert}.{part}.weight"] = matrix
    return written


def _adapted(hf_state: dict, layout: str, values: dict | None, to_moekit: bool) -> dict:
    adapt = family_of(layout).adapt_weights
    if adapt is None:
        return hf_state
    if values is None:
        raise ValueError(f"the {layout} layout's weights need its config.json values to convert")
    return adapt(hf_state, values, to_moekit)


def from_stacked(hf_state: dict, layout: str, values: dict | None = None) -> dict:
    """transformers' in-memory naming (experts stacked) -> moekit's state dict: the family's
    adaptation, then the renames and splits. Tensor by tensor: any part of a state dict
    converts on its own."""
    return hf_to_moekit_state(_adapted(hf_state, layout, values, True), layout)


def import_weights(file_state: dict, layout: str, values: dict | None = None) -> dict:
    """Tensors as a Hugging Face folder of ``layout`` stores them -> moekit's state dict;
    ``values`` (the folder's config.json) for the families that adapt their tensors."""
    return from_stacked(stack_experts(file_state, layout), layout, values)


def export_weights(state: dict, layout: str, values: dict | None = None) -> dict:
    """moekit's state dict -> tensors as a Hugging Face folder of ``layout`` stores them;
    ``values``: the config.json written beside them."""
    return split_experts(_adapted(moekit_to_hf_state(state, layout), layout, values, False),
                         layout)


# ---- Models and blocks in memory (transformers objects) ------------------------------------

@torch.no_grad()
def load_hf_moe_block(layer: MoELayer, block: nn.Module) -> MoELayer:
    """Copy the weights of a Hugging Face sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE) into
    ``layer``, which must have the same shapes. Returns the layer."""
    layer.router.weight.copy_(block.gate.weight)
    layer.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
    layer.experts.down_proj.copy_(block.experts.down_proj)
    shared = getattr(block, "shared_expert", None)
    if shared is not None:
        layer.shared_experts.load_state_dict(shared.state_dict())
        layer.shared_gate.weight.copy_(block.shared_expert_gate.weight)
    return layer


def moe_layer_from_hf_block(block: nn.Module, hf_config) -> MoELayer:
    """A new MoELayer equal to a Hugging Face sparse MoE block."""
    layer = MoELayer(moe_config_from_hf(hf_config))
    return load_hf_moe_block(layer.to(block.gate.weight.dtype), block)


def load_converted_state(model: Transformer, state: dict) -> Transformer:
    """Load a state dict in moekit's naming into ``model``; a ValueError names the first
    tensor that is missing, extra or of the wrong shape."""
    if model.config.tie_embeddings:
        state = {name: t for name, t in state.items() if name != "lm_head.weight"}
    problem = describe_mismatch(model, {name: tuple(t.shape) for name, t in state.items()},
                                may_lack=MOEKIT_ONLY)
    if problem:
        raise ValueError(f"weights do not fit the model of the config: {problem}")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return model


def transformer_from_hf(hf_model) -> Transformer:
    """A moekit Transformer with the weights of a transformers model of one of ``LAYOUTS``."""
    values = hf_model.config.to_dict()
    model = Transformer(model_config_from_hf(values)).to(hf_model.dtype)
    return load_converted_state(model, hf_to_moekit_state(
        _adapted(hf_model.state_dict(), values["model_type"], values, True),
        values["model_type"]))
