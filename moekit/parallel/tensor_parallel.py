"""Expert data parallelism (Skywork-MoE's EDP, ``--tensor t --expert t``): the t ranks of a
group hold the same tokens; attention and the dense MLPs (shared experts too) are
tensor-parallel over the group with DTensor's styles (Megatron's column/row split: q, k, v,
gate and up by output columns, o and down by input rows, one all-reduce after each block),
and each MoE layer's experts are spread over the same group, E / t each. Tokens never leave
the group: every rank routes all of them as the others do (the router is replicated), computes
the routes to its own experts, and one all-reduce sums the experts' outputs over the group.
This works with fewer experts than ranks in the run (only t must divide E), which expert
parallelism over all ranks does not.

Legend: T tokens, K routes per token, D model dim, E experts, t ranks of the group.

Gradients: the group's ranks compute identical gradients for the replicated parameters (the
backward of each tensor-parallel block all-reduces its input's gradient, as DTensor's
``Replicate`` -> ``Partial`` layouts say); each holds the gradient of its own shards and
experts, except a per-head QK-norm's weight, shared by all heads, whose gradient each rank
holds for its own heads (``partial_over_tensor``: summed over the group after the backward).
Data parallelism then averages everything over the ``dp`` ranks of equal group rank.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moekit.moe.dispatch import permute, plan_dispatch, unpermute


def _replicated(x: torch.Tensor, mesh, backward_sums: bool) -> torch.Tensor:
    """``x``, the same on every rank of ``mesh``: ``backward_sums``: its gradient, which each
    rank holds a part of, is summed over the group in the backward (Megatron's "f");
    otherwise ``x`` is a part that the forward sums over the group (Megatron's "g")."""
    from torch.distributed.tensor import DTensor, Partial, Replicate
    if backward_sums:
        return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(
            grad_placements=[Partial()])
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(
        mesh, [Replicate()]).to_local()


class ReplicatedTokensDispatcher:
    """The dispatch step of EDP: this rank (``rank`` of ``size`` in ``mesh``, a 1-D device
    mesh) holds experts [rank * L, (rank + 1) * L), L = E / size, and the same tokens as the
    group's other ranks. The plan it returns covers every route (the layer's statistics are
    then those of one process); the rows it returns are its experts' only."""

    def __init__(self, num_experts: int, mesh, rank: int, size: int):
        if num_experts % size:
            raise ValueError(f"tensor={size} does not divide num_experts={num_experts}: each "
                             "rank of an expert-data-parallel group holds the same number of "
                             "experts")
        self.num_experts, self.mesh = num_experts, mesh
        self.local_experts = num_experts // size
        self.start = rank * self.local_experts

    def run(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None,
            weights_TK: torch.Tensor, experts: nn.Module):
        plan = plan_dispatch(expert_ids_TK, keep_TK, self.num_experts)
        here_TK = (expert_ids_TK >= self.start) & (expert_ids_TK < self.start + self.local_experts)
        local_plan = plan_dispatch(expert_ids_TK, here_TK if keep_TK is None else keep_TK & here_TK,
                                   self.num_experts)
        rows_ND = permute(_replicated(x_TD, self.mesh, backward_sums=True), local_plan)
        counts = local_plan.tokens_per_expert_E[self.start:self.start + self.local_experts]
        weights_TK = _replicated(weights_TK, self.mesh, backward_sums=True)
        y_TD = _replicated(unpermute(experts(rows_ND, counts), weights_TK, local_plan), self.mesh,
                           backward_sums=False)
        return y_TD, plan


def check_tensor_model(config, tensor: int) -> None:
    """What a model must be to be tensor-parallel, beyond ``Layout.stages``' width checks."""
    if tensor > 1 and config.qk_norm and config.qk_norm_placement == "projection":
        raise ValueError(f"tensor={tensor} is not allowed with qk_norm_placement='projection': "
                         "that norm spans every head, which tensor parallelism splits; "
                         "expected tensor=1, or a per-head QK-norm")
    if tensor > 1 and config.mla is not None:
        raise ValueError(f"tensor={tensor} is not allowed with multi-head latent attention "
                         "(mla): its latent projections are not split over ranks in this "
                         "version; expected tensor=1")


def shard_blocks(model: nn.Module, mesh, size: int) -> None:
    """Make every block's attention and dense MLPs (the dense FFN, an MoE layer's shared
    experts) tensor-parallel over ``mesh``, in place; the heads each rank computes shrink to
    its share."""
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    from moekit.moe import MLP, MoELayer
    check_tensor_model(model.config, size)
    for block in model.layers:
        attention = block.attn
        projections = ["q_proj"] + (["k_proj", "v_proj"] if attention.owns_kv else [])
        parallelize_module(attention, mesh, {**{name: ColwiseParallel() for name in projections},
                                             "o_proj": RowwiseParallel()})
        attention.num_heads //= size
        attention.kv_heads //= size
        for norm in (attention.q_norm, attention.k_norm):  # one weight for every head
            if norm is not None:
                for parameter in norm.parameters():
                    parameter.partial_over_tensor = True
        ffn = block.ffn
        mlps = [ffn] if isinstance(ffn, MLP) else (
            [ffn.shared_experts] if isinstance(ffn, MoELayer) and isinstance(ffn.shared_experts, MLP)
            else [])
        for mlp in mlps:
            columns = ["up_proj"] + (["gate_proj"] if mlp.gate_proj is not None else [])
            parallelize_module(mlp, mesh, {**{name: ColwiseParallel() for name in columns},
                                           "down_proj": RowwiseParallel()})


def partial_over_tensor(model: nn.Module) -> list[nn.Parameter]:
    """The replicated parameters whose gradient each rank of an EDP group holds a part of."""
    return [p for p in model.parameters() if getattr(p, "partial_over_tensor", False)]


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every tensor-parallel one gathered whole (a collective over its
    group, in name order on every rank)."""
    return {name: tensors[name].full_tensor() if is_sharded(tensors[name]) else tensors[name]
            for name in sorted(tensors)}


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor-parallel tensor (the tensor itself otherwise)."""
    return tensor.to_local() if is_sharded(tensor) else tensor
