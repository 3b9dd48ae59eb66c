"""The decoder-only MoE Transformer, KV-cache generation, and saving/loading model folders."""
from moekit.model.generate import generate
from moekit.model.io import load_model, read_model_config, save_model
from moekit.model.perplexity import perplexity
from moekit.model.transformer import KVCache, RMSNorm, Transformer, TransformerOutput

__all__ = ["KVCache", "RMSNorm", "Transformer", "TransformerOutput", "generate", "load_model",
           "perplexity", "read_model_config", "save_model"]
