"""FasterMoE's shadowing: a hot expert's weights travel to every rank for one forward, instead
of all its tokens to its rank; each rank computes its own tokens of that expert, and the
gradients of the copies are summed back onto the owner.

Legend: D model dim, F expert FFN dim, R ranks of the expert group, E experts, L = E / R
local experts, S shadowed experts.

Which experts, chosen every forward of every layer from the per-expert loads of all ranks
(``counts_RE[r, e]``: rows rank r routes to expert e; one all-gather, the same numbers on every
rank, so every rank chooses the same): the greedy of FasterMoE's policy with a per-rank cost,

    time(S) = max over ranks q of [3 n_q(S) f / flop_rate + 4 max(sent_q(S), received_q(S)) D b
              / link] + 2 |S| W / link,

n_q(S) the rows rank q computes (its own experts' rows from every rank, for experts outside S,
plus its own rows of the experts in S), f the FLOPs of one row through one expert (3: one
forward, two backward passes), sent_q / received_q the rows it
exchanges with other ranks for experts outside S (each crosses four times: out, back, and the
same in the backward), b bytes per number, W the bytes of one expert's weights (a broadcast in
the forward, a reduce in the backward). Experts are taken hottest first (ties: lower id) while
each one shortens time(S). FasterMoE's own policy ranks and sums the loads per sending worker,
and assumes one expert per worker; this one sums per expert and takes the busiest rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit.moe.experts import GroupedExperts, expert_mlp
from moekit.parallel.mesh import collective


@dataclass(frozen=True)
class ShadowCostModel:
    """The prices of :func:`choose_shadowed`: one row through one expert (FLOPs, and bytes on
    the link), one expert's weights (bytes), and the machine's rates."""

    row_flops: float
    row_bytes: float
    expert_bytes: float
    link_bytes_per_s: float
    flops_per_s: float

    @classmethod
    def for_experts(cls, experts: GroupedExperts, link_gbps: float,
                    expert_gflops: float) -> ShadowCostModel:
        in_width, hidden = experts.in_proj.shape[1:]
        item = experts.in_proj.element_size()
        return cls(row_flops=2 * (in_width * hidden + hidden * experts.ffn_size),
                   row_bytes=hidden * item,
                   expert_bytes=(in_width * hidden + hidden * experts.ffn_size) * item,
                   link_bytes_per_s=link_gbps * 1e9, flops_per_s=expert_gflops * 1e9)

    def step_time(self, counts_RE: torch.Tensor, shadowed_E: torch.Tensor) -> float:
        """time(S) in seconds for the shadowed experts ``shadowed_E`` (bool [E])."""
        ranks, num_experts = counts_RE.shape
        counts_RE = counts_RE.double()
        owner_E = torch.arange(num_experts) // (num_experts // ranks)
        owns_RE = owner_E[None, :] == torch.arange(ranks)[:, None]
        exchanged_RE = counts_RE * ~shadowed_E  # rows that travel, by sender
        load_E = exchanged_RE.sum(0)
        computed_R = (owns_RE * load_E).sum(1) + (counts_RE * shadowed_E).sum(1)
        sent_R = (exchanged_RE * ~owns_RE).sum(1)
        received_R = (owns_RE * (load_E - exchanged_RE)).sum(1)
        per_rank_R = (3 * computed_R * self.row_flops / self.flops_per_s
                      + 4 * torch.maximum(sent_R, received_R) * self.row_bytes
                      / self.link_bytes_per_s)
        return float(per_rank_R.max()) + 2 * int(shadowed_E.sum()) * self.expert_bytes \
            / self.link_bytes_per_s


def choose_shadowed(counts_RE: torch.Tensor, model: ShadowCostModel) -> torch.Tensor:
    """The experts to shadow (bool [E]): hottest first while each shortens ``model``'s time."""
    counts_RE = counts_RE.cpu()
    load_E = counts_RE.sum(0)
    shadowed_E = torch.zeros(counts_RE.shape[1], dtype=torch.bool)
    best = model.step_time(counts_RE, shadowed_E)
    for expert in sorted(range(len(load_E)), key=lambda e: (-int(load_E[e]), e)):
        if load_E[expert] == 0:
            break
        candidate_E = shadowed_E.clone()
        candidate_E[expert] = True
        time = model.step_time(counts_RE, candidate_E)
        if time >= best:
            break
        shadowed_E, best = candidate_E, time
    return shadowed_E


class _Replicate(torch.autograd.Function):
    """The owner's flat tensor on every rank of ``group`` (a broadcast); the backward sums every
    rank's gradient onto the owner (a reduce). Other ranks pass any tensor of theirs that
    requires grad as ``source``, so that their copy is in the graph and joins the reduce."""

    @staticmethod
    def forward(ctx, source, numel: int, owner: int, is_owner: bool, group, what: str):
        ctx.owner, ctx.is_owner, ctx.group, ctx.what = owner, is_owner, group, what
        copy = source.detach().clone() if is_owner else source.new_empty(numel)
        with collective(what):
            dist.broadcast(copy, owner, group=group)
        return copy

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        with collective(f"{ctx.what}, backward"):
            dist.reduce(grad, ctx.owner, op=dist.ReduceOp.SUM, group=ctx.group)
        return (grad if ctx.is_owner else None), None, None, None, None, None


def shadow_experts(rows_ND: torch.Tensor, rows_per_shadow_S: torch.Tensor,
                   shadowed: list[int], experts: GroupedExperts, group, rank: int,
                   what: str) -> torch.Tensor:
    """This rank's rows of the shadowed experts (``shadowed``, ascending; rows grouped by
    expert, ``rows_per_shadow_S`` each) through copies of those experts: one broadcast per
    owner, of all its shadowed experts' weights (each collective costs every rank a wait)."""
    local = experts.num_experts
    in_proj, down_proj = experts.in_proj, experts.down_proj
    owners = sorted({expert // local for expert in shadowed})
    copies_in, copies_down = [], []
    for owner in owners:
        indices = [e % local for e in shadowed if e // local == owner]
        shape_in = (len(indices), *in_proj.shape[1:])
        shape_down = (len(indices), *down_proj.shape[1:])
        sizes = (math.prod(shape_in), math.prod(shape_down))
        source = in_proj  # on other ranks: only there to join the backward's reduce
        if owner == rank:
            index = torch.tensor(indices, device=in_proj.device)
            source = torch.cat([in_proj.index_select(0, index).flatten(),
                                down_proj.index_select(0, index).flatten()])
        global_owner = dist.get_global_rank(group, owner) if group is not None else owner
        flat = _Replicate.apply(source, sum(sizes), global_owner, owner == rank, group,
                                f"{what}: broadcast from rank {owner}")
        weights_in, weights_down = flat.split(sizes)
        copies_in.append(weights_in.view(shape_in))
        copies_down.append(weights_down.view(shape_down))
    return expert_mlp(rows_ND, torch.cat(copies_in), torch.cat(copies_down),
                      rows_per_shadow_S, experts.activation)
