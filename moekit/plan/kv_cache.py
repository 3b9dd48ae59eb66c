"""KV-cache size: bytes per token, and for a batch of sequences of a given context.

Each layer group that owns K/V (one per ``cla_share`` layers, CLA) keeps a key and a value of
``kv_heads * head_dim`` numbers per token:
    bytes per token = 2 * ceil(layers / cla_share) * kv_heads * head_dim * bytes per number.
The same model with full multi-head attention (kv_heads = heads, no CLA) and with GQA alone
(no CLA) are shown beside it: Hunyuan-Large's GQA (80 -> 8 heads) times CLA (2 layers) keeps
1/20 of the MHA cache, 95% less.

Multi-head latent attention (MLA, DeepSeek-V2/V3) caches per layer one latent of
``kv_lora_rank`` numbers and one RoPE key of ``qk_rope_head_dim`` numbers shared by all heads:
    bytes per token = layers * (kv_lora_rank + qk_rope_head_dim) * bytes per number,
shown beside the per-head keys and values it stands for (MHA: layers * heads * (qk_nope_head_dim
+ qk_rope_head_dim + v_head_dim)); DeepSeek-V3: 576 numbers per layer against 40,960, 98.6% less.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from moekit.config import ModelConfig
from moekit.model.transformer import KVCache
from moekit.plan.units import dtype_bytes, require_positive


def kv_cache_bytes_per_token(config: ModelConfig, dtype: str = "bf16") -> int:
    return KVCache.bytes_per_token(config, dtype_bytes(dtype))


@dataclass(frozen=True)
class KVCacheVariant:
    name: str  # "MHA", "GQA", "GQA + CLA"
    kv_heads: int
    cla_share: int
    bytes_per_token: int
    bytes_total: int  # for batch x context
    saving: float  # 1 - bytes / the MHA bytes


@dataclass(frozen=True)
class KVCachePlan:
    dtype: str
    batch: int
    context: int
    variants: tuple[KVCacheVariant, ...]
    model_variant: str  # the variant the model itself uses

    def variant(self, name: str) -> KVCacheVariant:
        return next(v for v in self.variants if v.name == name)

    @property
    def bytes_per_token(self) -> int:
        return self.variant(self.model_variant).bytes_per_token


def kv_cache_plan(config: ModelConfig, batch: int = 1, context: int | None = None,
                  dtype: str = "bf16") -> KVCachePlan:
    """The model's KV cache beside its MHA and GQA-only forms; ``context`` defaults to the
    model's maximum sequence length."""
    context = config.max_seq_len if context is None else context
    require_positive("batch", batch, integer=True)
    require_positive("context", context, integer=True)
    if config.mla is not None:
        return _latent_plan(config, batch, context, dtype)
    shapes = {"MHA": replace(config, num_kv_heads=None, cla_share=1),
              "GQA": replace(config, cla_share=1),
              "GQA + CLA": config}
    mha_bytes = kv_cache_bytes_per_token(shapes["MHA"], dtype)
    variants = []
    for name, shape in shapes.items():
        per_token = kv_cache_bytes_per_token(shape, dtype)
        variants.append(KVCacheVariant(name, shape.kv_heads, shape.cla_share, per_token,
                                       per_token * batch * context, 1 - per_token / mha_bytes))
    model_variant = ("GQA + CLA" if config.cla_share > 1
                     else "GQA" if config.kv_heads < config.num_heads else "MHA")
    return KVCachePlan(dtype, batch, context, tuple(variants), model_variant)


def _latent_plan(config: ModelConfig, batch: int, context: int, dtype: str) -> KVCachePlan:
    mla = config.mla
    expanded = (config.num_layers * config.num_heads * (mla.qk_head_dim + mla.v_head_dim)
                * dtype_bytes(dtype))
    latent = kv_cache_bytes_per_token(config, dtype)
    variants = tuple(KVCacheVariant(name, heads, 1, per_token, per_token * batch * context,
                                    1 - per_token / expanded)
                     for name, heads, per_token in (("MHA", config.num_heads, expanded),
                                                    ("MLA", 1, latent)))
    return KVCachePlan(dtype, batch, context, variants, "MLA")
