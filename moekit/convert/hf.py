"""Hugging Face layouts: configs and weight names, both ways, and what each layout can hold.

Layouts: the MoE ones ``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ``hunyuan_v1_moe``,
``granitemoe`` and the dense ones ``llama``, ``mistral``, ``qwen2`` (the sources of upcycling).
A config travels as the plain dict of a ``config.json`` (a transformers config object is read
through its ``to_dict()``).

Weights come in three namings:

- moekit's (``layers.3.ffn.experts.gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F]);
- transformers' in memory (v5): the same stacked experts in the same out-by-in order under
  other names (``model.layers.3.mlp.experts.gate_up_proj``);
- the files on the Hub, one tensor per expert: ``mlp.experts.7.gate_proj.weight`` (Qwen,
  OLMoE, HunYuan) or ``block_sparse_moe.experts.7.w1.weight`` (Mixtral: w1 gate, w3 up, w2 down).

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
from moekit.model import Transformer
from moekit.model.io import describe_mismatch
from moekit.moe import MoELayer

MOE_LAYOUTS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "hunyuan_v1_moe", "granitemoe")
DENSE_LAYOUTS = ("llama", "mistral", "qwen2")
LAYOUTS = MOE_LAYOUTS + DENSE_LAYOUTS
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "hunyuan_v1_moe": "HunYuanMoEV1ForCausalLM",
                 "granitemoe": "GraniteMoeForCausalLM", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# The layouts with QK-norm, and where each applies it (ModelConfig.qk_norm_placement).
QK_NORM_PLACEMENT = {"qwen3_moe": "head", "hunyuan_v1_moe": "head_after_rope",
                     "olmoe": "projection"}
# GraniteMoE's scalings, under the same names in its config.json and in ModelConfig.
GRANITE_SCALINGS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                    "logits_scaling")


def _as_dict(hf_config) -> dict:
    return hf_config if isinstance(hf_config, dict) else hf_config.to_dict()


def _field(values: dict, key: str):
    if values.get(key) is None:
        raise ValueError(f"{key} is missing (a {values.get('model_type')} config needs it)")
    return values[key]


def _refuse_if(condition: bool, key: str, values: dict, why: str) -> None:
    if condition:
        raise ValueError(f"{key}={values.get(key)!r} is not supported: {why}")


def _rope_base(values: dict) -> float:
    """RoPE base of a v5 (``rope_parameters``) or v4 (``rope_theta``, ``rope_scaling``) config;
    scaled RoPE (YaRN, Llama 3's) is refused, as moekit rotates by the plain rule."""
    parameters = values.get("rope_parameters") or {}
    base = float(parameters.get("rope_theta", values.get("rope_theta", 10000.0)))
    if (values.get("model_type") == "hunyuan_v1_moe" and parameters.get("rope_type") == "dynamic"
            and parameters.get("alpha")):
        # HunYuan's fixed-alpha NTK RoPE only stretches the base: the plain rule with
        # base * alpha ** (Dh / (Dh - 2)), as transformers computes its frequencies.
        head_dim = _field(values, "head_dim")
        return base * parameters["alpha"] ** (head_dim / (head_dim - 2))
    _refuse_if(parameters.get("rope_type", "default") != "default", "rope_parameters", values,
               "only plain RoPE (rope_type 'default') is supported")
    _refuse_if(values.get("rope_scaling") is not None, "rope_scaling", values,
               "only plain RoPE (no scaling) is supported")
    return base


def _context_length(values: dict) -> int:
    """The context moekit attends over: a sliding window shorter than the context becomes the
    context, so that every position moekit accepts is attended to exactly as the source does."""
    context = _field(values, "max_position_embeddings")
    window = values.get("sliding_window")
    uses_window = values.get("use_sliding_window", values["model_type"] in ("mistral", "mixtral"))
    return min(context, window) if uses_window and window else context


def _num_experts(values: dict) -> int:
    # Hub files say num_experts; transformers v5 writes num_local_experts for some families.
    return values.get("num_experts") or _field(values, "num_local_experts")


def _same_in_every_layer(values: dict, key: str) -> int:
    """A value HunYuan may give as one number or as a list with one number per layer."""
    value = _field(values, key)
    if isinstance(value, list):
        _refuse_if(len(set(value)) != 1, key, values,
                   "moekit's MoE layers are all alike (one value for every layer)")
        return value[0]
    return value


def moe_config_from_hf(hf_config) -> MoEConfig:
    """The MoEConfig of one sparse block of a config of one of ``MOE_LAYOUTS``."""
    values = _as_dict(hf_config)
    model_type = values.get("model_type")
    if model_type in ("mixtral", "granitemoe"):
        return MoEConfig(hidden_size=_field(values, "hidden_size"),
                         ffn_size=_field(values, "intermediate_size"),
                         num_experts=_field(values, "num_local_experts"),
                         top_k=_field(values, "num_experts_per_tok"))
    if model_type in ("qwen2_moe", "qwen3_moe"):
        shared = values.get("shared_expert_intermediate_size") or 0
        return MoEConfig(hidden_size=_field(values, "hidden_size"),
                         ffn_size=_field(values, "moe_intermediate_size"),
                         num_experts=_num_experts(values),
                         top_k=_field(values, "num_experts_per_tok"),
                         normalize_weights=bool(values.get("norm_topk_prob", False)),
                         num_shared_experts=1 if shared else 0, shared_ffn_size=shared or None,
                         shared_expert_gate=bool(shared))
    if model_type == "olmoe":
        return MoEConfig(hidden_size=_field(values, "hidden_size"),
                         ffn_size=_field(values, "intermediate_size"),
                         num_experts=_num_experts(values),
                         top_k=_field(values, "num_experts_per_tok"),
                         normalize_weights=bool(values.get("norm_topk_prob", False)))
    if model_type == "hunyuan_v1_moe":
        # transformers' class: routed experts and the one ungated shared expert are all
        # intermediate_size wide, and the top-k weights are always renormalised.
        shared = values.get("num_shared_expert", 1)
        _refuse_if(any(count != 1 for count in (shared if isinstance(shared, list) else [shared])),
                   "num_shared_expert", values,
                   "transformers' HunYuan-MoE-V1 has exactly one shared expert")
        width = _field(values, "intermediate_size")
        return MoEConfig(hidden_size=_field(values, "hidden_size"), ffn_size=width,
                         num_experts=_same_in_every_layer(values, "num_experts"),
                         top_k=_same_in_every_layer(values, "moe_topk"),
                         num_shared_experts=1, shared_ffn_size=width)
    raise ValueError(f"model_type={model_type!r} is not an MoE layout moekit reads: expected "
                     f"one of {', '.join(MOE_LAYOUTS)}")


def model_config_from_hf(hf_config) -> ModelConfig:
    """The ModelConfig of a Hugging Face config of one of ``LAYOUTS``."""
    values = _as_dict(hf_config)
    model_type = values.get("model_type")
    if model_type not in LAYOUTS:
        raise ValueError(f"model_type={model_type!r} is not supported: expected one of "
                         f"{', '.join(LAYOUTS)}")
    _refuse_if(values.get("hidden_act", "silu") != "silu", "hidden_act", values,
               "expected 'silu' (SwiGLU feed-forward blocks)")
    _refuse_if(bool(values.get("mlp_only_layers")), "mlp_only_layers", values,
               "moekit places MoE layers every n-th layer (decoder_sparse_step)")
    _refuse_if(bool(values.get("mlp_bias")), "mlp_bias", values, "moekit's FFNs have no bias")
    # Llama's and Qwen3's attention_bias biases o_proj too, which moekit's attention lacks.
    _refuse_if(bool(values.get("attention_bias")), "attention_bias", values,
               "moekit biases q/k/v only (qkv_bias, the Qwen2 layouts)")
    _refuse_if(values.get("clip_qkv") is not None, "clip_qkv", values,
               "moekit does not clamp q/k/v")
    _refuse_if(bool(values.get("use_cla")), "use_cla", values,
               "transformers' HunYuan-MoE-V1 computes K/V in every layer")
    qkv_bias = (model_type == "qwen2" or
                (model_type == "qwen2_moe" and values.get("qkv_bias", True)))
    return ModelConfig(
        vocab_size=_field(values, "vocab_size"), hidden_size=_field(values, "hidden_size"),
        num_layers=_field(values, "num_hidden_layers"),
        num_heads=_field(values, "num_attention_heads"),
        num_kv_heads=values.get("num_key_value_heads"), head_dim=values.get("head_dim"),
        ffn_size=_field(values, "intermediate_size"), max_seq_len=_context_length(values),
        rope_base=_rope_base(values), norm_eps=float(_field(values, "rms_norm_eps")),
        tie_embeddings=bool(values.get("tie_word_embeddings", False)), qkv_bias=bool(qkv_bias),
        qk_norm=model_type in QK_NORM_PLACEMENT,
        qk_norm_placement=QK_NORM_PLACEMENT.get(model_type, "head"),
        **({key: float(_field(values, key)) for key in GRANITE_SCALINGS}
           if model_type == "granitemoe" else {}),
        moe=moe_config_from_hf(values) if model_type in MOE_LAYOUTS else None,
        moe_every=values.get("decoder_sparse_step", 1) if model_type in MOE_LAYOUTS else 1)


# ---- What each layout can hold -------------------------------------------------------------

@dataclass(frozen=True)
class Feature:
    name: str
    present: Callable[[ModelConfig], bool]
    layouts: tuple[str, ...]  # the layouts that can hold it


def _moe(config: ModelConfig, test: Callable[[MoEConfig], bool]) -> bool:
    return config.moe is not None and test(config.moe)


def _weights_renormalised(moe: MoEConfig) -> bool:
    return moe.normalize_weights and moe.router != "switch"  # as build_gate reads them


def _qk_norm_feature(placement: str, where: str) -> Feature:
    return Feature(f"QK-norm {where} (qk_norm_placement={placement!r})",
                   lambda c: c.qk_norm and c.qk_norm_placement == placement,
                   tuple(layout for layout, at in QK_NORM_PLACEMENT.items() if at == placement))


def _shared_width(moe: MoEConfig) -> int:
    return moe.num_shared_experts * (moe.shared_ffn_size or moe.ffn_size)


FEATURES = (
    Feature("MoE feed-forward layers (moe set)", lambda c: c.moe is not None, MOE_LAYOUTS),
    Feature("a dense model (moe=None)", lambda c: c.moe is None, DENSE_LAYOUTS),
    Feature("dense layers between MoE layers (moe_every > 1)",
            lambda c: c.moe is not None and c.moe_every > 1, ("qwen2_moe", "qwen3_moe")),
    Feature("cross-layer attention (cla_share > 1)", lambda c: c.cla_share > 1, ()),
    # OLMoE's config has no head_dim: transformers derives it, and the width of QK-norm, from it.
    Feature("a head_dim other than hidden_size / num_heads",
            lambda c: c.attention_head_dim * c.num_heads != c.hidden_size,
            tuple(layout for layout in LAYOUTS if layout != "olmoe")),
    _qk_norm_feature("head", "per head before RoPE"),
    _qk_norm_feature("head_after_rope", "per head after RoPE"),
    _qk_norm_feature("projection", "over the whole q/k projection"),
    Feature("attention without QK-norm (qk_norm=False)", lambda c: not c.qk_norm,
            tuple(layout for layout in LAYOUTS if layout not in QK_NORM_PLACEMENT)),
    Feature(f"GraniteMoE's scalings ({', '.join(GRANITE_SCALINGS)})",
            lambda c: (c.embedding_multiplier, c.residual_multiplier, c.attention_multiplier,
                       c.logits_scaling) != (1.0, 1.0, None, 1.0), ("granitemoe",)),
    Feature("QKV bias (qkv_bias=True)", lambda c: c.qkv_bias, ("qwen2_moe", "qwen2")),
    Feature("attention without QKV bias (qkv_bias=False)", lambda c: not c.qkv_bias,
            tuple(layout for layout in LAYOUTS if layout != "qwen2")),
    Feature("an activation other than SwiGLU",
            lambda c: c.activation != "swiglu" or _moe(c, lambda m: m.activation != "swiglu"),
            ()),
    Feature("the sigmoid router", lambda c: _moe(c, lambda m: m.router == "sigmoid"), ()),
    Feature("FastMoE's zero, noisy or gshard router",
            lambda c: _moe(c, lambda m: m.router in ("zero", "noisy", "gshard")), ()),
    Feature("router_options (a gate bias, say)", lambda c: _moe(c, lambda m: m.router_options), ()),
    Feature("gating-logit normalization (logit_norm_scale)",
            lambda c: _moe(c, lambda m: m.logit_norm_scale is not None), ()),
    Feature("token dropping in evaluation (eval_capacity_factor)",
            lambda c: _moe(c, lambda m: m.eval_capacity_factor is not None), ()),
    Feature("top-k weights not renormalised (normalize_weights=False or router='switch')",
            lambda c: _moe(c, lambda m: not _weights_renormalised(m)),
            ("qwen2_moe", "qwen3_moe", "olmoe")),
    Feature("shared experts with a sigmoid gate (shared_expert_gate=True)",
            lambda c: _moe(c, lambda m: m.num_shared_experts > 0 and m.shared_expert_gate),
            ("qwen2_moe",)),
    Feature("shared experts without a gate (shared_expert_gate=False)",
            lambda c: _moe(c, lambda m: m.num_shared_experts > 0 and not m.shared_expert_gate),
            ("hunyuan_v1_moe",)),
    Feature("shared experts not as wide in all as one routed expert",
            lambda c: _moe(c, lambda m: m.num_shared_experts > 0
                           and _shared_width(m) != m.ffn_size), ("qwen2_moe",)),
    Feature("MoE layers without a shared expert",
            lambda c: _moe(c, lambda m: m.num_shared_experts == 0),
            ("mixtral", "qwen3_moe", "olmoe", "granitemoe")),
)


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
    values = {
        "architectures": [ARCHITECTURES[layout]], "model_type": layout, "hidden_act": "silu",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.attention_head_dim,
        "intermediate_size": config.ffn_size, "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
        # v5 reads rope_parameters, v4 rope_theta: both, so that either loads the model.
        "rope_theta": config.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "sliding_window": None, "use_sliding_window": False, "attention_bias": False,
    }
    moe = config.moe
    if layout in ("mixtral", "granitemoe"):
        values.update(intermediate_size=moe.ffn_size, num_local_experts=moe.num_experts,
                      num_experts_per_tok=moe.top_k)
        if layout == "granitemoe":
            values.update({key: getattr(config, key) for key in GRANITE_SCALINGS},
                          attention_multiplier=(config.attention_multiplier
                                                or config.attention_head_dim ** -0.5))
    elif layout == "olmoe":
        values.update(intermediate_size=moe.ffn_size, num_experts=moe.num_experts,
                      num_experts_per_tok=moe.top_k, norm_topk_prob=_weights_renormalised(moe),
                      clip_qkv=None)
    elif layout == "hunyuan_v1_moe":
        values.update(intermediate_size=moe.ffn_size, num_experts=moe.num_experts,
                      moe_topk=moe.top_k, num_shared_expert=1, use_cla=False)
    elif layout in ("qwen2_moe", "qwen3_moe"):
        values.update(moe_intermediate_size=moe.ffn_size, num_experts=moe.num_experts,
                      num_experts_per_tok=moe.top_k, norm_topk_prob=_weights_renormalised(moe),
                      decoder_sparse_step=config.moe_every, mlp_only_layers=[])
        if layout == "qwen2_moe":
            values.update(qkv_bias=config.qkv_bias, shared_expert_intermediate_size=(
                _shared_width(moe)))
    return values


# ---- Weight names ------------------------------------------------------------------------

# Inside one layer, Hugging Face prefix <-> moekit prefix; the first that matches is used,
# a layout's own names before the common ones.
_LAYOUT_LAYER_PARTS = {"hunyuan_v1_moe": (
    ("self_attn.query_layernorm.", "attn.q_norm."), ("self_attn.key_layernorm.", "attn.k_norm."),
    ("mlp.gate.wg.", "ffn.router."), ("mlp.shared_mlp.", "ffn.shared_experts."),
), "granitemoe": (  # its files hold the experts stacked already, under other names
    ("block_sparse_moe.router.layer.", "ffn.router."),
    ("block_sparse_moe.input_linear.weight", "ffn.experts.gate_up_proj"),
    ("block_sparse_moe.output_linear.weight", "ffn.experts.down_proj"),
)}
_LAYER_PARTS = (
    ("self_attn.", "attn."), ("input_layernorm.", "attn_norm."),
    ("post_attention_layernorm.", "ffn_norm."), ("mlp.gate.", "ffn.router."),
    ("mlp.shared_expert_gate.", "ffn.shared_gate."), ("mlp.shared_expert.", "ffn.shared_experts."),
    ("mlp.", "ffn."),
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
        for pair in _LAYOUT_LAYER_PARTS.get(layout, ()) + _LAYER_PARTS:
            if rest.startswith(pair[source]):
                rest = pair[target] + rest[len(pair[source]):]
                break
        return f"{'' if to_moekit else 'model.'}layers.{layer.group(2)}.{rest}"
    for pair in _TOP_LEVEL:
        if name.startswith(pair[source]):
            return pair[target] + name[len(pair[source]):]
    return name


def hf_to_moekit_state(hf_state: dict, layout: str) -> dict:
    """Rename a state dict of ``layout`` in transformers' in-memory naming."""
    return {_rename(name, layout, to_moekit=True): tensor for name, tensor in hf_state.items()}


def moekit_to_hf_state(state: dict, layout: str) -> dict:
    """The inverse of ``hf_to_moekit_state``, leaving out moekit's training state."""
    return {_rename(name, layout, to_moekit=False): tensor for name, tensor in state.items()
            if not name.endswith(MOEKIT_ONLY)}


_MIXTRAL_EXPERT_NAMES = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
_PER_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def stacking_plan(file_names, layout: str) -> dict[str, str | list[list[str]]]:
    """Which file tensors (Hub naming) make each tensor of transformers' in-memory naming: the
    one file tensor it is renamed from, or, for stacked experts, per expert the matrices
    concatenated (gate then up), in expert order. A stacked tensor's bytes are those of its
    matrices in this order, so it can be written without being built."""
    plan, per_expert = {}, {}
    for file_name in file_names:
        name = file_name
        if layout == "mixtral":
            name = name.replace(".block_sparse_moe.", ".mlp.")
            for old, new in _MIXTRAL_EXPERT_NAMES:
                name = re.sub(rf"(\.experts\.\d+)\.{old}\.", rf"\1.{new}.", name)
        match = _PER_EXPERT.fullmatch(name)
        if match is None:
            plan[name] = file_name
        else:
            prefix, expert, part = match.groups()
            per_expert.setdefault(prefix, {})[(int(expert), part)] = file_name
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
    """Hub naming (one tensor per expert) -> transformers' in-memory naming (stacked)."""
    return {name: file_state[source] if isinstance(source, str) else torch.stack(
                [torch.cat([file_state[part] for part in parts]) for parts in source])
            for name, source in stacking_plan(file_state, layout).items()}


def split_experts(hf_state: dict, layout: str) -> dict:
    """The inverse of ``stack_experts``: views of the stacked tensors, not copies."""
    mixtral = layout == "mixtral"
    mlp = ".block_sparse_moe." if mixtral else ".mlp."
    file_names = {new: old for old, new in _MIXTRAL_EXPERT_NAMES} if mixtral else {}
    files = {}
    for name, tensor in hf_state.items():
        stacked = re.fullmatch(r"(.*)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if stacked is None:
            files[name.replace(".mlp.", mlp)] = tensor
            continue
        layer, kind = stacked.groups()
        for expert, weight in enumerate(tensor):
            parts = (zip(("gate_proj", "up_proj"), weight.chunk(2)) if kind == "gate_up_proj"
                     else [("down_proj", weight)])
            for part, matrix in parts:
                files[f"{layer}{mlp}experts.{expert}.{file_names.get(part, part)}.weight"] = matrix
    return files


def import_weights(file_state: dict, layout: str) -> dict:
    """Tensors as a Hugging Face folder of ``layout`` stores them -> moekit's state dict."""
    return hf_to_moekit_state(stack_experts(file_state, layout), layout)


def export_weights(state: dict, layout: str) -> dict:
    """moekit's state dict -> tensors as a Hugging Face folder of ``layout`` stores them."""
    return split_experts(moekit_to_hf_state(state, layout), layout)


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
    model = Transformer(model_config_from_hf(hf_model.config)).to(hf_model.dtype)
    return load_converted_state(model, hf_to_moekit_state(hf_model.state_dict(),
                                                          hf_model.config.model_type))
