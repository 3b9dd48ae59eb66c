"""Router health beyond the step's counts: how alike the experts are (``expert_similarity``
in metrics.jsonl, which Skywork-MoE watches when upcycling: copies of one FFN start at 1), and
the thresholds by which `moekit inspect` (``train.inspect``) flags a collapsing router.

The per-step counts (tokens per expert, imbalance, entropy, max1/max2, max2/max3) are summed in
``train.step`` over the step's micro-batches and read once per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moekit.moe.experts import expert_weight_rows
from moekit.parallel.mesh import Mesh
from moekit.parallel.tensor_parallel import is_sharded
from moekit.train.step import moe_layers


def mean_pairwise_cosine(rows_EP: torch.Tensor) -> float | None:
    """The mean cosine similarity over the E (E - 1) / 2 pairs of rows; None for one row."""
    num_rows = len(rows_EP)
    if num_rows < 2:
        return None
    unit_EP = F.normalize(rows_EP.double(), dim=1)
    gram_EE = unit_EP @ unit_EP.T
    return float((gram_EE.sum() - gram_EE.diagonal().sum()) / (num_rows * (num_rows - 1)))


@torch.no_grad()
def expert_similarities(model: torch.nn.Module, mesh: Mesh = Mesh()) -> list[float | None]:
    """Per MoE layer, the mean pairwise cosine similarity of its experts' weights (None where
    the experts cannot be compared: modules of different sizes). Under expert parallelism the
    experts are gathered over the expert group first (and FSDP2's shards over their replicas):
    every rank calls it."""
    similarities = []
    for layer in moe_layers(model):
        rows_EP = expert_weight_rows(layer.experts)
        if rows_EP is not None and is_sharded(rows_EP):  # ZeRO-2/3: gathered over replicas
            rows_EP = rows_EP.full_tensor()
        if rows_EP is not None and mesh.expert_size > 1:
            pieces = [torch.empty_like(rows_EP) for _ in range(mesh.expert_size)]
            dist.all_gather(pieces, rows_EP.contiguous(), group=mesh.expert_group)
            rows_EP = torch.cat(pieces)
        similarities.append(None if rows_EP is None else mean_pairwise_cosine(rows_EP))
    return similarities


@dataclass(frozen=True)
class CollapseThresholds:
    """When `moekit inspect` flags a layer's router as collapsing (docs/train.md):
    an expert with fewer than ``min_expert_tokens`` tokens (default 1: an expert with none);
    a mean max1/max2 under ``min_max1_over_max2`` (the router barely prefers its first choice
    to its second: Skywork-MoE's sign of a flat gate); a max load over ``max_load_over_mean``
    times the mean."""

    min_expert_tokens: int = 1
    min_max1_over_max2: float = 1.05
    max_load_over_mean: float = 2.0

    def __post_init__(self):
        for name, value, low in (("min_expert_tokens", self.min_expert_tokens, 0),
                                 ("min_max1_over_max2", self.min_max1_over_max2, 1.0),
                                 ("max_load_over_mean", self.max_load_over_mean, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < low:
                raise ValueError(f"{name}={value!r} is not allowed: expected a finite number "
                                 f">= {low:g}")


def collapse_flags(health: dict, thresholds: CollapseThresholds) -> list[str]:
    """What in one layer's health (the keys of metrics.jsonl) crosses ``thresholds``."""
    flags = []
    starved = [e for e, n in enumerate(health["tokens_per_expert"])
               if n < thresholds.min_expert_tokens]
    if starved:
        flags.append(f"experts {starved} got fewer than {thresholds.min_expert_tokens} tokens")
    ratio = health["max1_over_max2"]
    if ratio is not None and ratio < thresholds.min_max1_over_max2:
        flags.append(f"max1/max2 {ratio:.3f} < {thresholds.min_max1_over_max2:g}")
    imbalance = health["load_max_over_mean"]
    if imbalance is not None and imbalance > thresholds.max_load_over_mean:
        flags.append(f"max/mean load {imbalance:.2f} > {thresholds.max_load_over_mean:g}")
    return flags

