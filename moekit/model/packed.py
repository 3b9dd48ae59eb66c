"""A model's decoding state with packed weights (``moekit.moe.packed``): built once, never trained.

``pack_for_decoding(model, rows)`` swaps, in place, every projection of the attention, every
dense or shared MLP's, the output head and every routed expert's two matrices for packed ones
(``PackedLinear``, ``PackedExperts``), packed for ``rows`` rows: the batch size the engine will
decode. What stays plain: embeddings, norms, routers and shared-expert gates (a few
outputs each), a tied head (its
matrix is the embedding's), the latent attention's ``kv_b_proj`` (whose matrix decoding reads
to absorb it), and every module whose type is not exactly the plain one (quantized, LoRA,
offloaded experts). The plain matrices are dropped: the packed copies take their place, not a
place beside them. The swapped modules hold no parameters, so the model cannot train them
afterwards: an optimizer never sees them, and a forward that records autograd through them
raises. Prefill runs on the packed weights too (``rows`` only hints their layout).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moekit.model.transformer import LatentAttention, Transformer
from moekit.moe.experts import GroupedExperts
from moekit.moe.packed import PackedExperts, PackedLinear, packable
from moekit.moe.router import Gate
from moekit.moe.row_products import Linear


def _packed_module(module: nn.Module, rows: int) -> nn.Module | None:
    if type(module) in (Linear, nn.Linear) and packable(module.weight):
        return PackedLinear(module, rows)
    if type(module) is GroupedExperts and packable(module.in_proj[0]):
        return PackedExperts(module, rows)
    return None


@torch.no_grad()
def pack_for_decoding(model: Transformer, rows: int) -> Transformer:
    """Pack ``model``'s weights for products of ``rows`` rows, in place; returns the model (in
    eval mode). A ValueError if nothing in it can be packed (not on a CPU, or a dtype that
    neither MKL nor oneDNN packs)."""
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows={rows!r} is not allowed: expected an integer >= 1 (the batch "
                         "size the model will decode)")
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(parent, Gate) or name == "shared_gate"
                    or (isinstance(parent, LatentAttention) and name == "kv_b_proj")):
                continue
            packed = _packed_module(child, rows)
            if packed is not None:
                setattr(parent, name, packed)
                swapped += 1
    if swapped == 0:
        weight = model.norm.weight
        raise ValueError(f"nothing in this model can be packed ({weight.dtype} on "
                         f"{weight.device}): packing needs float32, bfloat16 or float16 "
                         "weights on a CPU with MKL / oneDNN")
    return model.eval()
