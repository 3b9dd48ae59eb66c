"""Upcycling (Skywork-MoE): a dense Transformer becomes an MoE Transformer that starts exactly
where the dense one is.

Every expert is a copy of the dense FFN; attention, norms and embeddings are copied; the router
is new. At initialisation the MoE model gives the dense model's logits (evaluation is dropless):

- plain copies: the k chosen experts compute the same output and their weights sum to 1
  (renormalised top-k), so the mixture is the dense output;
- fine-grained, granularity g: the FFN's F hidden units are cut into g slices of F/g; each of
  the E coarse experts becomes g experts (one per slice), top-k becomes top-(k*g), and each
  slice's down projection is scaled by g. The router's rows are equal within each group of g
  ("virtual groups", He et al. 2024, *Upcycling Large Language Models into Mixture of Experts*),
  so a token picks whole groups: k groups of g slices, each slice with weight p_e / (g * P), and
  sum_e (p_e / P) * sum_s g * slice_s(x) / g = dense(x). Active FLOPs stay those of k dense FFNs;
- shared experts: the shared expert is the copy (its width must be the dense width) and the
  routed experts' down projections start at zero, so they add nothing until they learn.
  With Qwen2-MoE's sigmoid gate on the shared expert the gate starts at zero
  (sigmoid(0) = 1/2) and the shared down projection is doubled.

Exactness needs renormalised top-k weights (``normalize_weights=True``, not the Switch router);
noise on the copies (``noise_std``) breaks it on purpose, to let experts diverge sooner.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
import torch.nn as nn

from moekit.config import MoEConfig
from moekit.model import Transformer
from moekit.moe import MLP, MoELayer


def fine_grained(moe: MoEConfig, dense_ffn_size: int, granularity: int) -> MoEConfig:
    """The MoE config of an upcycle: ``moe`` describes E experts of the dense width, top-k;
    the result has E*g experts of width F/g, top-(k*g), and shared experts of the dense width."""
    if not isinstance(granularity, int) or granularity < 1 or dense_ffn_size % granularity:
        raise ValueError(f"granularity={granularity!r} is not allowed: expected a positive "
                         f"integer that divides the dense ffn_size ({dense_ffn_size})")
    if moe.ffn_size != dense_ffn_size:
        raise ValueError(f"moe.ffn_size={moe.ffn_size} is not allowed: every expert starts as a "
                         f"copy of the dense FFN, so it must equal the dense ffn_size "
                         f"({dense_ffn_size}); use granularity to split the FFN")
    shared_width = moe.num_shared_experts * (moe.shared_ffn_size or moe.ffn_size)
    if moe.num_shared_experts and shared_width != dense_ffn_size:
        raise ValueError(f"num_shared_experts * shared_ffn_size = {shared_width} is not allowed: "
                         f"the shared expert starts as the copy of the dense FFN, so it must "
                         f"equal the dense ffn_size ({dense_ffn_size})")
    return replace(moe, num_experts=moe.num_experts * granularity,
                   top_k=moe.top_k * granularity, ffn_size=dense_ffn_size // granularity,
                   shared_ffn_size=dense_ffn_size // moe.num_shared_experts
                   if moe.num_shared_experts else None)


def with_noise(weight_E: torch.Tensor, noise_std: float, generator: torch.Generator):
    """Each expert's copy plus Gaussian noise of ``noise_std`` times the weight's own std."""
    if noise_std == 0:
        return weight_E
    # Drawn on the CPU generator, so that a seed gives the same experts on every device.
    noise = torch.randn(weight_E.shape, generator=generator).to(weight_E.device)
    return weight_E + (noise_std * weight_E.float().std() * noise).to(weight_E.dtype)


@torch.no_grad()
def init_router(layer: MoELayer, granularity: int, router_init_std: float | None,
                generator: torch.Generator) -> None:
    """A fresh router, normal with std ``router_init_std`` (default 1/sqrt(D), as the gates'
    own init), its rows equal within each group of ``granularity`` experts."""
    config = layer.config
    std = router_init_std if router_init_std is not None else config.hidden_size ** -0.5
    rows = torch.randn(config.num_experts // granularity, config.hidden_size,
                       generator=generator) * std
    layer.router.weight.copy_(rows.repeat_interleave(granularity, dim=0))


@torch.no_grad()
def upcycle_ffn(config: MoEConfig, up: torch.Tensor, down: torch.Tensor,
                gate: torch.Tensor | None = None, *, granularity: int = 1,
                noise_std: float = 0.0, router_init_std: float | None = None,
                generator: torch.Generator | None = None) -> MoELayer:
    """An MoELayer (``config`` from ``fine_grained``) whose experts are copies of the FFN
    ``down(act(gate x) * up x)`` given by its weights in nn.Linear's layout: ``up`` and
    ``gate`` [F, D], ``down`` [D, F] (``gate`` None for an ungated FFN)."""
    generator = generator or torch.Generator().manual_seed(0)
    layer = MoELayer(config).to(device=up.device, dtype=up.dtype)
    coarse_experts, slice_width = config.num_experts // granularity, config.ffn_size

    def slices(weight_FX):  # [F, X] -> [g, F/g, X]
        return weight_FX.reshape(granularity, slice_width, -1)

    in_parts = ([slices(gate)] if gate is not None else []) + [slices(up)]
    in_proj_gID = torch.cat(in_parts, dim=1)  # gate then up rows
    down_gDF = slices(down.T).transpose(1, 2) * granularity
    routed_down_scale = 0.0 if config.num_shared_experts else 1.0
    layer.experts.in_proj.copy_(with_noise(in_proj_gID.repeat(coarse_experts, 1, 1),
                                            noise_std, generator))
    layer.experts.down_proj.copy_(with_noise(
        routed_down_scale * down_gDF.repeat(coarse_experts, 1, 1), noise_std, generator))

    init_router(layer, granularity, router_init_std, generator)

    if config.num_shared_experts:
        shared = layer.shared_experts
        if gate is not None:
            shared.gate_proj.weight.copy_(gate)
        shared.up_proj.weight.copy_(up)
        shared.down_proj.weight.copy_(down)
        if layer.shared_gate is not None:
            nn.init.zeros_(layer.shared_gate.weight)
            shared.down_proj.weight.mul_(2)  # sigmoid(0) = 1/2 halves it back
    return layer


def upcycle(dense: Transformer, moe: MoEConfig, *, noise_std: float = 0.0,
            granularity: int = 1, seed: int = 0, router_init_std: float | None = None,
            moe_every: int | None = None) -> Transformer:
    """A new MoE Transformer from a dense one: its config is the dense config with ``moe`` set
    (fine-grained by ``granularity``: see the module doc); each MoE layer's experts are copies
    of that layer's dense FFN (plus ``noise_std`` relative noise), the router fresh (normal,
    std ``router_init_std``, default 1/sqrt(D), seeded by ``seed``); everything else copied.
    ``moe_every`` (default: the dense config's) picks which layers become MoE."""
    config = dense.config
    if config.moe is not None:
        raise ValueError("upcycle needs a dense model; this one already has MoE layers "
                         "(config.moe is set)")
    if moe.activation != config.activation:
        raise ValueError(f"moe.activation={moe.activation!r} is not allowed: the experts copy "
                         f"the dense FFN, whose activation is {config.activation!r}")
    if not (isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std={noise_std!r} is not allowed: expected a number >= 0")
    moe_config = replace(config, moe=fine_grained(moe, config.ffn_size, granularity),
                         moe_every=config.moe_every if moe_every is None else moe_every)
    model = copy.deepcopy(dense)
    model.config = moe_config
    generator = torch.Generator().manual_seed(seed)
    for index, block in enumerate(model.layers):
        if moe_config.is_moe_layer(index):
            block.ffn = upcycle_from_mlp(moe_config.moe, block.ffn, granularity=granularity,
                                         noise_std=noise_std, router_init_std=router_init_std,
                                         generator=generator)
    return model


def upcycle_from_mlp(config: MoEConfig, mlp: MLP | nn.Module, **options) -> MoELayer:
    """``upcycle_ffn`` of a module with ``gate_proj``/``up_proj``/``down_proj`` linear layers:
    moekit's MLP, and the MLPs of Llama, Mistral and Qwen2."""
    gate = getattr(mlp, "gate_proj", None)
    return upcycle_ffn(config, mlp.up_proj.weight, mlp.down_proj.weight,
                       None if gate is None else gate.weight, **options).train(mlp.training)
