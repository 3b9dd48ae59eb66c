"""The decoder-only MoE Transformer and KV-cache generation."""
from moekit.model.generate import generate
from moekit.model.transformer import KVCache, RMSNorm, Transformer, TransformerOutput

__all__ = ["KVCache", "RMSNorm", "Transformer", "TransformerOutput", "generate"]
