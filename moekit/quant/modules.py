"""Modules that hold quantized weights and dequantize them on the fly in ``forward``.

Each stores the quantized tensor under the name the full-precision module used for its weight
(``weight``; ``gate_up_proj``/``up_proj`` and ``down_proj`` for experts) with a float32
``<name>_scale`` beside it, so a quantized checkpoint names tensors as the original does. The
embedding is the exception: its table is ``table``, because ``weight`` stays readable as the
dequantized table. Weights are converted to the type of the activations they meet and the
scales applied to the products: the same result as dequantizing first, with less work.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moekit.moe import GroupedExperts, expert_mlp
from moekit.quant.weights import convert, dequantize, quantize_weight


def native_fp8(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``fp8_scaled_linear`` runs on FP8 tensor cores here: a CUDA GPU of compute
    capability 8.9 or more (Ada, Hopper, Blackwell), bf16 activations (what its row-wise
    scaling returns), and the multiples of 16 its kernels need."""
    return (weight.dtype == torch.float8_e4m3fn and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (8, 9)
            and x.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0)


def fp8_scaled_linear(x: torch.Tensor, weight_OI: torch.Tensor,
                      scale_O1: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scale)^T with both operands in FP8: the activations are quantized on the
    fly, one scale per row, and ``torch._scaled_mm`` applies both scales in the product."""
    x_MI = x.reshape(-1, x.shape[-1])
    x_q, x_scale_M1 = quantize_weight(x_MI, "fp8", input_dim=1)
    y_MO = torch._scaled_mm(x_q, weight_OI.t(), scale_a=x_scale_M1, scale_b=scale_O1.t(),
                            out_dtype=x.dtype)
    return y_MO.view(*x.shape[:-1], -1)


class QuantLinear(nn.Module):
    """nn.Linear with a quantized weight [out, in] and one scale per output row."""

    def __init__(self, linear: nn.Linear, dtype: str):
        super().__init__()
        weight, scale = quantize_weight(linear.weight, dtype, input_dim=1)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native_fp8(x, self.weight):
            y = fp8_scaled_linear(x, self.weight, self.weight_scale)
        else:
            # Scaling the output, not the weight: a per-row scale commutes with the product,
            # and the weight is only converted (q is exact in bf16 and fp32), never multiplied.
            y = F.linear(x, convert(self.weight, x.dtype))
            y = y * self.weight_scale.view(-1).to(x.dtype)
        return y if self.bias is None else y + self.bias


class QuantEmbedding(nn.Module):
    """nn.Embedding with a quantized table [V, D] and one scale per token row (the output rows
    when the table doubles as the tied output projection). ``dtype``: the type it returns, the
    original table's."""

    def __init__(self, embedding: nn.Embedding, dtype: str):
        super().__init__()
        self.dtype = embedding.weight.dtype
        table, scale = quantize_weight(embedding.weight, dtype, input_dim=1)
        self.register_buffer("table", table)
        self.register_buffer("table_scale", scale)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table, for code that reads ``embed_tokens.weight`` (the tied output
        projection, the KV cache's dtype and device)."""
        return dequantize(self.table, self.table_scale, self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize(self.table[ids], self.table_scale[ids], self.dtype)


class QuantGroupedExperts(nn.Module):
    """GroupedExperts with quantized stacked weights, one scale per expert and output column."""

    def __init__(self, experts: GroupedExperts, dtype: str):
        super().__init__()
        self.num_experts, self.activation = experts.num_experts, experts.activation
        self.in_name = "gate_up_proj" if experts.gated else "up_proj"
        for name, weight in ((self.in_name, experts.in_proj), ("down_proj", experts.down_proj)):
            q_EIO, scale_E1O = quantize_weight(weight, dtype, input_dim=1)
            self.register_buffer(name, q_EIO)
            self.register_buffer(f"{name}_scale", scale_E1O)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        # Only the experts that got tokens are converted: in decoding that is k of E. Their
        # scales multiply the output rows (as in QuantLinear), gathered by each row's expert.
        used_U = tokens_per_expert_E.nonzero().squeeze(1)
        tokens_U = tokens_per_expert_E.index_select(0, used_U)
        expert_of_row_N = used_U.repeat_interleave(tokens_U, output_size=x_ND.shape[0])
        weights, scales = [], []
        for name in (self.in_name, "down_proj"):
            weights.append(convert(getattr(self, name).index_select(0, used_U), x_ND.dtype))
            scale_EO = getattr(self, f"{name}_scale").squeeze(1)
            scales.append(scale_EO.index_select(0, expert_of_row_N).to(x_ND.dtype))
        return expert_mlp(x_ND, *weights, tokens_U, self.activation, *scales)
