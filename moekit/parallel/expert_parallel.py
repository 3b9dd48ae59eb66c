"""Expert parallelism (FastMoE's model-parallel mode, Megatron's EP): each MoE layer's experts
are spread over the ``ep`` ranks of the mesh, E / ep consecutive experts each, and every
token's rows travel to the rank of their expert and back.

Legend: T tokens, D model dim, E experts, R ranks of the expert group, L = E / R local experts,
N routes this rank sends, M rows it receives.

The dispatcher sorts this rank's routes by expert as on one process (``plan_dispatch``), so
the rows for rank r are one contiguous block; it sends each rank its per-expert counts, then
the rows (``all_to_all_single`` with uneven splits, no padding to a capacity), regroups what
arrived by local expert, and the outputs return the same way. FasterMoE's smart schedule
(``moekit.parallel.smart_schedule``) replaces the two row exchanges by chunks in ring order,
overlapped with the experts; its shadowing (``moekit.parallel.shadowing``) keeps a hot
expert's rows on every rank and sends its weights instead. Both exchanges are
differentiable: the backward of an all-to-all is the all-to-all with the splits swapped.
Expert gradients are summed over the ranks that hold the same experts (the ``dp`` dimension)
by ``moekit.parallel.parallelize.finish_gradients``, never with other experts' gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from moekit.config import ExpertParallelConfig
from moekit.moe import GroupedExperts
from moekit.moe.dispatch import permute, plan_dispatch, unpermute
from moekit.parallel.mesh import collective
from moekit.parallel.shadowing import ShadowCostModel, choose_shadowed, shadow_experts
from moekit.parallel.smart_schedule import smart_experts


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
    holds experts [rank * L, (rank + 1) * L)), with FasterMoE's smart schedule and shadowing
    when ``options`` asks for them (docs/parallel.md)."""

    def __init__(self, num_experts: int, group, rank: int, size: int, layer_index: int = 0,
                 options: ExpertParallelConfig = ExpertParallelConfig()):
        if num_experts % size:
            raise ValueError(f"expert={size} does not divide num_experts={num_experts}: each "
                             "expert-parallel rank holds the same number of experts")
        self.num_experts, self.group, self.rank, self.size = num_experts, group, rank, size
        self.layer = f"layer {layer_index}"
        self.local_experts = num_experts // size
        self.options = options

    def run(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None,
            weights_TK: torch.Tensor, experts: nn.Module):
        """(y_TD, plan): every kept route computed by its expert, wherever that expert is."""
        plan = plan_dispatch(expert_ids_TK, keep_TK, self.num_experts)
        rows_ND = permute(x_TD, plan)
        counts_E = plan.tokens_per_expert_E
        if self.options.shadow:
            y_ND = self._with_shadows(rows_ND, counts_E, experts)
        else:
            y_ND = self._exchange_and_compute(rows_ND, counts_E, self._receive(counts_E), experts)
        return unpermute(y_ND, weights_TK, plan), plan

    def _with_shadows(self, rows_ND: torch.Tensor, counts_E: torch.Tensor,
                      experts: nn.Module) -> torch.Tensor:
        """The experts' outputs for ``rows_ND``, the shadowed experts' rows computed here by
        copies of them, the others where their experts are."""
        counts_RE = self._gather(counts_E)
        receive_RL = counts_RE[:, self.rank * self.local_experts:
                               (self.rank + 1) * self.local_experts]
        shadowed_E = choose_shadowed(counts_RE, ShadowCostModel.for_experts(
            experts, self.options.link_gbps, self.options.expert_gflops)).to(counts_E.device)
        if not shadowed_E.any():
            return self._exchange_and_compute(rows_ND, counts_E, receive_RL, experts)
        is_shadow_N = shadowed_E.repeat_interleave(counts_E, output_size=len(rows_ND))
        shadow_rows = is_shadow_N.nonzero().squeeze(1)
        remote_rows = (~is_shadow_N).nonzero().squeeze(1)
        mine_L = shadowed_E.view(self.size, self.local_experts)[self.rank]
        remote_ND = self._exchange_and_compute(
            rows_ND.index_select(0, remote_rows), counts_E.masked_fill(shadowed_E, 0),
            receive_RL.masked_fill(mine_L, 0), experts)
        shadow_ND = shadow_experts(rows_ND.index_select(0, shadow_rows), counts_E[shadowed_E],
                                   shadowed_E.nonzero().squeeze(1).tolist(), experts, self.group,
                                   self.rank, f"shadowing of {self.layer}")
        return remote_ND.new_empty(len(rows_ND), remote_ND.shape[1]).index_copy(
            0, remote_rows, remote_ND).index_copy(0, shadow_rows, shadow_ND)

    def _receive(self, counts_E: torch.Tensor) -> torch.Tensor:
        """receive_RL: the rows each rank sends for this rank's experts (an all-to-all of the
        per-expert counts)."""
        send_RL = counts_E.view(self.size, self.local_experts)
        receive_RL = torch.empty_like(send_RL)
        with collective(f"all-to-all of {self.layer}'s counts"):
            dist.all_to_all_single(receive_RL, send_RL.contiguous(), group=self.group)
        return receive_RL

    def _gather(self, counts_E: torch.Tensor) -> torch.Tensor:
        """counts_RE: every rank's rows per expert (what shadowing decides from)."""
        pieces = [torch.empty_like(counts_E) for _ in range(self.size)]
        with collective(f"all-gather of {self.layer}'s counts"):
            dist.all_gather(pieces, counts_E, group=self.group)
        return torch.stack(pieces)

    def _exchange_and_compute(self, rows_ND: torch.Tensor, send_E: torch.Tensor,
                              receive_RL: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        """The experts' outputs for ``rows_ND`` (grouped by expert, ``send_E`` rows each), from
        wherever those experts are; ``receive_RL[r, l]`` rows arrive from rank r for local
        expert l."""
        send_RL = send_E.view(self.size, self.local_experts)
        if self.options.overlap:
            return smart_experts(rows_ND, send_RL, receive_RL, experts, self.group, self.rank,
                                 self.size, f"smart-schedule exchange of {self.layer}'s rows")
        # The splits must be known on the host: one read per layer, of both directions.
        send, receive = torch.stack([send_RL.sum(1), receive_RL.sum(1)]).tolist()
        arrived_MD = all_to_all(rows_ND, send, receive, self.group,
                                f"all-to-all of {self.layer}'s rows")
        # Arrived rows are grouped by sender, then expert; the experts want them by expert.
        by_expert_M, by_sender_M = block_transpose_orders(receive_RL, len(arrived_MD))
        y_MD = experts(reorder_rows(arrived_MD, by_expert_M, by_sender_M), receive_RL.sum(0))
        return all_to_all(reorder_rows(y_MD, by_sender_M, by_expert_M), receive, send,
                          self.group, f"all-to-all back of {self.layer}'s rows")


def block_transpose_orders(sizes_RL: torch.Tensor,
                           rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` rows held in blocks (r, l) of ``sizes_RL[r, l]`` rows, in the order r, then l:
    the row order that takes them to the order l, then r (each block's rows kept in order),
    and its inverse. From the block sizes alone, without a sort or a read on the host."""

    def order(sizes_AB: torch.Tensor) -> torch.Tensor:
        # Rows in blocks (a, b), a first, taken in the order b, then a: each block's start in
        # the a-first order, minus its start in the b-first order, plus the row's position.
        sizes = sizes_AB.flatten()
        starts_AB = (sizes.cumsum(0) - sizes).view_as(sizes_AB)
        sizes_BA, starts_BA = sizes_AB.t().flatten(), starts_AB.t().flatten()
        shift_BA = starts_BA - (sizes_BA.cumsum(0) - sizes_BA)
        return shift_BA.repeat_interleave(sizes_BA, output_size=rows) + torch.arange(
            rows, device=sizes_AB.device)

    return order(sizes_RL), order(sizes_RL.t())


class _Reorder(torch.autograd.Function):
    """Rows in another order (a permutation) whose backward is the inverse permutation's
    gather: index_select's backward would zero a buffer and scatter-add into it."""

    @staticmethod
    def forward(ctx, x_MD: torch.Tensor, order_M: torch.Tensor, inverse_M: torch.Tensor):
        ctx.save_for_backward(inverse_M)
        return x_MD.index_select(0, order_M)

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):
        inverse_M, = ctx.saved_tensors
        return grad_MD.index_select(0, inverse_M), None, None


def reorder_rows(x_MD: torch.Tensor, order_M: torch.Tensor,
                 inverse_M: torch.Tensor) -> torch.Tensor:
    """x_MD[order_M], differentiable; ``inverse_M`` is the inverse of the permutation."""
    return _Reorder.apply(x_MD, order_M, inverse_M)


def local_experts(experts: nn.Module, start: int, end: int) -> nn.Module:
    """Experts [start, end) of a layer's experts module, as a module of the same kind with
    the same parameter names (its ``part``: ``GroupedExperts``' block of rows, ``ModuleExperts``'
    modules under their numbers, LoRA's experts with their factors' rows), so that
    checkpoints find each expert by name and index."""
    if not hasattr(experts, "part"):
        raise ValueError(f"expert parallelism takes experts modules that give a part of their "
                         f"experts (GroupedExperts, ModuleExperts), not {type(experts).__name__}")
    return experts.part(start, end)


def shard_experts(model: nn.Module, group, rank: int, size: int, dispatcher=None,
                  options: ExpertParallelConfig = ExpertParallelConfig()) -> None:
    """Keep this rank's experts in every MoE layer of ``model`` and route through the
    all-to-all over ``group`` (or through ``dispatcher(layer)``, another dispatcher with the
    same ``local_experts``); their parameters are marked ``expert_parallel``."""
    from moekit.moe import MoELayer
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        # (not a subclass either: LoRA's experts compute more than the stacked weights)
        if dispatcher is None and options.shadow and type(layer.experts) is not GroupedExperts:
            raise ValueError(f"shadowing copies stacked expert weights: it takes GroupedExperts, "
                             f"not {type(layer.experts).__name__} (turn shadow off)")
        layer.dispatcher = (dispatcher(layer) if dispatcher is not None else
                            AllToAllDispatcher(layer.config.num_experts, group, rank, size,
                                               layer.layer_index, options))
        local = layer.dispatcher.local_experts
        layer.experts = local_experts(layer.experts, rank * local, (rank + 1) * local)
        stacked = isinstance(layer.experts, GroupedExperts)
        for parameter in layer.experts.parameters():
            parameter.expert_parallel = True
            parameter.stacked_experts = stacked


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters()
            if getattr(p, "expert_parallel", False)]


def stacked_expert_names(model: nn.Module) -> set[str]:
    """The expert parameters that hold a block of a layer's stacked [E, ...] tensor (this
    expert group's rows): ``GroupedExperts``'. A ``ModuleExperts`` parameter is one expert's
    whole tensor under its own name."""
    return {name for name, p in expert_parameters(model) if getattr(p, "stacked_experts", False)}


def whole_expert_tensors(tensors: dict[str, torch.Tensor], model: nn.Module, mesh) -> dict:
    """``tensors`` (parameters, or optimizer moments named ``PARAMETER.KEY``) with every
    stacked expert tensor gathered whole over its expert group, and every rank's
    ``ModuleExperts`` experts: what one process holds, so that a checkpoint does not depend
    on the layout. A collective: every rank calls it."""
    if mesh.expert_size == 1:
        return tensors
    stacked = stacked_expert_names(model)
    numbered = {name for name, _ in expert_parameters(model)} - stacked

    def of(names: set[str], key: str) -> bool:
        return (key in names or key.rsplit(".", 1)[0] in names) and tensors[key].dim() > 0

    whole = dict(tensors)
    for key in sorted(tensors):
        if of(stacked, key):
            pieces = [torch.empty_like(tensors[key]) for _ in range(mesh.expert_size)]
            dist.all_gather(pieces, tensors[key].contiguous(), group=mesh.expert_group)
            whole[key] = torch.cat(pieces)
    if numbered:  # each rank's experts under their own names: gathered as they are
        everyone = [None] * mesh.expert_size
        dist.all_gather_object(everyone, {key: tensors[key] for key in tensors
                                          if of(numbered, key)}, group=mesh.expert_group)
        for held in everyone:
            whole.update(held)
    return whole


def local_part(whole_E: torch.Tensor, mesh) -> torch.Tensor:
    """This rank's experts of a whole stacked expert tensor (its first dimension)."""
    local = whole_E.shape[0] // mesh.expert_size
    return whole_E[mesh.expert_rank * local:(mesh.expert_rank + 1) * local]
