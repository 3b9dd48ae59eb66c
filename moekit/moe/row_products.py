"""One row times a weight matrix in bfloat16, as decoding one sequence on a CPU computes it.

Decoding one sequence multiplies one row by every weight of the model, so the step moves each
weight through the CPU once and its time is the weights' bytes over the rate the product
reads them at. For a bf16 row torch sends ``F.linear`` (x W^T, the weight read transposed) and
``torch.mv`` (W x) to different oneDNN problems, and on the 2-core AMX Xeon these sessions run
on the matrix-vector form reads the weight 1.2-1.6x faster. Compiled, inductor calls oneDNN's
linear as an external kernel, slower still, while a multiply-and-sum over the weight's rows is
a loop of its own that reads the weight once in bf16 and accumulates in fp32. So one bf16 row
runs as ``torch.mv`` eagerly and as that sum compiled (``python benchmarks/row_products.py
[--compiled]`` prints each form's rate per shape on any CPU). In fp32 the forms run alike, and
fp16's ``mv`` is slower: both keep ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ROW_PRODUCT_DTYPES = (torch.bfloat16,)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear``; one row of bf16 times a CPU weight held as a plain tensor (not a DTensor
    or a quantized one), without autograd, as W x: ``torch.mv``, or compiled a sum over the
    weight's rows of their products with x."""
    if not (x.numel() == x.shape[-1] and weight.dtype in ROW_PRODUCT_DTYPES
            and x.dtype == weight.dtype and weight.device.type == "cpu"
            and type(weight) in (torch.Tensor, nn.Parameter) and not torch.is_grad_enabled()):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        y_O = (weight * x.reshape(1, -1)).sum(-1)
    else:
        y_O = torch.mv(weight, x.reshape(-1))
    y = y_O.view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) whose one-row bf16 products on a CPU run as
    W x: the model's projections while it decodes one sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
