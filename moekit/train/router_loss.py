"""The router losses of a training step, formed from the layers' raw sums in one of three scopes.

Legend: E experts, K routes per token, M micro-batches per rank, R data-parallel ranks,
n_m the valid tokens of micro-batch m on one rank, N the valid tokens of the global batch.
For each MoE layer (coefficients alpha = aux_coef, zeta = z_loss_coef; docs/correctness.md):

- ``micro``: each micro-batch's own losses (alpha * aux(m) + zeta * z(m)), averaged over the
  M micro-batches and the R ranks: most tools' behaviour, which changes with the cut.
- ``global``: the balance loss of micro-batch m uses the expert counts (and, for Skywork's form,
  the mean probabilities) summed over all ranks and over micro-batches 1..m so far, with
  gradient through this micro-batch's own probabilities only (Megatron's global aux loss);
  still averaged over micro-batches and ranks.
- ``step``: the balance loss of the whole global batch, its counts taken by a routing pre-pass
  without gradients; a function of the global batch alone, however it is cut. Switch's form,
  E * sum_i f_i * P_i, is linear in the summed probabilities: each micro-batch adds its share.
  Skywork's, sum_i (1/E - P_i)^2, is not: each micro-batch adds the first-order term
  -2 (1/E - P_i) * p_m,i / N around the pre-pass's P, whose gradient is the true one.
  The z-loss, a mean over tokens, becomes the sum over the global batch divided by N.

A gate's own loss (``Routing.aux_loss``) is added as it is, averaged over micro-batches and
ranks, in every scope. Backward terms carry a factor R where they are parts of a global sum,
because data parallelism averages the ranks' gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.moe import MoELayer, MoEStats
from moekit.moe.losses import skywork_balance_loss, switch_balance_loss
from moekit.parallel.mesh import Mesh


@dataclass
class LayerTotals:
    """Sums over a set of micro-batches (and ranks) of one layer, without gradient."""

    routed_per_expert_E: torch.Tensor  # float64
    prob_sum_E: torch.Tensor  # float64, zeros when the gate gives no probabilities
    num_tokens: float

    def __add__(self, other: LayerTotals) -> LayerTotals:
        return LayerTotals(self.routed_per_expert_E + other.routed_per_expert_E,
                           self.prob_sum_E + other.prob_sum_E, self.num_tokens + other.num_tokens)

    @classmethod
    def of(cls, stats: MoEStats) -> LayerTotals:
        prob_sum_E = (stats.prob_sum_E.detach().double() if stats.prob_sum_E is not None
                      else torch.zeros_like(stats.routed_per_expert_E, dtype=torch.float64))
        return cls(stats.routed_per_expert_E.double(), prob_sum_E, float(stats.num_tokens))


def reduce_totals(totals: list[LayerTotals], mesh: Mesh) -> list[LayerTotals]:
    """Each layer's totals summed over the data-parallel ranks, in one collective."""
    if mesh.data_size == 1:
        return totals
    device = totals[0].routed_per_expert_E.device
    flat = torch.cat([torch.cat([t.routed_per_expert_E, t.prob_sum_E,
                                 torch.tensor([t.num_tokens], dtype=torch.float64,
                                              device=device)]) for t in totals])
    mesh.sum_(flat)
    reduced, start = [], 0
    for t in totals:
        experts = len(t.routed_per_expert_E)
        part = flat[start:start + 2 * experts + 1]
        reduced.append(LayerTotals(part[:experts], part[experts:2 * experts],
                                   float(part[-1])))
        start += 2 * experts + 1
    return reduced


class _LossThroughActivations(torch.autograd.Function):
    """The identity on ``hidden``, whose backward also sends ``scale`` into ``loss``: so a
    loss formed inside a pipeline stage gets its gradient when the stage's output does."""

    @staticmethod
    def forward(ctx, hidden, loss, scale: float):
        ctx.scale = scale
        ctx.save_for_backward(loss)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


def attach_loss(hidden: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``hidden``, with ``scale * loss`` joining whatever loss ``hidden`` contributes to."""
    return _LossThroughActivations.apply(hidden, loss, scale)


def _with_gradient_of(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value``'s value with ``surrogate``'s gradient."""
    return value.detach() + (surrogate - surrogate.detach())


class StepRouterLoss:
    """Each micro-batch's router loss in ``scope``; one object per optimizer step.

    ``share(stats)`` returns this rank's share of the step's router loss: summed over the
    micro-batches and ranks it is the step's router loss, and R times it is the term to add
    to the micro-batch's loss before backward. ``totals``: for scope "step", each layer's
    totals over the global batch (``routing_totals``).
    """

    def __init__(self, layers: list[MoELayer], scope: str, num_micro: int, mesh: Mesh,
                 totals: list[LayerTotals] | None = None):
        self.layers, self.scope, self.num_micro, self.mesh = layers, scope, num_micro, mesh
        self.totals = totals
        self.running: list[LayerTotals] | None = None  # scope "global": totals so far

    def share(self, stats: list[MoEStats]) -> torch.Tensor:
        if self.scope == "global":
            now = reduce_totals([LayerTotals.of(s) for s in stats], self.mesh)
            self.running = now if self.running is None else [
                a + b for a, b in zip(self.running, now)]
        mean_share = 1.0 / (self.num_micro * self.mesh.data_size)  # of a mean over micro, ranks
        total = torch.zeros((), dtype=torch.float64)
        for index, (layer, s) in enumerate(zip(self.layers, stats)):
            if self.scope == "micro":
                total = total + s.router_loss.double() * mean_share
                continue
            if s.gate_aux_loss is not None:
                total = total + s.gate_aux_loss.double() * mean_share
            total = total + self._balance_and_z(index, layer, s, mean_share)
        return total

    def _balance_and_z(self, index: int, layer: MoELayer, s: MoEStats,
                       mean_share: float) -> torch.Tensor:
        config = layer.config
        z_sum = torch.zeros((), dtype=torch.float64) if s.z_sum is None else s.z_sum.double()
        prob_E = (s.prob_sum_E.double() if s.prob_sum_E is not None
                  else torch.zeros(config.num_experts, dtype=torch.float64,
                                   device=s.routed_per_expert_E.device))
        if self.scope == "global":
            if s.num_tokens == 0:
                return torch.zeros((), dtype=torch.float64)
            run = self.running[index]
            if config.aux_loss == "switch":  # E * sum_i f_i (so far, all ranks) * P_i (here)
                fraction_E = run.routed_per_expert_E / (s.top_k * run.num_tokens)
                aux = config.num_experts * (fraction_E * prob_E / s.num_tokens).sum()
            elif config.aux_loss == "skywork":  # this micro-batch's probabilities: the gradient
                aux = skywork_balance_loss(run.prob_sum_E + (prob_E - prob_E.detach()),
                                           run.num_tokens)
            else:
                aux = prob_E.new_zeros(())
            return (s.aux_coef * aux + config.z_loss_coef * z_sum / s.num_tokens) * mean_share
        step = self.totals[index]
        tokens = max(step.num_tokens, 1.0)
        if config.aux_loss == "switch":
            aux = switch_balance_loss(step.routed_per_expert_E, prob_E, tokens, s.top_k)
        elif config.aux_loss == "skywork":
            first_order = (-2 * (1.0 / config.num_experts - step.prob_sum_E / tokens)
                           * prob_E).sum() / tokens
            aux = _with_gradient_of(skywork_balance_loss(step.prob_sum_E, tokens)
                                    * mean_share, first_order)
        else:
            aux = prob_E.new_zeros(())
        return s.aux_coef * aux + config.z_loss_coef * z_sum / tokens


@torch.no_grad()
def routing_totals(model, micro_batches, mesh: Mesh, forward,
                   select=None) -> list[LayerTotals]:
    """Scope "step"'s pre-pass: each MoE layer's totals over the global batch, from a forward
    of every micro-batch without gradients. The random-number state is restored afterwards,
    so that the training forwards draw the same jitter and route exactly as the pre-pass.
    ``select(m)``, when given, is called before micro-batch m's forward (the step's capacity
    plan, ``moekit.train.step_capacity``)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    totals = None
    with torch.random.fork_rng(devices=devices):
        for index, batch in enumerate(micro_batches):
            if select is not None:
                select(index)
            layer_totals = [LayerTotals.of(s) for s in forward(model, batch).moe_stats]
            totals = layer_totals if totals is None else [
                a + b for a, b in zip(totals, layer_totals)]
    return reduce_totals(totals, mesh)
