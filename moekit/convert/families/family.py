"""What one Hugging Face family is to moekit: a ``Family`` describes, in one place, how its
config maps onto ModelConfig and back, how its weights are named and stored, and which of
moekit's features it can hold; the functions beside it are the pieces families share."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moekit.config import ModelConfig, MoEConfig


def required(values: dict, key: str):
    if values.get(key) is None:
        raise ValueError(f"{key} is missing (a {values.get('model_type')} config needs it)")
    return values[key]


def refuse_if(condition: bool, key: str, values: dict, why: str) -> None:
    if condition:
        raise ValueError(f"{key}={values.get(key)!r} is not supported: {why}")


def plain_rope_base(values: dict) -> float:
    """RoPE base of a v5 (``rope_parameters``) or v4 (``rope_theta``, ``rope_scaling``) config;
    scaled RoPE (YaRN, Llama 3's) is refused, as moekit rotates by the plain rule."""
    parameters = values.get("rope_parameters") or {}
    refuse_if(parameters.get("rope_type", "default") != "default", "rope_parameters", values,
              "only plain RoPE (rope_type 'default') is supported")
    refuse_if(values.get("rope_scaling") is not None, "rope_scaling", values,
              "only plain RoPE (no scaling) is supported")
    return rope_theta(values)


def rope_theta(values: dict) -> float:
    parameters = values.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", values.get("rope_theta", 10000.0)))


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
    shared ones for a ModelConfig. ``layer_parts`` are its own weight-name prefixes inside a
    layer (Hugging Face's, moekit's), tried before the shared ones; ``expert_files`` says how
    its files store the experts (None: stacked already, under ``layer_parts`` names).
    ``holds`` names the features (``hf.FEATURES`` keys) it can hold."""
    model_type: str
    architecture: str
    holds: frozenset[str]
    options: Callable[[dict], dict] = lambda values: {}
    moe: Callable[[dict], MoEConfig] | None = None
    config_values: Callable[[ModelConfig], dict] = lambda config: {}
    rope_base: Callable[[dict], float] = plain_rope_base
    layer_parts: tuple[tuple[str, str], ...] = ()
    expert_files: PerExpertFiles | None = PerExpertFiles()
    # Whether a config without use_sliding_window uses its sliding_window (Mistral's rule).
    window_by_default: bool = False


# The features (hf.FEATURES keys) that most families hold.
PLAIN_ATTENTION = frozenset({"head_dim", "no_qk_norm", "no_qkv_bias"})
