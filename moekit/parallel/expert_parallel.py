"""Expert parallelism (FastMoE's model-parallel mode, Megatron's EP): each MoE layer's experts
are spread over the ``ep`` ranks of the mesh, E / ep consecutive experts each, and every
token's rows travel to the rank of their expert and back.

Legend: T tokens, D model dim, E experts, R ranks of the expert group, L = E / R local experts,
N routes this rank sends, M rows it receives.

The dispatcher sorts this rank's routes by expert as on one process (``plan_dispatch``), so
the rows for rank r are one contiguous block; it sends each rank its per-expert counts, then
the rows (``all_to_all_single`` with uneven splits, no padding to a capacity), regroups what
arrived by local expert, and the combine runs the same way back. Both exchanges are
differentiable: the backward of an all-to-all is the all-to-all with the splits swapped.
Expert gradients are summed over the ranks that hold the same experts (the ``dp`` dimension)
by ``moekit.parallel.parallelize.finish_gradients``, never with other experts' gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from moekit.moe import GroupedExperts, ModuleExperts
from moekit.moe.dispatch import permute, plan_dispatch, unpermute
from moekit.parallel.mesh import collective


class _AllToAll(torch.autograd.Function):
    """Rows to other ranks: ``send[r]`` rows of ``x`` go to rank r, ``receive[r]`` arrive from
    it. The backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x_ND, send: list[int], receive: list[int], group, what: str):
        ctx.send, ctx.receive, ctx.group, ctx.what = send, receive, group, what
        out = x_ND.new_empty(sum(receive), x_ND.shape[1])
        with collective(what):
            dist.all_to_all_single(out, x_ND.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_MD):
        grad_ND = grad_MD.new_empty(sum(ctx.send), grad_MD.shape[1])
        with collective(f"{ctx.what}, backward"):
            dist.all_to_all_single(grad_ND, grad_MD.contiguous(), ctx.send, ctx.receive,
                                   group=ctx.group)
        return grad_ND, None, None, None, None


def all_to_all(x_ND: torch.Tensor, send: list[int], receive: list[int], group,
               what: str = "all-to-all") -> torch.Tensor:
    return _AllToAll.apply(x_ND, send, receive, group, what)


class AllToAllDispatcher:
    """The dispatch step under expert parallelism over ``group`` (rank ``rank`` of ``size``
    holds experts [rank * L, (rank + 1) * L))."""

    def __init__(self, num_experts: int, group, rank: int, size: int, layer_index: int = 0):
        if num_experts % size:
            raise ValueError(f"expert={size} does not divide num_experts={num_experts}: each "
                             "expert-parallel rank holds the same number of experts")
        self.num_experts, self.group, self.rank, self.size = num_experts, group, rank, size
        self.layer = f"layer {layer_index}"
        self.local_experts = num_experts // size

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor,
                 keep_TK: torch.Tensor | None):
        plan = plan_dispatch(expert_ids_TK, keep_TK, self.num_experts)
        rows_ND = permute(x_TD, plan)
        send_RL = plan.tokens_per_expert_E.view(self.size, self.local_experts)
        receive_RL = torch.empty_like(send_RL)
        with collective(f"all-to-all of {self.layer}'s counts"):
            dist.all_to_all_single(receive_RL, send_RL.contiguous(), group=self.group)
        # The splits must be known on the host: the one read of this layer's dispatch.
        send, receive = send_RL.sum(1).tolist(), receive_RL.sum(1).tolist()
        arrived_MD = all_to_all(rows_ND, send, receive, self.group,
                                f"all-to-all of {self.layer}'s rows")
        # Arrived rows are grouped by sender, then expert; the experts want them by expert.
        expert_of_row_M = torch.arange(self.local_experts, device=x_TD.device).repeat(
            self.size).repeat_interleave(receive_RL.flatten(), output_size=len(arrived_MD))
        by_expert_M = torch.argsort(expert_of_row_M, stable=True)
        handle = (plan, by_expert_M, send, receive)
        return (arrived_MD.index_select(0, by_expert_M), receive_RL.sum(0), plan, handle)

    def combine(self, y_MD: torch.Tensor, weights_TK: torch.Tensor, handle) -> torch.Tensor:
        plan, by_expert_M, send, receive = handle
        by_sender_MD = torch.empty_like(y_MD).index_copy_(0, by_expert_M, y_MD)
        returned_ND = all_to_all(by_sender_MD, receive, send, self.group,
                                 f"all-to-all back of {self.layer}'s rows")
        return unpermute(returned_ND, weights_TK, plan)


def local_experts(experts: nn.Module, start: int, end: int) -> nn.Module:
    """Experts [start, end) of a layer's experts module, as a module of the same kind (the
    same parameter names, so that checkpoints find each expert by name and index)."""
    if isinstance(experts, GroupedExperts):
        local = GroupedExperts(end - start, experts.hidden_size, experts.ffn_size,
                               experts.activation).to(experts.in_proj.device,
                                                      experts.in_proj.dtype)
        with torch.no_grad():
            local.in_proj.copy_(experts.in_proj[start:end])
            local.down_proj.copy_(experts.down_proj[start:end])
        return local
    if isinstance(experts, ModuleExperts):
        return ModuleExperts(list(experts.experts)[start:end])
    raise ValueError(f"expert parallelism takes GroupedExperts or ModuleExperts, not "
                     f"{type(experts).__name__}")


def shard_experts(model: nn.Module, group, rank: int, size: int, dispatcher=None) -> None:
    """Keep this rank's experts in every MoE layer of ``model`` and route through the
    all-to-all over ``group`` (or through ``dispatcher(layer)``, another dispatcher with the
    same ``local_experts``); their parameters are marked ``expert_parallel``."""
    from moekit.moe import MoELayer
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        layer.dispatcher = (dispatcher(layer) if dispatcher is not None else
                            AllToAllDispatcher(layer.config.num_experts, group, rank, size,
                                               layer.layer_index))
        local = layer.dispatcher.local_experts
        layer.experts = local_experts(layer.experts, rank * local, (rank + 1) * local)
        for parameter in layer.experts.parameters():
            parameter.expert_parallel = True


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters()
            if getattr(p, "expert_parallel", False)]



def whole_expert_tensors(tensors: dict[str, torch.Tensor], model: nn.Module, mesh) -> dict:
    """``tensors`` (parameters, or optimizer moments named ``PARAMETER.KEY``) with every
    sharded expert tensor gathered whole over its expert group: what one process holds, so
    that a checkpoint does not depend on the layout. A collective: every rank calls it."""
    sharded = {name for name, _ in expert_parameters(model)}
    if not sharded or mesh.expert_size == 1:
        return tensors
    whole = dict(tensors)
    for key in sorted(tensors):
        if (key in sharded or key.rsplit(".", 1)[0] in sharded) and tensors[key].dim() > 0:
            pieces = [torch.empty_like(tensors[key]) for _ in range(mesh.expert_size)]
            dist.all_gather(pieces, tensors[key].contiguous(), group=mesh.expert_group)
            whole[key] = torch.cat(pieces)
    return whole


def local_part(whole_E: torch.Tensor, mesh) -> torch.Tensor:
    """This rank's experts of a whole stacked expert tensor (its first dimension)."""
    local = whole_E.shape[0] // mesh.expert_size
    return whole_E[mesh.expert_rank * local:(mesh.expert_rank + 1) * local]
