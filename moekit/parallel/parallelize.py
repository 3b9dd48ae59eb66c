"""Applying a layout to a plain model from outside: the model never asks for ranks.

``parallelize(model, mesh)`` shards the experts over the mesh's ``ep`` groups (when it has
them) and makes the rest data parallel over every rank: ``DistributedDataParallel`` (ZeRO 0
and 1), or FSDP2's ``fully_shard`` per block and at the root (ZeRO 2: gradients and, through
them, the optimizer state sharded; ZeRO 3: the parameters too, gathered for each block's forward
and again for its backward). Experts under expert parallelism stay on the expert-parallel path
in both: left out of DDP and of ``fully_shard`` (docs/parallel.md says why). After a step's
backward, ``finish_gradients`` sums each expert's gradient over the ranks that hold that expert,
and ``clip_gradients`` measures the global norm with every parameter counted once.
"""
from __future__ import annotations

import inspect
import math
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from moekit.parallel.expert_parallel import (expert_parameters, shard_experts,
                                             whole_expert_tensors)
from moekit.parallel.mesh import Mesh


def parallelize(model: nn.Module, mesh: Mesh) -> nn.Module:
    """The model as ``mesh`` runs it: itself on one process; otherwise with this rank's experts
    only (``expert_size`` > 1), the rest in a ``DistributedDataParallel`` wrapper, whose
    gradient all-reduce runs in buckets overlapped with the backward, or (``mesh.zero`` 2 or 3)
    sharded in place by ``fully_shard``. Buffers are not broadcast: the router state in them
    moves identically on every rank (``MoELayer.update_router_state``)."""
    if mesh.data_size == 1:
        return model
    experts = []
    if mesh.expert_size > 1:
        shard_experts(model, mesh.expert_group, mesh.expert_rank, mesh.expert_size)
        experts = expert_parameters(model)
    if mesh.zero >= 2:
        return _fully_shard(model, mesh, {p for _, p in experts})
    from torch.nn.parallel import DistributedDataParallel
    if experts:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [name for name, _ in experts])
    # torch 2.13 renamed the option; older versions know only the first name.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, process_group=mesh.data_group, gradient_as_bucket_view=True,
                                   **no_buffer_sync)


def _fully_shard(model: nn.Module, mesh: Mesh, experts: set[nn.Parameter]) -> nn.Module:
    """ZeRO 2/3 with FSDP2 over every rank: each block one unit (its parameters gathered
    together), the embeddings, final norm and output layer the root's."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    data_mesh = DeviceMesh(mesh.device.type, list(range(mesh.data_size)))
    options = dict(mesh=data_mesh, reshard_after_forward=mesh.zero == 3,
                   ignored_params=experts or None)
    # FSDP2 warns, at every forward, that a block returns a view (its K/V, which CLA shares
    # with the next block): nothing writes into them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    for block in getattr(model, "layers", ()):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside whatever ``parallelize`` wrapped it in."""
    return getattr(model, "module", model)


@torch.no_grad()
def finish_gradients(model: nn.Module, mesh: Mesh) -> None:
    """Expert gradients as data parallelism would leave them: every rank backpropagates R
    times its share of the loss, and an expert's rows come from all ranks of its expert group,
    so the sum over the expert's replicas divided by R is the global batch's gradient."""
    if mesh.expert_size == 1:
        return
    for _, parameter in expert_parameters(unwrap(model)):
        if parameter.grad is not None:
            if mesh.data_size > mesh.expert_size:
                dist.all_reduce(parameter.grad, group=mesh.expert_replica_group)
            parameter.grad.div_(mesh.data_size)


def _local(gradient: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient (its shard, when FSDP2 holds it as a DTensor)."""
    return gradient.to_local() if hasattr(gradient, "to_local") else gradient


@torch.no_grad()
def clip_gradients(model: nn.Module, max_norm: float, mesh: Mesh) -> torch.Tensor:
    """Scale every gradient so that their global norm is at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_``); returns the norm before. Each gradient counts once:
    a replicated one as this rank holds it, an expert's (held by one rank of each expert
    group) summed over the expert group, an FSDP2 shard (a DTensor) summed over every rank."""
    experts = {id(p) for _, p in expert_parameters(unwrap(model))}
    replicated, expert_sharded, data_sharded = range(3)
    kinds = [(data_sharded if hasattr(p.grad, "to_local") else
              expert_sharded if id(p) in experts else replicated, _local(p.grad))
             for p in model.parameters() if p.grad is not None]
    gradients = [gradient for _, gradient in kinds]
    squares = torch.zeros(3, dtype=torch.float64, device=gradients[0].device)
    for kind, gradient in kinds:
        norm = torch.linalg.vector_norm(gradient).double()  # in its own dtype: no copy
        squares[kind] += norm * norm
    if mesh.expert_size > 1 and experts:
        dist.all_reduce(squares[expert_sharded:data_sharded], group=mesh.expert_group)
    if mesh.zero >= 2 and mesh.data_size > 1:
        dist.all_reduce(squares[data_sharded:], group=mesh.data_group)
    norm = squares.sum().sqrt()
    # Read on the host: the step logs the norm anyway, and a norm under the limit then costs
    # no pass over the gradients (at 64 experts that pass was a tenth of the step).
    if math.isfinite(max_norm) and float(norm) + 1e-6 > max_norm:
        torch._foreach_mul_(gradients, (max_norm / (norm + 1e-6)).to(gradients[0].dtype))
    return norm


def whole_tensors(tensors: dict[str, torch.Tensor], model: nn.Module, mesh: Mesh) -> dict:
    """``tensors`` (parameters, gradients, or optimizer moments named ``PARAMETER.KEY``) as one
    process holds them: FSDP2's shards gathered (``full_tensor``), and the experts gathered
    over their expert group (``whole_expert_tensors``). A collective: every rank calls it."""
    whole = {key: value.full_tensor() if hasattr(value, "full_tensor") else value
             for key, value in sorted(tensors.items())}
    return whole_expert_tensors(whole, unwrap(model), mesh)
