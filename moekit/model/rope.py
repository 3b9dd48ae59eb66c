"""Rotary position embeddings (the half-split convention of Llama): the inverse frequencies
of plain RoPE and of the scaled kinds Hugging Face models use, and the cos/sin tables.

``ModelConfig.rope_scaling`` holds a scaling as transformers' ``rope_parameters`` spell it
(without ``rope_theta``, which is ``rope_base``); each kind is computed here as transformers'
``ROPE_INIT_FUNCTIONS`` define it:

- ``linear``: every frequency divided by ``factor`` (positions interpolated);
- ``dynamic`` (NTK): the base stretched for sequences longer than
  ``original_max_position_embeddings``, per forward, from the furthest position it holds;
- ``yarn``: frequencies blended between interpolated and original by a ramp over the
  dimensions (``beta_fast``, ``beta_slow``), and cos/sin scaled by an attention factor;
- ``llama3``: low frequencies divided by ``factor``, high ones kept, a smooth blend between.
"""
from __future__ import annotations

import math

import torch


def _base_powers(head_dim: int, base: float, device=None) -> torch.Tensor:
    return base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def _plain(head_dim: int, base: float, device=None) -> torch.Tensor:
    return 1.0 / _base_powers(head_dim, base, device)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(head_dim: int, base: float, scaling: dict, device) -> tuple[torch.Tensor, float]:
    factor = scaling["factor"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))

    def dimension_of(rotations: float) -> float:
        # The dimension whose wavelength fits ``rotations`` times in the original context.
        original = scaling["original_max_position_embeddings"]
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = dimension_of(scaling.get("beta_fast") or 32)
    high = dimension_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low)
            / (high - low)).clamp(0, 1)
    powers = _base_powers(head_dim, base, device)
    # Dimensions below the ramp keep their frequency (extrapolate); above it, interpolate.
    return (1.0 / (factor * powers) * ramp + 1.0 / powers * (1 - ramp),
            float(attention_factor))


def _llama3(head_dim: int, base: float, scaling: dict, device) -> torch.Tensor:
    factor = scaling["factor"]
    low_factor, high_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    inv_freq = _plain(head_dim, base, device)
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low_factor) / (high_factor - low_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    long_waves = wavelength > original / low_factor
    short_waves = wavelength < original / high_factor
    return torch.where(long_waves, inv_freq / factor, torch.where(short_waves, inv_freq, blended))


def latent_softmax_scale(qk_head_dim: int, scaling: dict | None) -> float:
    """DeepSeek's softmax scale of multi-head latent attention: 1 / sqrt(qk_head_dim), times
    yarn_mscale(factor, mscale_all_dim) squared when a scaled RoPE sets ``mscale_all_dim`` (its
    YaRN configs), as transformers' and DeepSeek's own code compute it."""
    scale = qk_head_dim ** -0.5
    if scaling is not None and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    return scale


def inverse_frequencies(head_dim: int, base: float, scaling: dict | None = None,
                        seq_len: int = 0, device=None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies [Dh / 2] and the factor cos and sin are multiplied by, for a
    forward whose furthest position is ``seq_len - 1`` (only ``dynamic`` depends on it)."""
    kind = None if scaling is None else scaling["rope_type"]
    if kind is None:
        return _plain(head_dim, base, device), 1.0
    if kind == "linear":
        return _plain(head_dim, base, device) / scaling["factor"], 1.0
    if kind == "dynamic":
        factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
        seq_len = max(seq_len, original)
        stretched = base * (factor * seq_len / original - (factor - 1)) ** (
            head_dim / (head_dim - 2))
        return _plain(head_dim, stretched, device), 1.0
    if kind == "yarn":
        return _yarn(head_dim, base, scaling, device)
    return _llama3(head_dim, base, scaling, device), 1.0


def rope_cos_sin(positions_BS: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype,
                 scaling: dict | None = None):
    """cos and sin [B, 1, S, Dh] of the positions."""
    seq_len = 0
    if scaling is not None and scaling["rope_type"] == "dynamic":
        seq_len = int(positions_BS.max()) + 1  # a device sync, for dynamic scaling only
    inv_freq, attention_scaling = inverse_frequencies(head_dim, base, scaling, seq_len,
                                                      positions_BS.device)
    angles_BSh = positions_BS.float()[..., None] * inv_freq
    angles_BSD = torch.cat([angles_BSh, angles_BSh], dim=-1)[:, None]
    return ((angles_BSD.cos() * attention_scaling).to(dtype),
            (angles_BSD.sin() * attention_scaling).to(dtype))


def apply_rope(x_BHSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` numbers of each head; the rest pass unchanged (partial
    RoPE, GLM4-MoE)."""
    rotary = cos.shape[-1]
    if rotary < x_BHSD.shape[-1]:
        return torch.cat([apply_rope(x_BHSD[..., :rotary], cos, sin), x_BHSD[..., rotary:]], -1)
    first, second = x_BHSD.chunk(2, dim=-1)
    return x_BHSD * cos + torch.cat([-second, first], dim=-1) * sin
