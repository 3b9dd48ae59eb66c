"""What one Hugging Face family is to moekit: a ``Family`` describes, in one place, how its
config maps onto ModelConfig and back, how its weights are named and stored, and which of
moekit's features it can hold; the functions beside it are the pieces families share."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moekit.config import ROPE_SCALING_TYPES, ModelConfig, MoEConfig


def required(values: dict, key: str):
    if values.get(key) is None:
        raise ValueError(f"{key} is missing (a {values.get('model_type')} config needs it)")
    return values[key]


def refuse_if(condition: bool, key: str, values: dict, why: str) -> None:
    if condition:
        raise ValueError(f"{key}={values.get(key)!r} is not supported: {why}")


def rope_from_hf(values: dict) -> tuple[float, dict | None]:
    """RoPE base and scaling (ModelConfig.rope_base, rope_scaling) of a v5 (``rope_parameters``)
    or v4 (``rope_theta``, ``rope_scaling``) config."""
    parameters = dict(values.get("rope_parameters") or values.get("rope_scaling") or {})
    base = float(parameters.pop("rope_theta", values.get("rope_theta", 10000.0)))
    kind = parameters.pop("rope_type", parameters.pop("type", "default"))
    if kind == "default":
        return base, None
    key = "rope_parameters" if "rope_parameters" in values else "rope_scaling"
    refuse_if(kind not in ROPE_SCALING_TYPES, key, values,
              f"rope_type one of default, {', '.join(ROPE_SCALING_TYPES)}")
    refuse_if(parameters.get("partial_rotary_factor", 1.0) != 1.0, key, values,
              "moekit rotates every dimension of a head (partial_rotary_factor 1)")
    context = required(values, "max_position_embeddings")
    # Dynamic scaling stretches past the model's context (transformers reads
    # max_position_embeddings for it); the others name their original one.
    original = (context if kind == "dynamic" else
                parameters.get("original_max_position_embeddings",
                               values.get("original_max_position_embeddings", context)))
    needs_original = "original_max_position_embeddings" in ROPE_SCALING_TYPES[kind]
    return base, {**parameters, "rope_type": kind,
                  **({"original_max_position_embeddings": original} if needs_original else {})}


def rope_to_hf(config: ModelConfig) -> dict:
    """The config.json entries of a model's RoPE: v5 reads rope_parameters, v4 rope_theta and
    rope_scaling; both, so that either loads the model."""
    scaling = dict(config.rope_scaling or {"rope_type": "default"})
    if scaling["rope_type"] == "dynamic":  # transformers takes it from max_position_embeddings
        scaling.pop("original_max_position_embeddings")
    return {"rope_theta": config.rope_base,
            "rope_parameters": {**scaling, "rope_theta": config.rope_base},
            "rope_scaling": config.rope_scaling and scaling}


def num_experts(values: dict) -> int:
    # Hub files say num_experts; transformers v5 writes num_local_experts for some families.
    return values.get("num_experts") or required(values, "num_local_experts")


def weights_renormalised(moe: MoEConfig) -> bool:
    return moe.normalize_weights and moe.router != "switch"  # as build_gate reads them


def shared_width(moe: MoEConfig) -> int:
    return moe.num_shared_experts * (moe.shared_ffn_size or moe.ffn_size)


@dataclass(frozen=True)
class PerExpertFiles:
    """Experts stored one tensor per expert and projection, as most Hub files hold them:
    ``model.layers.L.{block}.experts.E.{gate|up|down}.weight``."""
    block: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class Family:
    """One Hugging Face ``model_type``.

    ``options`` gives the ModelConfig fields of its config.json beyond the ones all families
    share (``hf.model_config_from_hf`` reads those), ``moe`` the MoEConfig of its sparse
    blocks (None: a dense family), ``config_values`` the config.json entries beyond the
    shared ones for a ModelConfig, ``rope`` the RoPE base and scaling of its config.json
    (``config_values`` may refuse a ModelConfig no ``holds`` entry rules out, with a
    ValueError). ``layer_parts`` are its own weight-name prefixes inside a
    layer (Hugging Face's, moekit's), tried before the shared ones; ``expert_files`` says how
    its files store the experts (None: stacked already, under ``layer_parts`` names).
    ``fused`` names the tensors of a layer it stores as one, that moekit keeps apart.
    ``holds`` names the features (``hf.FEATURES`` keys) it can hold."""
    model_type: str
    architecture: str
    holds: frozenset[str]
    options: Callable[[dict], dict] = lambda values: {}
    moe: Callable[[dict], MoEConfig] | None = None
    config_values: Callable[[ModelConfig], dict] = lambda config: {}
    rope: Callable[[dict], tuple[float, dict | None]] = rope_from_hf
    layer_parts: tuple[tuple[str, str], ...] = ()
    # Tensors of a layer its files hold as one and moekit as several (split evenly along the
    # first dimension): Hugging Face's name, moekit's names.
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    expert_files: PerExpertFiles | None = PerExpertFiles()
    # Whether a config without use_sliding_window uses its sliding_window (Mistral's rule).
    window_by_default: bool = False
    # (tensors in transformers' naming, the config.json values, to_moekit) -> the tensors as
    # moekit computes with them (import) or as the family stores them (export), for a family
    # whose tensors are more than renamed (DeepSeek's interleaved RoPE rows).
    adapt_weights: Callable[[dict, dict, bool], dict] | None = None


# The features (hf.FEATURES keys) that most families hold: transformers computes their
# rotary embeddings with the shared ROPE_INIT_FUNCTIONS.
MOST_FAMILIES = frozenset({"head_dim", "no_qk_norm", "no_qkv_bias", "rope_scaling", "gqa"})
# What the families with softmax top-k routing hold (all MoE families but DeepSeek-V3's kin).
SOFTMAX_TOP_K = frozenset({"softmax_router", "renormalised_weights"})
