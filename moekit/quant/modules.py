"""Modules that hold quantized weights and dequantize them on the fly in ``forward``.

Each stores the quantized tensor under the name the full-precision module used for its weight
(``weight``; ``gate_up_proj``/``up_proj`` and ``down_proj`` for experts) with a float32
``<name>_scale`` beside it, so a quantized checkpoint names tensors as the original does. The
embedding is the exception: its table is ``table``, because ``weight`` stays readable as the
dequantized table. Weights are converted to the type of the activations they meet and the
scales applied to the products: the same result as dequantizing first, with less work. On a CPU,
int8 weights skip the conversion: torch's int8 kernel multiplies them as stored (``int8_linear``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moekit.moe import GroupedExperts, expert_activation, expert_mlp
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


# The int8 kernel is a matrix-vector product per row: on a CPU it beats converting the weight up
# to about 8 rows (decoding) and is 2x slower at 32, 4x at 512 (prefill), bf16, 512 x 2048.
INT8_KERNEL_MAX_ROWS = 8


def int8_kernel_fits(x: torch.Tensor, weight_OI: torch.Tensor) -> bool:
    """Whether ``int8_linear`` can multiply ``x`` by ``weight_OI`` here: activations on a CPU in
    fp32, bf16 or fp16, an int8 weight [out, in] contiguous in memory, and an input width that
    is a multiple of 16 (with bf16 activations, torch 2.13's kernel returns wrong values or
    crashes for other widths; asked of every type, to be safe on every CPU)."""
    return (weight_OI.dtype == torch.int8 and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and weight_OI.is_contiguous() and weight_OI.shape[-1] % 16 == 0)


def int8_linear(x: torch.Tensor, weight_OI: torch.Tensor, scale_O: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scale)^T by torch's CPU kernel for int8 weights (the one gpt-fast and
    torchao use): it reads the int8 values directly, where converting them to the activations'
    type first would write and read a weight-sized tensor at every call."""
    x_MI = x.reshape(-1, x.shape[-1]).contiguous()
    y_MO = torch.ops.aten._weight_int8pack_mm(x_MI, weight_OI, scale_O.to(x.dtype))
    return y_MO.view(*x.shape[:-1], -1)


def scaled_linear(x: torch.Tensor, weight_OI: torch.Tensor, scale_O: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scale)^T: few rows by ``int8_linear`` where it fits, otherwise with the
    weight converted to the activations' type and the scale applied to the output columns (a
    per-row scale commutes with the product; q is exact in bf16 and fp32, never multiplied)."""
    if int8_kernel_fits(x, weight_OI) and x.numel() <= INT8_KERNEL_MAX_ROWS * x.shape[-1]:
        return int8_linear(x, weight_OI, scale_O)
    return F.linear(x, convert(weight_OI, x.dtype)) * scale_O.to(x.dtype)


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
            y = scaled_linear(x, self.weight, self.weight_scale.view(-1))
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
    """GroupedExperts with quantized stacked weights [E, out, in], one scale per expert and
    output row ([E, out, 1]). Each expert's matrix is the contiguous [out, in] one that
    ``int8_linear`` reads."""

    def __init__(self, experts: GroupedExperts, dtype: str):
        super().__init__()
        self.num_experts, self.activation = experts.num_experts, experts.activation
        self.in_name = "gate_up_proj" if experts.gated else "up_proj"
        for name, weight_EOI in ((self.in_name, experts.in_proj),
                                 ("down_proj", experts.down_proj)):
            q_EOI, scale_EO1 = quantize_weight(weight_EOI, dtype, input_dim=2)
            self.register_buffer(name, q_EOI)
            self.register_buffer(f"{name}_scale", scale_EO1)

    def _weights_EOI(self) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, self.in_name), self.down_proj

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        if all(int8_kernel_fits(x_ND, weight_EOI[0]) for weight_EOI in self._weights_EOI()):
            return self._int8_kernel_forward(x_ND, tokens_per_expert_E)
        # Only the experts that got tokens are converted: in decoding that is k of E. Their
        # scales multiply the output rows (as in QuantLinear), gathered by each row's expert.
        used_U = tokens_per_expert_E.nonzero().squeeze(1)
        tokens_U = tokens_per_expert_E.index_select(0, used_U)
        expert_of_row_N = used_U.repeat_interleave(tokens_U, output_size=x_ND.shape[0])
        weights, scales = [], []
        for name in (self.in_name, "down_proj"):
            weights.append(convert(getattr(self, name).index_select(0, used_U), x_ND.dtype))
            scale_EO = getattr(self, f"{name}_scale").squeeze(2)
            scales.append(scale_EO.index_select(0, expert_of_row_N).to(x_ND.dtype))
        return expert_mlp(x_ND, *weights, tokens_U, self.activation, *scales)

    def _int8_kernel_forward(self, x_ND: torch.Tensor,
                             tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        # Two scaled_linear calls per expert that got tokens (k of E in decoding): in decoding
        # each expert gets a few rows, which int8_linear multiplies about twice as fast on a
        # CPU as converting those experts and running the grouped product.
        in_EOI, down_EOI = self._weights_EOI()
        in_scale_EO = getattr(self, f"{self.in_name}_scale").squeeze(2)
        down_scale_EO = self.down_proj_scale.squeeze(2)
        counts = tokens_per_expert_E.tolist()
        outputs = []
        for expert, block_nD in enumerate(x_ND.split(counts)):
            if counts[expert]:
                h_nI = scaled_linear(block_nD, in_EOI[expert], in_scale_EO[expert])
                outputs.append(scaled_linear(expert_activation(h_nI, self.activation), down_EOI[expert],
                                             down_scale_EO[expert]))
        return torch.cat(outputs) if outputs else torch.empty_like(x_ND)
