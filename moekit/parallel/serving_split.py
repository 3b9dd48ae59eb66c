"""Skywork-MoE's non-uniform split for serving: experts and attention heads are spread over
devices in proportion to the memory each has free, so a mix of cards (or cards already partly
used) serves one model.

- Experts (expert parallelism): the experts of all MoE layers, laid end to end (layer 0's E,
  then layer 1's, ...), are cut into one contiguous run per device, so a device's share may
  differ by layer and the split is as fine as one expert of one layer. Every device routes all
  tokens (the router is replicated), computes the rows of its own experts, and one all-reduce
  of the expert outputs gives every device all of them.
- Attention (tensor parallelism): device d holds a contiguous range of the key/value head
  groups with their query heads (rows of q/k/v, columns of o); the partial outputs of o_proj
  are summed by an all-reduce.
- Everything else (embeddings, norms, routers, shared experts, dense FFN layers) is replicated.

A device's share of the split parts is proportional to its free memory minus the replicated
part. ``split_model`` is applied to a plain model from outside; the model never asks for ranks.
Legend: E experts, G key/value heads, D model dim.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn

from moekit.model import Transformer
from moekit.moe import MoELayer


@dataclass(frozen=True)
class SplitPlan:
    """Which half-open ranges [start, end) each device holds: ``expert_ranges[m][d]`` of MoE
    layer m's experts, ``kv_head_ranges[d]`` of the key/value heads (with their query heads)
    in every layer; and the bytes of weights that puts on each device."""
    expert_ranges: list[list[tuple[int, int]]]
    kv_head_ranges: list[tuple[int, int]]
    bytes_per_device: list[int]


def _apportion(count: int, weights: list[int], minimum: int) -> list[tuple[int, int]]:
    """Contiguous ranges splitting ``count`` items in proportion to ``weights`` (largest
    remainders), each then raised to at least ``minimum`` at the expense of the largest."""
    quotas = [count * w / sum(weights) for w in weights]
    sizes = [int(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda d: int(quotas[d]) - quotas[d])
    for device in by_remainder[:count - sum(sizes)]:
        sizes[device] += 1
    for device in range(len(sizes)):
        while sizes[device] < minimum:
            sizes[sizes.index(max(sizes))] -= 1
            sizes[device] += 1
    starts = [sum(sizes[:d]) for d in range(len(sizes))]
    return [(start, start + size) for start, size in zip(starts, sizes)]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers, each once (a tied weight too), quantized ones included."""
    return [*module.parameters(), *module.buffers()]


def plan_split(model: Transformer, free_bytes: list[int]) -> SplitPlan:
    """Where each expert and attention head goes, given each device's free memory in bytes.
    Only sizes are read: the model may be built on the meta device, and quantized (the plan
    then counts its quantized bytes, and ``split_model`` splits it as it is)."""
    config = model.config
    if not free_bytes or any(not isinstance(b, int) or b <= 0 for b in free_bytes):
        raise ValueError(f"free_bytes={free_bytes!r} is not allowed: expected one positive "
                         "integer per device")
    if config.mla is not None:
        raise ValueError("a model with multi-head latent attention (mla) is not split over "
                         "devices in this version: its heads share one latent cache")
    if config.kv_heads < len(free_bytes):
        raise ValueError(f"{len(free_bytes)} devices but only {config.kv_heads} key/value "
                         "heads: every device needs at least one")
    moe_layers = [b.ffn for b in model.layers if isinstance(b.ffn, MoELayer)]
    num_experts = config.moe.num_experts if moe_layers else 0
    slots = num_experts * len(moe_layers)  # one per expert of each MoE layer
    per_expert = _nbytes(t for layer in moe_layers for t in _tensors(layer.experts)) \
        // max(slots, 1)
    # Norm weights (and biases) are 1-D and replicated; the rest of attention splits by head.
    attention = [t for b in model.layers for t in _tensors(b.attn) if t.dim() >= 2]
    per_kv_head = _nbytes(attention) // config.kv_heads
    replicated = _nbytes(_tensors(model)) - per_expert * slots \
        - per_kv_head * config.kv_heads
    room = [free - replicated for free in free_bytes]
    if min(room) <= 0:
        device = room.index(min(room))
        raise ValueError(f"device {device} has {free_bytes[device]:,} bytes free; the "
                         f"replicated weights alone need {replicated:,}")
    slot_ranges = _apportion(slots, room, 0)
    expert_ranges = [[(min(max(s0 - first, 0), num_experts), min(max(s1 - first, 0), num_experts))
                      for s0, s1 in slot_ranges]
                     for first in range(0, slots, num_experts or 1)]
    kv_ranges = _apportion(config.kv_heads, room, 1)
    used = [replicated + per_expert * (s1 - s0) + per_kv_head * (g1 - g0)
            for (s0, s1), (g0, g1) in zip(slot_ranges, kv_ranges)]
    for device, (need, free) in enumerate(zip(used, free_bytes)):
        if need > free:
            raise ValueError(f"device {device} would need {need:,} bytes, it has {free:,} free: "
                             "the model does not fit these devices")
    return SplitPlan(expert_ranges, kv_ranges, used)


def _narrow_tensors(module: nn.Module, dim: int, part: slice, names=None) -> nn.Module:
    """Keep ``part`` of ``module``'s own tensors (those in ``names``, or all) along ``dim``, in
    place: rows of a linear layer's output (nn.Linear or QuantLinear, whose weight, scale and
    bias all have one row per output), its input columns (the weight alone), or experts of a
    stacked experts module (plain or quantized: every tensor has one entry per expert)."""
    for name, tensor in [*module.named_parameters(recurse=False),
                         *module.named_buffers(recurse=False)]:
        if names is None or name in names:
            kept = tensor.data.narrow(dim, part.start, part.stop - part.start).clone()
            setattr(module, name, nn.Parameter(kept, requires_grad=False)
                    if isinstance(tensor, nn.Parameter) else kept)
    return module


class LocalExperts(nn.Module):
    """Experts [start, end) of a stacked experts module (GroupedExperts or its quantized
    form); the other experts' rows are left zero on this device and filled by the all-reduce
    over ``group``."""

    def __init__(self, experts: nn.Module, start: int, end: int, group):
        super().__init__()
        self.num_experts = experts.num_experts
        self.start, self.end, self.group = start, end, group
        self.local = _narrow_tensors(experts, 0, slice(start, end))
        self.local.num_experts = end - start

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        first_row = int(tokens_per_expert_E[:self.start].sum())
        local_E = tokens_per_expert_E[self.start:self.end]
        rows = slice(first_row, first_row + int(local_E.sum()))
        y_ND = x_ND.new_zeros(x_ND.shape)
        if self.end > self.start:
            y_ND[rows] = self.local(x_ND[rows], local_E)
        dist.all_reduce(y_ND, group=self.group)
        return y_ND


class SummedLinear(nn.Module):
    """A slice of a linear layer's input columns (nn.Linear or QuantLinear, without bias); the
    partial products of all devices are summed by an all-reduce (tensor parallelism's
    row-parallel linear)."""

    def __init__(self, linear: nn.Module, columns: slice, group):
        super().__init__()
        if getattr(linear, "bias", None) is not None:
            raise ValueError("a summed linear layer takes no bias: every device would add it")
        self.linear = _narrow_tensors(linear, 1, columns, names=("weight",))
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        dist.all_reduce(y, group=self.group)
        return y


def split_model(model: Transformer, plan: SplitPlan, rank: int, group=None) -> Transformer:
    """Keep on this rank only its share of ``plan`` (in place); the ranks of ``group`` then
    run the model together and each gets the full output."""
    start, end = plan.kv_head_ranges[rank]
    config, per_group = model.config, model.config.num_heads // model.config.kv_heads
    head_dim = config.attention_head_dim
    moe_index = 0
    for block in model.layers:
        attn = block.attn
        q_rows = slice(start * per_group * head_dim, end * per_group * head_dim)
        _narrow_tensors(attn.q_proj, 0, q_rows)
        attn.o_proj = SummedLinear(attn.o_proj, q_rows, group)
        if attn.owns_kv:
            kv_rows = slice(start * head_dim, end * head_dim)
            _narrow_tensors(attn.k_proj, 0, kv_rows)
            _narrow_tensors(attn.v_proj, 0, kv_rows)
        attn.num_heads, attn.kv_heads = (end - start) * per_group, end - start
        if isinstance(block.ffn, MoELayer):
            block.ffn.experts = LocalExperts(block.ffn.experts,
                                             *plan.expert_ranges[moe_index][rank], group)
            moe_index += 1
    # The KV cache (Transformer.new_cache) is sized from the config: make it this rank's.
    model.config = replace(config, num_heads=(end - start) * per_group,
                           num_kv_heads=end - start, head_dim=head_dim)
    return model
