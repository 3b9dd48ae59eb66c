"""Weight-only quantization (FP8 e4m3 and int8, per output channel) and quantized checkpoints."""
from moekit.quant.checkpoint import (folder_bytes, load_for_inference, model_structure,
                                     quantization_spec, save_quantized, tensor_bytes)
from moekit.quant.modules import QuantEmbedding, QuantGroupedExperts, QuantLinear
from moekit.quant.quantize import quantize_model
from moekit.quant.weights import QUANT_DTYPES, dequantize, quantize_weight

__all__ = ["QUANT_DTYPES", "QuantEmbedding", "QuantGroupedExperts", "QuantLinear", "dequantize",
           "folder_bytes", "load_for_inference", "model_structure", "quantization_spec",
           "quantize_model", "quantize_weight",
           "save_quantized", "tensor_bytes"]
