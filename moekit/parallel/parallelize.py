"""Applying a layout to a plain model from outside: the model never asks for ranks.

``parallelize(model, mesh)`` hands every gate the ranks it routes over, keeps this rank's
pipeline stage of the model (when the mesh has stages), shards the experts over the mesh's
``ep`` groups (when it has them) and makes the rest data parallel over the ranks of the stage: ``DistributedDataParallel`` (ZeRO 0 and 1), or
FSDP2's ``fully_shard`` per block and at the root (ZeRO 2: gradients and, through them, the
optimizer state sharded; ZeRO 3: the parameters too, gathered for each block's forward and
again for its backward), each layer's experts a unit of their own over the ranks that hold
them. After a step's backward, ``finish_gradients`` sums each whole expert's gradient over the
ranks that hold that expert (DDP averages only the replicated parameters), and
``gradient_norm`` measures the global norm with every parameter counted once (FSDP2's shards
by DTensor norms). A model built on the meta device is materialised with only what the rank
holds, read from a folder or drawn as one process draws it.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from moekit.parallel.expert_parallel import (expert_parameters, local_part, shard_experts,
                                             whole_expert_tensors)
from moekit.parallel.mesh import Mesh
from moekit.parallel.pipeline import StageModule, cut_into_stage, gather_stages
from moekit.parallel.tensor_parallel import (ReplicatedTokensDispatcher, full_tensors,
                                             is_sharded, local, partial_over_tensor,
                                             shard_blocks)


def parallelize(model: nn.Module, mesh: Mesh, weights=None, device=None, *,
                given: dict[str, torch.Tensor] | None = None, frozen: bool = False) -> nn.Module:
    """The model as ``mesh`` runs it: itself on one process; otherwise cut to this rank's
    pipeline stage (``model`` itself keeps only the stage's parts, and a ``StageModule`` runs
    them), with this rank's experts only (``expert_size`` > 1), inside a
    ``DistributedDataParallel`` wrapper whose gradient all-reduce runs in buckets overlapped
    with the backward. Buffers are not broadcast: the router state in them moves identically
    on every rank (``MoELayer.update_router_state``).

    A ``model`` built on the meta device (a ``Transformer``) is materialised on ``device``,
    each rank only what it holds once the layout is applied (its stage, experts, shards), so
    no rank ever holds the whole model: read from ``weights``, a model or checkpoint folder
    (current format; each rank reads only its parts, ``load_sharded``, DCP), or without one
    drawn as ``Transformer(model.config)`` would be from the current random state, the same
    values as one process (``init_in_parts``: every rank draws each part of the model whole
    in turn, keeps its part and drops the rest). ``given``: whole tensors by name that stand
    in for the folder's or fill what it lacks (LoRA's adapters), each rank keeping its part.

    A ``frozen`` model (DPO's reference: forwards only, no gradients) gets the same layout
    without DDP, and under ZeRO-2/3 its parameters are sharded again after each forward."""
    if mesh.world_size == 1:
        _materialise(model, weights, device, mesh, given)
        return model
    if mesh.tensor_size > 1:  # EDP: the group shares its tokens
        shard_blocks(model, mesh.tensor_mesh, mesh.tensor_size)
        shard_experts(model, mesh.expert_group, mesh.expert_rank, mesh.expert_size,
                      lambda layer: ReplicatedTokensDispatcher(
                          layer.config.num_experts, mesh.tensor_mesh, mesh.tensor_rank,
                          mesh.tensor_size))
    elif mesh.expert_size > 1:
        shard_experts(model, mesh.expert_group, mesh.expert_rank, mesh.expert_size,
                      options=mesh.expert_options)
    if mesh.tensor_size == 1:  # under EDP the expert group's ranks share their tokens
        hand_route_groups(model, mesh)
    if mesh.pipeline_size > 1:
        cut_into_stage(model, mesh.stage_layers, mesh.pipeline_rank)
        model = StageModule(model, mesh.pipeline_rank, mesh.pipeline_size)
    if mesh.zero >= 2 and mesh.data_size > 1:  # FSDP2 shards the meta model as it is
        model = _fully_shard(model, mesh, reshard_after_forward=frozen or mesh.zero == 3)
    _materialise(model, weights, device, mesh, given)
    if mesh.data_size == 1 or mesh.zero >= 2 or frozen:
        return model
    from torch.nn.parallel import DistributedDataParallel
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, [name for name, _ in reduced_by_hand(model)])
    # torch 2.13 renamed the option; older versions know only the first name.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    data_parallel = DistributedDataParallel(model, process_group=mesh.data_group,
                                            gradient_as_bucket_view=True, **no_buffer_sync)
    _settle_buckets(data_parallel)
    return data_parallel


def _settle_buckets(data_parallel: nn.Module) -> None:
    """Fix DDP's gradient buckets before any step, the same way in every process.

    DDP lays its buckets out anew in the order gradients became ready in its first backward,
    and gloo's all-reduce over more than two ranks sums each number in an order set by its
    place in its bucket. Left to the first training step, the layout (and so the rounding of
    every later step) would depend on where a process started: a run resumed from a
    checkpoint would sum its first step as no step of the uninterrupted run did. So the first
    backward is this throwaway one, on one row of two tokens, the same in every process; its
    gradients are dropped and its random draws (dropout) undone. Only a ``Transformer`` (or
    a stage of one) is settled so: another module's inputs are not known here, and its
    first step settles its buckets."""
    from moekit.model.transformer import Transformer
    module = data_parallel.module
    model = module.model if isinstance(module, StageModule) else module
    if not isinstance(model, Transformer):
        return
    device = next(model.parameters()).device
    tokens = torch.zeros(1, 2, dtype=torch.long, device=device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        if isinstance(module, StageModule) and not module.is_first:
            out = data_parallel(torch.zeros(1, 2, model.config.hidden_size,
                                            dtype=module.weight_dtype, device=device))
        else:
            out = data_parallel(tokens)
        (out if isinstance(out, torch.Tensor) else out.logits).float().sum().backward()
    for parameter in model.parameters():
        parameter.grad = None


def hand_route_groups(model: nn.Module, mesh: Mesh) -> None:
    """Give every MoE layer's gate the ranks it routes over: its expert group, and every rank
    of the batch (``Gate.route_groups``)."""
    from moekit.moe import MoELayer, RouteGroup, RouteGroups
    groups = RouteGroups(
        experts=RouteGroup(mesh.expert_group if mesh.expert_size > 1 else None,
                           mesh.expert_rank, mesh.expert_size),
        batch=RouteGroup(mesh.data_group, mesh.data_rank, mesh.data_size))
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            layer.router.route_groups = groups


def _fully_shard(model: nn.Module, mesh: Mesh, reshard_after_forward: bool) -> nn.Module:
    """ZeRO 2/3 with FSDP2 over the data-parallel ranks (a stage's under a pipeline, the
    ``dp`` group's under EDP): each block one unit (its parameters gathered together), the
    embeddings, final norm and output layer the root's. EDP's tensor-parallel weights are
    DTensors on the ``ep`` dimension of the same device mesh already: FSDP2 shards them over
    ``dp`` too, making them 2-D (as torchtitan composes FSDP with TP). Under expert
    parallelism each layer's built-in experts are a unit of their own over their replicas
    (the ranks holding the same experts), their gradients summed over those replicas and
    divided by all the data-parallel ranks, as ``finish_gradients`` does for whole ones;
    ``ModuleExperts`` make one unit per expert module, so that under ZeRO-3 a rank holds one
    of them whole at a time. With one replica there is nothing to shard, and experts stay
    whole, out of FSDP2."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from moekit.moe import GroupedExperts, MoELayer
    if mesh.tensor_size > 1:
        data_ranks = mesh.device_mesh["dp"]
        # A 2-D shard's norm (the gradient clipping's) then takes one all-reduce over the
        # flattened dimensions, not one per dimension (DTensor looks for this mesh).
        mesh.device_mesh["dp", "ep"]._flatten()
    else:
        stages = torch.arange(mesh.world_size).view(mesh.pipeline_size, mesh.data_size)
        data_ranks = DeviceMesh(mesh.device.type, stages, mesh_dim_names=("pp", "data"))["data"]
    options = dict(reshard_after_forward=reshard_after_forward)
    # FSDP2 warns, at every forward, that a block returns a view (its K/V, which CLA shares
    # with the next block): nothing writes into them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    whole_experts = set()

    def shard_over_replicas(experts: nn.Module) -> None:
        fully_shard(experts, mesh=mesh.expert_shard_mesh["dp"], **options)
        experts.set_gradient_divide_factor(mesh.data_size)
        # A sum, then the division: gloo has no pre-multiplied sum (NCCL's PreMulSum).
        experts.set_force_sum_reduction_for_comms(True)

    with marks_kept(model):  # FSDP2 makes new parameters
        for layer in unwrap(model).modules():
            if not isinstance(layer, MoELayer) or mesh.expert_size == 1:
                continue
            if mesh.expert_replicas == 1:
                whole_experts.update(layer.experts.parameters())
            elif isinstance(layer.experts, GroupedExperts):
                shard_over_replicas(layer.experts)
            else:  # ModuleExperts: one unit per expert, gathered as it runs
                for expert in layer.experts.experts:
                    if any(True for _ in expert.parameters()):
                        shard_over_replicas(expert)
        for block in getattr(unwrap(model), "layers", ()):
            fully_shard(block, mesh=data_ranks, ignored_params=whole_experts or None, **options)
        fully_shard(model, mesh=data_ranks, ignored_params=whole_experts or None, **options)
    return model


def reshard(model: nn.Module) -> None:
    """FSDP2's parameters back to their shards. Under ZeRO-2 a forward without a backward (an
    evaluation) leaves them gathered, and the next forward would not see a change made to
    the shards meanwhile (weights swapped in and out)."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def marks_kept(model: nn.Module):
    """The marks a layout puts on parameters (``expert_parallel``, ``partial_over_tensor``),
    carried by name over code that replaces the Parameter objects (FSDP2, ``to_empty``)."""
    marks = {name: dict(vars(p)) for name, p in model.named_parameters()}
    yield
    for name, parameter in model.named_parameters():
        vars(parameter).update(marks[name])


@torch.no_grad()
def _materialise(model: nn.Module, weights, device, mesh: Mesh, given: dict | None) -> None:
    """This rank's parameters and buffers of a meta ``model`` on ``device``: the ``given``
    whole tensors' parts, the rest read from the folder ``weights``, or without one drawn as
    ``Transformer(model.config)`` draws them from the current random state (nothing to do for
    a model that is not on the meta device)."""
    if weights is None and not any(local(p).is_meta for p in model.parameters()):
        return
    from moekit.model.io import WEIGHTS_FILE, load_weights
    from moekit.model.transformer import init_in_parts
    from moekit.parallel.sharded_checkpoint import load_sharded
    # to_empty makes new Parameter objects (a meta tensor's storage cannot be swapped for
    # another device's).
    with marks_kept(model):
        model.to_empty(device=device)
    plain = unwrap(model)
    if weights is None:  # the one-process values, each part whole only while it is drawn
        held = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}
        undrawn = set(held)
        for name, whole in init_in_parts(plain.config):
            if name in held:
                local(held[name]).copy_(local(held_part(whole, held[name], mesh)))
                undrawn.discard(name)
        if undrawn:
            raise ValueError(f"{sorted(undrawn)[0]} (of {len(undrawn)} tensors) is not one "
                             "that Transformer(config) draws: a meta model without weights "
                             "must be a plain Transformer")
        return
    given = given or {}
    if mesh.world_size == 1 and not given:
        load_weights(plain, weights)
        return
    held = load_sharded(weights, WEIGHTS_FILE, plain, mesh)
    for name, tensor in [*plain.named_parameters(), *plain.named_buffers()]:
        if name in given:
            local(tensor).copy_(local(held_part(given[name], tensor, mesh)))
        else:
            tensor.copy_(held[name])


def held_part(whole: torch.Tensor, parameter: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """A whole tensor of ``parameter``'s (one process's shape) as this rank holds it: its
    experts' rows, its DTensor shard (FSDP2's, tensor parallelism's), or itself; each rank
    takes its part of its own copy, with no communication."""
    if is_sharded(whole):  # read as this rank's shard already (``load_sharded``)
        return whole
    if getattr(parameter, "stacked_experts", False) and whole.shape != parameter.shape:
        whole = local_part(whole, mesh)
    whole = whole.to(parameter.device).clone(memory_format=torch.contiguous_format)
    if is_sharded(parameter):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(whole, parameter.device_mesh, parameter.placements,
                                 src_data_rank=None)
    return whole


def whole_tensors(tensors: dict[str, torch.Tensor], model: nn.Module, mesh: Mesh) -> dict:
    """``tensors`` named by ``model``'s parameters (or ``PARAMETER.KEY`` for their optimizer
    state) as one process holds them: tensor-parallel shards, experts and pipeline stages
    gathered whole, on rank 0. A collective: every rank calls it."""
    return gather_stages(whole_expert_tensors(full_tensors(tensors), model, mesh), mesh)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model (of a pipeline, the stage's part) inside whatever ``parallelize``
    wrapped it in."""
    inner = getattr(model, "module", model)
    return inner.model if isinstance(inner, StageModule) else inner


def reduced_by_hand(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that ranks hold different parts of (experts, tensor-parallel shards):
    DDP leaves them out, ``finish_gradients`` reduces them over their replicas."""
    return [(name, p) for name, p in model.named_parameters()
            if getattr(p, "expert_parallel", False) or is_sharded(p)]


@torch.no_grad()
def finish_gradients(model: nn.Module, mesh: Mesh) -> None:
    """Expert and tensor-parallel gradients as data parallelism would leave them: every rank
    backpropagates R times its share of the loss (R data-parallel ranks), and an expert's rows
    come from all ranks of its expert group (under EDP, from the group's shared rows), so the
    sum over the replicas divided by R is the global batch's gradient."""
    if mesh.expert_size == 1 and mesh.tensor_size == 1:
        return
    for parameter in partial_over_tensor(unwrap(model)):
        if parameter.grad is not None:  # (under FSDP2, each rank's shard of the sum)
            dist.all_reduce(local(parameter.grad), group=mesh.expert_group)
    # Under FSDP2 its DTensors are its shards, reduced by its reduce-scatter: the experts it
    # leaves whole only.
    by_hand = (expert_parameters if mesh.zero >= 2 else reduced_by_hand)(unwrap(model))
    for _, parameter in by_hand:
        if parameter.grad is not None and not (mesh.zero >= 2 and is_sharded(parameter)):
            gradient = local(parameter.grad)
            if mesh.expert_replicas > 1:
                dist.all_reduce(gradient, group=mesh.expert_replica_group)
            gradient.div_(mesh.data_size)


def _sum_of_squares(gradient: torch.Tensor) -> torch.Tensor:
    """A gradient's sum of squares in float64, read in its own dtype (no copy)."""
    if not is_sharded(gradient) and gradient.is_contiguous() and gradient.dtype in (
            torch.float32, torch.float64):
        # BLAS's dot: 2.4x vector_norm's speed on a CPU (1.6 GB of expert gradients: 0.061 s
        # against 0.145 s on 2 threads), the norm being a tenth of a step at 64 experts.
        flat = gradient.view(-1)
        return torch.dot(flat, flat).double()
    norm = torch.linalg.vector_norm(gradient)
    norm = (norm.full_tensor() if is_sharded(norm) else norm).double()
    return norm * norm


@torch.no_grad()
def gradient_norm(model: nn.Module, mesh: Mesh) -> torch.Tensor:
    """The global norm of every gradient (float64), as ``torch.nn.utils.clip_grad_norm_``
    measures it, with each parameter counted once: a replicated one once, an expert's gradient,
    held by one rank of each expert group, once, a tensor-parallel one its shards once each
    (DTensor's norm sums them). ``moekit.train.optim.clipped_step`` clips by it."""
    sharded = {id(p) for _, p in expert_parameters(unwrap(model))}
    squares = [[], []]  # replicated, sharded
    for parameter in model.parameters():
        if parameter.grad is not None:
            squares[int(id(parameter) in sharded)].append(_sum_of_squares(parameter.grad))
    device = (squares[0] or squares[1])[0].device
    squares = torch.stack([sum(kind, torch.zeros((), dtype=torch.float64, device=device))
                           for kind in squares])
    if sharded and mesh.expert_size > 1:
        expert_squares = squares[1:].to(mesh.device)
        dist.all_reduce(expert_squares, group=mesh.expert_group)
        squares[1:] = expert_squares.to(squares.device)
    if mesh.pipeline_size > 1:  # each stage holds its own parameters
        stage_squares = squares.to(mesh.device)
        dist.all_reduce(stage_squares, group=mesh.pipeline_group)
        squares = stage_squares.to(squares.device)
    return squares.sum().sqrt()
