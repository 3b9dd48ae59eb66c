"""Training FLOPs per token, and model FLOPs utilisation (MFU).

Three figures side by side, all with N = active parameters without embeddings:
- ``six_n``: 6N, the dense rule (2 FLOPs per multiply-add, forward + twice that backward);
- ``hunyuan_fit``: 9.59 N + 2.3e8, Hunyuan-Large's fit for MoE (moekit.plan.scaling);
- ``model_flops``: 6 (N + V D) + 12 L H Dh S, the numerator of MFU as PaLM (Chowdhery et al.
  2022, appendix B) defines it: the output projection (V D) multiplies although it is an
  embedding-sized matrix, and the attention scores and weighted sum cost 2 * 2 * S * H * Dh per
  layer forward over a sequence of S (causal masking not subtracted, as in PaLM), times 3 with
  the backward. The input embedding is a lookup: no FLOPs. With multi-head latent attention a
  head's scores are qk_nope_head_dim + qk_rope_head_dim wide and its values v_head_dim:
  6 L H (Dqk + Dv) S in place of 12 L H Dh S (training expands the latent; N counts the
  expansion kv_b_proj, which the cached decoding absorbs instead).
"""
from __future__ import annotations

from dataclasses import dataclass

from moekit.config import ModelConfig
from moekit.plan.params import count_parameters
from moekit.plan.scaling import hunyuan_flops_per_token
from moekit.plan.units import require_positive


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    score_dim = value_dim = config.attention_head_dim
    if config.mla is not None:
        score_dim, value_dim = config.mla.qk_head_dim, config.mla.v_head_dim
    return 6.0 * config.num_layers * config.num_heads * (score_dim + value_dim) * seq_len


@dataclass(frozen=True)
class TrainingFlops:
    active_params: int  # N, without embeddings
    seq_len: int
    six_n: float
    hunyuan_fit: float
    attention: float
    model_flops: float


def training_flops_per_token(config: ModelConfig, seq_len: int) -> TrainingFlops:
    require_positive("seq_len", seq_len, integer=True)
    params = count_parameters(config)
    active = params.active_without_embeddings
    attention = attention_flops_per_token(config, seq_len)
    return TrainingFlops(active_params=active, seq_len=seq_len, six_n=6.0 * active,
                         hunyuan_fit=hunyuan_flops_per_token(active), attention=attention,
                         model_flops=6.0 * (active + params.output_matrix) + attention)


@dataclass(frozen=True)
class Utilisation:
    tokens_per_second: float  # per device
    peak_flops: float  # per device
    mfu: float  # model_flops * tokens/s / peak
    hunyuan_fit_mfu: float  # the same with the Hunyuan fit's FLOPs per token


def utilisation(flops: TrainingFlops, tokens_per_second: float, peak_flops: float) -> Utilisation:
    """MFU of a measured throughput (tokens per second per device) on a device of the given
    peak FLOP/s."""
    require_positive("tokens_per_second", tokens_per_second)
    require_positive("peak_flops", peak_flops)
    return Utilisation(tokens_per_second, peak_flops,
                       flops.model_flops * tokens_per_second / peak_flops,
                       flops.hunyuan_fit * tokens_per_second / peak_flops)


@dataclass(frozen=True)
class TrainingCompute:
    """Training compute in FLOPs for a number of tokens, by each rule."""

    tokens: float
    six_n: float
    hunyuan_fit: float
    model_flops: float


def training_compute(flops: TrainingFlops, tokens: float) -> TrainingCompute:
    require_positive("tokens", tokens)
    return TrainingCompute(tokens, flops.six_n * tokens, flops.hunyuan_fit * tokens,
                           flops.model_flops * tokens)
