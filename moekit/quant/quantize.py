"""``quantize_model``: weight-only quantization of a Transformer, chosen per part.

- ``experts``: every feed-forward weight: routed experts (one scale per expert and output
  column), shared experts, and the dense FFN of non-MoE layers;
- ``attention``: the q/k/v/o projections;
- ``embeddings``: the token embedding and the output projection (one table when tied).

Norms, routers and biases stay in full precision: they are small, and the router's choices
are sensitive to small errors.
"""
from __future__ import annotations

import torch.nn as nn

from moekit.model import Transformer
from moekit.moe import GroupedExperts, MoELayer
from moekit.quant.modules import QuantEmbedding, QuantGroupedExperts, QuantLinear
from moekit.quant.weights import check_quant_dtype

PARTS = ("experts", "attention", "embeddings")


def _quantize_linears(parent: nn.Module, dtype: str) -> None:
    for name, child in parent.named_children():
        if isinstance(child, nn.Linear):
            setattr(parent, name, QuantLinear(child, dtype))


def _quantize_ffn(ffn: nn.Module, dtype: str) -> None:
    if not isinstance(ffn, MoELayer):
        _quantize_linears(ffn, dtype)
        return
    if not isinstance(ffn.experts, GroupedExperts):
        raise ValueError(f"experts of type {type(ffn.experts).__name__} cannot be quantized: "
                         "only GroupedExperts")
    ffn.experts = QuantGroupedExperts(ffn.experts, dtype)
    if ffn.shared_experts is not None:
        _quantize_linears(ffn.shared_experts, dtype)


def quantize_model(model: Transformer, experts: str | None = "fp8",
                   attention: str | None = "fp8", embeddings: str | None = None) -> Transformer:
    """Quantize ``model`` in place, each part to "fp8", "int8" or None (full precision); the
    choice is kept in ``model.quantization`` (saved with it). Returns the model."""
    spec = {part: check_quant_dtype(part, value)
            for part, value in zip(PARTS, (experts, attention, embeddings))}
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quantization})")
    for layer in model.layers:
        if spec["experts"]:
            _quantize_ffn(layer.ffn, spec["experts"])
        if spec["attention"]:
            _quantize_linears(layer.attn, spec["attention"])
    if spec["embeddings"]:
        model.embed_tokens = QuantEmbedding(model.embed_tokens, spec["embeddings"])
        if model.lm_head is not None:
            model.lm_head = QuantLinear(model.lm_head, spec["embeddings"])
    model.quantization = spec
    return model
