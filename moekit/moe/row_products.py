"""One row times a weight matrix in bfloat16, as decoding one sequence on a CPU computes it.

Decoding one sequence multiplies one row by every weight of the model, so the step moves each
weight through the CPU once and its time is the weights' bytes over the rate the product
reads them at. For a bf16 row torch sends ``F.linear`` (x W^T, the weight read transposed) and
``torch.mv`` (W x) to different oneDNN problems, and on the 2-core AMX Xeon these sessions run
on the matrix-vector form reads the weight 1.4-1.9x faster (24-26 against 13-15 GB/s for the
decoding benchmark's shapes, one thread; ``python benchmarks/row_products.py`` prints the ratio
per shape and dtype on any CPU). In fp32 the two run alike, and fp16's ``mv`` is slower, so
only bf16 takes it.

Inductor would lower ``torch.mv`` into a multiply-and-sum of its own, which reads bf16 at the
slower rate, so the products are custom operators: a compiled decoding step calls torch's
kernel as it is. They have no backward: only forwards without autograd (decoding) take them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ROW_PRODUCT_DTYPES = (torch.bfloat16,)


@torch.library.custom_op("moekit::weight_times_row", mutates_args=())
def weight_times_row(weight_OI: torch.Tensor, x_I: torch.Tensor) -> torch.Tensor:
    """W x: y_O for one weight [O, I] and one row x_I."""
    return torch.mv(weight_OI, x_I)


@weight_times_row.register_fake
def _(weight_OI: torch.Tensor, x_I: torch.Tensor) -> torch.Tensor:
    return x_I.new_empty(weight_OI.shape[0])


@torch.library.custom_op("moekit::routed_weights_times_rows", mutates_args=())
def routed_weights_times_rows(weights_EOI: torch.Tensor, ids_N: torch.Tensor,
                              x_NI: torch.Tensor) -> torch.Tensor:
    """y_NO: row n times the weight of expert ``ids_N[n]`` (of the stack [E, O, I]), each a
    view of the stack, so only the routed experts' weights are read and none is copied."""
    return torch.stack([torch.mv(weights_EOI[expert], x_I)
                        for expert, x_I in zip(ids_N.tolist(), x_NI)])


@routed_weights_times_rows.register_fake
def _(weights_EOI: torch.Tensor, ids_N: torch.Tensor, x_NI: torch.Tensor) -> torch.Tensor:
    return x_NI.new_empty(x_NI.shape[0], weights_EOI.shape[1])


def takes_row_products(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rows of ``x`` multiply ``weight`` through ``torch.mv``: a bf16 CPU weight held
    as a plain tensor (not a DTensor or a quantized one), without autograd."""
    return (weight.dtype in ROW_PRODUCT_DTYPES and x.dtype == weight.dtype
            and weight.device.type == "cpu" and not torch.is_grad_enabled()
            and type(weight) in (torch.Tensor, nn.Parameter))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear``, one row of bf16 on a CPU as W x (``torch.mv``)."""
    if x.numel() != x.shape[-1] or not takes_row_products(x, weight):
        return F.linear(x, weight, bias)
    y = weight_times_row(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) whose one-row bf16 products on a CPU run as
    W x: the model's projections while it decodes one sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
