"""Weights packed once for a CPU's few-row products: what a decoding engine multiplies by.

A decoding step multiplies a few rows (one per sequence) by every weight of the model. For such
products ``F.linear`` hands oneDNN (or MKL) the weight in its plain [out, in] layout, which the
kernel must read as it is or reorder into its own blocked one, at every call. Reordered once
(``PackedWeight``), the products run on the blocked weight directly (``python benchmarks/packed_products.py`` prints
the ratio per shape, row count and dtype on any CPU). This is the form inductor's weight
freezing gives 16-bit linears (``torch/_inductor/fx_passes/mkldnn_fusion.py``:
``mkldnn._reorder_linear_weight(w, batch_size)``, then ``mkldnn._linear_pointwise``), made
here once by the engine rather than at compile time, so that eager and compiled steps get it
alike and nothing is frozen behind the model's back. The row count given when packing only
chooses the blocked layout: a product of any number of rows runs on it, so the plain weight is
not kept beside it. Freezing's float32 form, MKL's packed sgemm (``mkl._mkl_linear``), uses
its pack only for the exact row count it was packed for and otherwise multiplies the plain
weight, which it must keep: the experts' row counts change at every step, and in the model it
gained no more than oneDNN's form (docs/inference.md), so every dtype takes oneDNN's.

The packed modules hold no parameters: an optimizer never sees them, nothing can train them,
and a forward that records autograd through them raises, so packed weights cannot go stale
behind a model that learns. ``moekit.model.packed.pack_for_decoding`` swaps a model's modules
for them.

Compiled, each packed product is an operator of ours (``torch.library.custom_op``): inductor
cannot lower oneDNN's packed product on a weight that is a graph input (only on the constants
of its own freezing), and as our operators they stay inside the step's one graph.

Legend as in ``moekit.moe.experts``: N rows grouped by expert, T tokens, K routes per token,
D model dim, I the input projection's width, E experts.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moekit.moe.experts import GroupedExperts, expert_activation, routed_outputs


def packable(weight: torch.Tensor) -> bool:
    """Whether this torch build packs ``weight`` (a plain [out, in] CPU matrix) for oneDNN:
    float32, and the 16-bit types where this CPU supports them."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if weight.dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


class PackedWeight:
    """One [out, in] weight in oneDNN's blocked layout for ``rows`` rows (a hint: products of
    any number of rows run on it)."""

    def __init__(self, weight: torch.Tensor, rows: int):
        if not packable(weight):
            raise ValueError(f"a {weight.dtype} weight on {weight.device} cannot be packed: "
                             "float32, bfloat16 or float16 on a CPU with oneDNN")
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows={rows!r} is not allowed: expected an integer >= 1")
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)


def _product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@torch.library.custom_op("moekit::packed_linear", mutates_args=())
def packed_linear_op(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                     out_features: int) -> torch.Tensor:
    """``packed_linear`` as one operator that compiled code calls inside its graph."""
    return _product(x, packed, bias)


@packed_linear_op.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def packed_linear(x: torch.Tensor, weight: PackedWeight,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` on the packed ``w``."""
    if torch.compiler.is_compiling():
        return packed_linear_op(x, weight.packed, bias, weight.out_features)
    return _product(x, weight.packed, bias)


def _refuse_autograd(x: torch.Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("packed weights are for inference: this model was packed for "
                           "decoding (moekit.model.packed.pack_for_decoding) and cannot train")


class PackedLinear(nn.Module):
    """An ``nn.Linear``'s product on its weight packed for ``rows`` rows; no parameters."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_packed = PackedWeight(linear.weight, rows)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_autograd(x)
        return packed_linear(x, self.weight_packed, self.bias)


def _packed_expert_mlp(x_ND: torch.Tensor, tokens_per_expert: list[int],
                       packed_in: list[torch.Tensor], packed_down: list[torch.Tensor],
                       activation: str, out_features: int) -> torch.Tensor:
    # One packed product per expert that got rows: their counts are read on the host, free on
    # a CPU, the only device these weights live on.
    y_ND = x_ND.new_empty(x_ND.shape[0], out_features)
    start = 0
    for count, w_in, w_down in zip(tokens_per_expert, packed_in, packed_down):
        if count:
            end = start + count
            h_NI = _product(x_ND[start:end], w_in, None)
            y_ND[start:end] = _product(expert_activation(h_NI, activation), w_down, None)
            start = end
    return y_ND


@torch.library.custom_op("moekit::packed_expert_mlp", mutates_args=())
def packed_expert_mlp_op(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                         packed_in: list[torch.Tensor], packed_down: list[torch.Tensor],
                         activation: str, out_features: int) -> torch.Tensor:
    """The packed experts' grouped MLP as one operator of a compiled graph."""
    return _packed_expert_mlp(x_ND, tokens_per_expert_E.tolist(), packed_in, packed_down,
                              activation, out_features)


@packed_expert_mlp_op.register_fake
def _(x_ND, tokens_per_expert_E, packed_in, packed_down, activation, out_features):
    return x_ND.new_empty(x_ND.shape[0], out_features)


class PackedExperts(nn.Module):
    """``GroupedExperts``' function, each expert's two matrices packed for ``rows`` rows: the
    grouped product as one packed product per expert's block of rows (``forward(x_ND,
    tokens_per_expert_E)``, as every experts module). No parameters."""

    def __init__(self, experts: GroupedExperts, rows: int):
        super().__init__()
        self.num_experts, self.activation = experts.num_experts, experts.activation
        self.hidden_size = experts.hidden_size
        self.in_proj = [PackedWeight(w_ID, rows) for w_ID in experts.in_proj.unbind(0)]
        self.down_proj = [PackedWeight(w_DF, rows) for w_DF in experts.down_proj.unbind(0)]

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        _refuse_autograd(x_ND)
        packed_in = [w.packed for w in self.in_proj]
        packed_down = [w.packed for w in self.down_proj]
        if torch.compiler.is_compiling():
            return packed_expert_mlp_op(x_ND, tokens_per_expert_E, packed_in, packed_down,
                                        self.activation, self.hidden_size)
        return _packed_expert_mlp(x_ND, tokens_per_expert_E.tolist(), packed_in, packed_down,
                                  self.activation, self.hidden_size)

    def forward_dense(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                      weights_TK: torch.Tensor) -> torch.Tensor:
        """``GroupedExperts.forward_dense``: every expert on every token, here through each
        expert's packed matrices (T rows each, the batch the weights were packed for)."""
        _refuse_autograd(x_TD)
        y_ETD = torch.stack([
            packed_linear(expert_activation(packed_linear(x_TD, w_in), self.activation), w_down)
            for w_in, w_down in zip(self.in_proj, self.down_proj)])
        return routed_outputs(y_ETD, expert_ids_TK, weights_TK)
