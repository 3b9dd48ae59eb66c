"""One optimizer step: micro-batches on every data-parallel rank, one loss however it is cut.

The step's loss is defined on the global batch (docs/correctness.md): cross-entropy is the sum
over its counted targets (``IGNORE_INDEX`` marks the others) divided by their number in the
whole global batch, and the router losses are formed in ``config.lb_scope``
(``moekit.train.router_loss``). Each rank backpropagates R times its share, because data
parallelism averages the ranks' gradients. After the update, every MoE layer's router state
moves once, from the step's counts summed over micro-batches and ranks.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moekit.config import TrainConfig
from moekit.moe import MoELayer
from moekit.moe.layer import RouterCounts
from moekit.parallel.mesh import Mesh, collective
from moekit.parallel.parallelize import finish_gradients, unwrap
from moekit.parallel.pipeline import run_schedule, stage_module
from moekit.train.router_loss import (LayerTotals, StepRouterLoss, attach_loss, reduce_totals,
                                      routing_totals)
from moekit.train.optim import clipped_step
from moekit.train.step_capacity import StepCapacity

IGNORE_INDEX = -100  # a target that is not counted (padding, a prompt's tokens): PyTorch's


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_batch_split(config: TrainConfig, data_ranks: int) -> None:
    """Each data-parallel rank takes an equal share of every micro-batch's rows."""
    if config.batch_size % (data_ranks * config.grad_accum):
        raise ValueError(f"batch_size={config.batch_size} is not allowed with {data_ranks} "
                         f"data-parallel ranks and grad_accum={config.grad_accum}: it must be a "
                         f"multiple of {data_ranks} x {config.grad_accum} = "
                         f"{data_ranks * config.grad_accum}")


def moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    return [module for module in model.modules() if isinstance(module, MoELayer)]


def _health_sums(stats, device: torch.device) -> torch.Tensor:
    """A layer's router-health sums of one forward (entropy, max1/max2, max2/max3), NaN where
    the gate gives no probabilities; kept on the device, so that a micro-batch waits for
    nothing."""
    sums = (stats.entropy_sum, stats.top1_over_top2_sum, stats.top2_over_top3_sum)
    return torch.stack([torch.full((), math.nan, dtype=torch.float64, device=device)
                        if s is None else s.detach().double().to(device) for s in sums])


def layer_health(counts: RouterCounts, sums: list[float]) -> dict:
    """Per-layer router health of the step (the issue's metrics keys), from summed counts."""
    tokens = max(int(counts.num_tokens), 1)
    means = [None if math.isnan(s) else s / tokens for s in sums]
    return {"tokens_per_expert": counts.tokens_per_expert_E.tolist(), **counts.load_imbalance(),
            "router_entropy": means[0], "max1_over_max2": means[1], "max2_over_max3": means[2]}


@dataclass
class LayerStep:
    """One MoE layer's figures of a step on this rank, summed over its micro-batches."""

    counts: RouterCounts
    health_sums: torch.Tensor  # float64 [3], on the device
    aux_coef: float  # of the step's forwards

    @classmethod
    def of(cls, stats_per_micro_batch, device: torch.device) -> LayerStep:
        counts = stats_per_micro_batch[0].counts
        for stats in stats_per_micro_batch[1:]:
            counts = counts + stats.counts
        return cls(counts, sum(_health_sums(s, device) for s in stats_per_micro_batch),
                   stats_per_micro_batch[-1].aux_coef)


def step_figures(model_config, layers: list[MoELayer], steps: list[LayerStep],
                 scalars: list[torch.Tensor], mesh: Mesh):
    """Every MoE layer's step figures (this rank holds ``layers``, a pipeline stage's or all
    of them) and the float64 ``scalars``, summed over the run's ranks in one collective: a
    layer's slot is filled by the ranks of the stage that holds it. The aux coefficient and k,
    the same on those ranks, go in as shares of their ``data_size``."""
    experts = model_config.moe.num_experts if model_config.moe is not None else 0
    numbers = [i for i in range(model_config.num_layers) if model_config.is_moe_layer(i)]
    width = 2 * experts + 3 + 3 + 2  # counts, health sums, aux coefficient, k
    flat = torch.zeros(len(numbers) * width + len(scalars), dtype=torch.float64)
    for layer, step in zip(layers, steps):
        slot = numbers.index(layer.layer_index) * width
        flat[slot:slot + width] = torch.cat([
            step.counts.as_vector().double().cpu(), step.health_sums.cpu(),
            torch.tensor([step.aux_coef, step.counts.top_k], dtype=torch.float64) / mesh.data_size])
    flat[len(numbers) * width:] = torch.stack([x.double().cpu() for x in scalars])
    if mesh.tensor_rank:
        flat.zero_()  # the ranks of an EDP group computed the same: the first one counts
    flat = mesh.sum_all_(flat.to(mesh.device)).cpu()
    figures = []
    for index in range(len(numbers)):
        slot = flat[index * width:(index + 1) * width]
        aux_coef, top_k = slot[-2:].tolist()
        figures.append((RouterCounts.from_vector(slot[:2 * experts + 3].round().long(),
                                                 round(top_k)),
                        slot[2 * experts + 3:-2].tolist(), aux_coef))
    return figures, flat[len(numbers) * width:].tolist()


def gradients_reduced_if(last: bool, model: torch.nn.Module):
    """The context of a micro-batch's backward: data parallelism reduces the gradients once,
    in the backward of the step's last micro-batch (DDP's ``no_sync`` before it)."""
    return model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()


def _micro_batches_here(model, micro_batches, config, mesh, router_loss, counted, device,
                        capacity: StepCapacity | None, every_target_counts: bool):
    """The step's forwards and backwards on one process or data-parallel ranks: the summed
    cross-entropy and router-loss share of this rank, and each micro-batch's MoE statistics.
    ``capacity``: the step's capacity plan (``capacity_scope="step"``), or None;
    ``every_target_counts``: no target of the global batch is ``IGNORE_INDEX``."""
    cross_entropy = torch.zeros((), dtype=torch.float64, device=device)
    router_share = torch.zeros((), dtype=torch.float64, device=device)
    stats = []
    for index, (inputs, targets, mask, document_ids) in enumerate(micro_batches):
        if capacity is not None:
            capacity.select(index)
        last = index == len(micro_batches) - 1
        with gradients_reduced_if(last, model):
            # The head projects the counted positions alone, unless all of the step's count
            # (pre-training windows), where picking them would copy the hidden states and
            # scatter their gradient back for nothing.
            counted_BS = None if every_target_counts else targets != IGNORE_INDEX
            with autocast(config.precision, device):
                out = model(inputs, mask, document_ids=document_ids, logits_mask=counted_BS)
            nll = _summed_cross_entropy(out.logits, targets if counted_BS is None
                                        else targets[counted_BS])
            share = router_loss.share(out.moe_stats)
            with collective("the backward's gradient all-reduce"):
                (mesh.data_size * (nll / max(counted, 1) + share)).backward()
        cross_entropy += nll.detach().double()
        router_share += share.detach().to(device)
        stats.append(out.moe_stats)
    return cross_entropy, router_share, stats


def _summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed over the counted targets, of logits [..., V] and targets [...] alike."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _micro_batches_in_pipeline(model, local, config, mesh, router_loss, counted, device):
    """The same, this rank running one stage of a pipeline schedule: the router-loss share of
    the stage's layers joins the backward through the hidden states they return."""
    stage = stage_module(model)
    cross_entropy = torch.zeros((), dtype=torch.float64, device=device)
    router_share = torch.zeros((), dtype=torch.float64, device=device)
    stats = []

    def after_layers(hidden, layer_stats):
        nonlocal router_share
        stats.append(layer_stats)
        if not layer_stats:
            return hidden
        share = router_loss.share(layer_stats)
        router_share += share.detach().to(device)
        return attach_loss(hidden, share, mesh.data_size)

    def loss(logits, targets):
        nonlocal cross_entropy
        nll = _summed_cross_entropy(logits, targets)
        cross_entropy += nll.detach().double()
        return mesh.data_size * nll / max(counted, 1)

    stage.after_layers, stage.loss = after_layers, loss
    stage.context = lambda: autocast(config.precision, device)
    run_schedule(model, mesh, config.grad_accum, *local, train=True)
    return cross_entropy, router_share, stats


def _pipeline_routing_totals(model, local, config, mesh, device):
    """Scope "step"'s pre-pass through the pipeline: each of this stage's MoE layers' totals
    over the global batch, the random state restored afterwards (as ``routing_totals``)."""
    stage = stage_module(model)
    totals = None

    def collect(hidden, layer_stats):
        nonlocal totals
        now = [LayerTotals.of(s) for s in layer_stats]
        totals = now if totals is None else [a + b for a, b in zip(totals, now)]
        return hidden

    stage.after_layers, stage.loss = collect, lambda logits, targets: logits.new_zeros(())
    stage.context = lambda: autocast(config.precision, device)
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        run_schedule(model, mesh, config.grad_accum, *local, train=False)
    return reduce_totals(totals, mesh) if totals else []


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               inputs_BS: torch.Tensor, targets_BS: torch.Tensor, config: TrainConfig,
               mesh: Mesh, mask_BS: torch.Tensor | None = None,
               document_ids_BS: torch.Tensor | None = None) -> dict:
    """One optimizer step on the global batch (``inputs_BS``, ``targets_BS``, optional valid-token
    ``mask_BS``, optional ``document_ids_BS`` of packed rows: ``Transformer.forward``); this rank
    computes its rows (of a pipeline, with its stage). Returns the step's record (every figure
    of the global batch)."""
    device = next(model.parameters()).device
    inner = unwrap(model)
    layers = moe_layers(inner)
    counted = int((targets_BS != IGNORE_INDEX).sum())
    rows = mesh.rows(len(inputs_BS))
    local = [t[rows].to(device) if t is not None else None
             for t in (inputs_BS, targets_BS, mask_BS)]
    documents = document_ids_BS[rows].to(device) if document_ids_BS is not None else None
    pipelined = mesh.pipeline_size > 1
    if pipelined and documents is not None:
        raise ValueError("packed rows (document_ids) are not supported with pipeline "
                         "parallelism in this version")
    per_micro = (rows.stop - rows.start) // config.grad_accum
    micro_batches = [tuple(t[m * per_micro:(m + 1) * per_micro] if t is not None else None
                           for t in (*local, documents)) for m in range(config.grad_accum)]

    def forward(module, batch):
        inputs, _, mask, document_ids = batch
        with autocast(config.precision, device):
            return module(inputs, mask, document_ids=document_ids)

    # The pre-passes go around data parallelism's hooks (under a pipeline every stage joins).
    capacity = None if pipelined else StepCapacity.plan(inner, micro_batches, forward)
    try:
        totals = None
        if config.lb_scope == "step" and inner.config.moe is not None:
            totals = (_pipeline_routing_totals(model, local, config, mesh, device) if pipelined
                      else routing_totals(inner, micro_batches, mesh, forward,
                                          capacity.select if capacity is not None else None))
        router_loss = StepRouterLoss(layers, config.lb_scope, config.grad_accum, mesh, totals)
        if pipelined:
            cross_entropy, router_share, stats = _micro_batches_in_pipeline(
                model, local, config, mesh, router_loss, counted, device)
        else:
            cross_entropy, router_share, stats = _micro_batches_here(
                model, micro_batches, config, mesh, router_loss, counted, device, capacity,
                every_target_counts=counted == targets_BS.numel())
    finally:
        if capacity is not None:
            capacity.close()
    finish_gradients(model, mesh)
    clip = config.grad_clip if config.grad_clip is not None else math.inf
    grad_norm = clipped_step(optimizer, model, clip, mesh)
    steps = [LayerStep.of(per_layer, device) for per_layer in zip(*stats)] if layers else []
    with collective("the all-reduce of the step's figures"):
        figures, (nll_sum, router_value) = step_figures(
            inner.config, layers, steps, [cross_entropy, router_share], mesh)
    numbers = [i for i in range(inner.config.num_layers) if inner.config.is_moe_layer(i)]
    for layer in layers:  # this rank's, from the counts of the whole run
        layer.update_router_state(figures[numbers.index(layer.layer_index)][0])
    per_layer = [layer_health(counts, sums) for counts, sums, _ in figures]
    return {"loss": nll_sum / max(counted, 1), "router_loss": router_value,
            "grad_norm": grad_norm.item(),
            "drop_rate": [c.drop_rate for c, _, _ in figures],
            "expert_load": [c.expert_load.tolist() for c, _, _ in figures],
            "aux_coef": [coef for _, _, coef in figures],
            **{key: [layer[key] for layer in per_layer] for key in
               (per_layer[0] if per_layer else {})}}
