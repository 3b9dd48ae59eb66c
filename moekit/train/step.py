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

import torch
import torch.nn.functional as F

from moekit.config import TrainConfig
from moekit.moe import MoELayer
from moekit.moe.layer import RouterCounts
from moekit.parallel.mesh import Mesh, collective
from moekit.parallel.parallelize import clip_gradients, finish_gradients, unwrap
from moekit.train.router_loss import StepRouterLoss, routing_totals

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


def _sum_counts(per_micro_batch: list[list[RouterCounts]]) -> list[RouterCounts]:
    totals = per_micro_batch[0]
    for counts in per_micro_batch[1:]:
        totals = [a + b for a, b in zip(totals, counts)]
    return totals


def _health_sums(stats) -> torch.Tensor:
    """A layer's router-health sums of one forward (entropy, max1/max2, max2/max3), NaN where
    the gate gives no probabilities."""
    sums = (stats.entropy_sum, stats.top1_over_top2_sum, stats.top2_over_top3_sum)
    return torch.stack([torch.tensor(float("nan")) if s is None else s.detach().double().cpu()
                        for s in sums])


def _health(counts: RouterCounts, sums: list[float]) -> dict:
    """Per-layer router health of the step (the issue's metrics keys), from summed counts."""
    tokens = max(int(counts.num_tokens), 1)
    means = [None if math.isnan(s) else s / tokens for s in sums]
    return {"tokens_per_expert": counts.tokens_per_expert_E.tolist(), **counts.load_imbalance(),
            "router_entropy": means[0], "max1_over_max2": means[1], "max2_over_max3": means[2]}


def _reduce(counts: list[RouterCounts], scalars: list[torch.Tensor], mesh: Mesh):
    """Counts and float64 scalars summed over the ranks, in one collective."""
    if mesh.data_size == 1:
        return counts, [float(x) for x in scalars]
    vectors = [c.as_vector().double() for c in counts]
    flat = mesh.sum_(torch.cat(vectors + [torch.stack(scalars).double()]))
    reduced, start = [], 0
    for c, vector in zip(counts, vectors):
        reduced.append(RouterCounts.from_vector(flat[start:start + len(vector)].round().long(),
                                                c.top_k))
        start += len(vector)
    return reduced, flat[start:].tolist()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               inputs_BS: torch.Tensor, targets_BS: torch.Tensor, config: TrainConfig,
               mesh: Mesh, mask_BS: torch.Tensor | None = None,
               document_ids_BS: torch.Tensor | None = None) -> dict:
    """One optimizer step on the global batch (``inputs_BS``, ``targets_BS``, optional valid-token
    ``mask_BS``, optional ``document_ids_BS`` of packed rows: ``Transformer.forward``); this rank
    computes its rows. Returns the step's record (every figure of the global batch)."""
    device = next(model.parameters()).device
    layers = moe_layers(model)
    counted = int((targets_BS != IGNORE_INDEX).sum())
    rows = mesh.rows(len(inputs_BS))
    local = [t[rows].to(device) if t is not None else None
             for t in (inputs_BS, targets_BS, mask_BS, document_ids_BS)]
    per_micro = (rows.stop - rows.start) // config.grad_accum
    micro_batches = [tuple(t[m * per_micro:(m + 1) * per_micro] if t is not None else None
                           for t in local) for m in range(config.grad_accum)]

    def forward(module, batch):
        inputs, _, mask, document_ids = batch
        with autocast(config.precision, device):
            return module(inputs, mask, document_ids=document_ids)

    totals = None
    if config.lb_scope == "step" and layers:
        inner = unwrap(model)  # the pre-pass goes around DDP's hooks
        totals = routing_totals(inner, micro_batches, mesh, forward)
    router_loss = StepRouterLoss(layers, config.lb_scope, config.grad_accum, mesh, totals)
    ranks = mesh.data_size
    cross_entropy = torch.zeros((), dtype=torch.float64, device=device)
    router_share = torch.zeros((), dtype=torch.float64, device=device)
    counts, health = [], []
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        # Data parallelism reduces the gradients once, in the backward of the last micro-batch.
        with model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext():
            out = forward(model, batch)
            logits = out.logits.to(torch.promote_types(out.logits.dtype, torch.float32))
            nll = F.cross_entropy(logits.flatten(0, 1), batch[1].flatten(),
                                  ignore_index=IGNORE_INDEX, reduction="sum")
            share = router_loss.share(out.moe_stats)
            with collective("the backward's gradient all-reduce"):
                (ranks * (nll / max(counted, 1) + share)).backward()
        cross_entropy += nll.detach().double()
        router_share += share.detach().to(device)
        counts.append([s.counts for s in out.moe_stats])
        health.append([_health_sums(s) for s in out.moe_stats])
    finish_gradients(model, mesh)
    clip = config.grad_clip if config.grad_clip is not None else math.inf
    grad_norm = clip_gradients(model, clip, mesh)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    health_sums = [sum(layer) for layer in zip(*health)]  # per layer, over micro-batches
    with collective("the all-reduce of the step's figures"):
        step_counts, (nll_sum, router_value, *health_values) = _reduce(
            _sum_counts(counts) if layers else [],
            [cross_entropy, router_share, *(x.to(device) for sums in health_sums for x in sums)],
            mesh)
    for layer, layer_counts in zip(layers, step_counts):
        layer.update_router_state(layer_counts)
    per_layer = [_health(c, health_values[3 * i:3 * i + 3]) for i, c in enumerate(step_counts)]
    return {"loss": nll_sum / max(counted, 1), "router_loss": router_value,
            "grad_norm": grad_norm.item(),
            "drop_rate": [c.drop_rate for c in step_counts],
            "expert_load": [c.expert_load.tolist() for c in step_counts],
            "aux_coef": [s.aux_coef for s in out.moe_stats],
            **{key: [layer[key] for layer in per_layer] for key in
               (per_layer[0] if per_layer else {})}}
